"""lmssl's own tokenizer trainers: count words once in C, then learn BPE / WordPiece / Unigram from
the counts (lmssl/_bpe.c, lmssl/_unigram.c).

The `tokenizers` library's trainers normalize and pre-tokenize every occurrence of every word
(with alignment tracking), so most of their time goes into text they have seen before. Here a
text is cut before each space that follows a non-space; for the normalizers and pre-tokenizers
allowed below, a text's pre-tokens are exactly the union of its chunks' pre-tokens, so each
distinct chunk is split into words once, weighted by its count:
  * distinct ASCII chunks in C (Metaspace, GPT-2's byte-level pattern, BERT's whitespace and
    punctuation split; ASCII is unchanged by the allowed normalizers except for lowercasing);
  * every other distinct chunk through the tokenizer's own normalizer and pre-tokenizer.
The first texts are also counted the library's way and compared, so a difference falls back to
the library's trainers instead of training on wrong counts. The learned model is a plain
`tokenizers` model (models.BPE, models.WordPiece, models.Unigram) in the spec's pipeline.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Iterator, Optional

# normalizer steps that act on each character alone (so a chunk normalizes the same in any text)
LOCAL_NORMALIZERS = {"nfc", "nfkc", "nfd", "nfkd", "lowercase", "strip_accents", "bert"}
# of those, the ones that leave ASCII text unchanged except for lowercasing
ASCII_SAFE = {"nfc", "nfkc", "nfd", "nfkd", "strip_accents", "lowercase"}
# distinct chunks the C side may hold before they are split (bounds memory on text without spaces, e.g. CJK)
PENDING_BYTES = 64 << 20
# pre-tokenizers whose pieces never cross a space that follows a non-space
LOCAL_PRE_TOKENIZERS = {"metaspace", "byte_level", "bert", "whitespace", "whitespace_split", "digits", "punctuation"}


def native_trainers() -> dict[str, Any]:
    """The compiled trainer modules that are available ({} where the build had no C compiler)."""
    found = {}
    for name in ("bpe", "unigram"):
        try:
            found[name] = __import__(f"lmssl._{name}", fromlist=["_"])
        except ImportError:
            pass
    return found


def missing(spec: dict) -> Optional[str]:
    """Why lmssl cannot train this spec's model natively here, or None when it can."""
    modules = native_trainers()
    need = {"bpe", "unigram"} if spec["model"] == "unigram" else {"bpe"}
    gone = sorted(need - set(modules))
    return f"lmssl._{gone[0]} is not built (no C compiler when lmssl was installed)" if gone else None


def plan(spec: dict, normalizer_steps: list[dict]) -> Optional[dict[str, Any]]:
    """How to count words for this pipeline: ChunkCounter arguments, or None where it is not chunk-local."""
    kinds = [s["type"] for s in normalizer_steps]
    pre = spec.get("pre_tokenizer") or []
    if any(k not in LOCAL_NORMALIZERS for k in kinds) or not pre or any(
            s["type"] not in LOCAL_PRE_TOKENIZERS for s in pre):
        return None
    if any(s["type"] == "metaspace" and s.get("prepend_scheme", "always") == "first" for s in pre[1:]):
        return None  # "first" depends on where a piece sits in the whole text
    lowercase = "lowercase" in kinds or any(s.get("lowercase") for s in normalizer_steps if s["type"] == "bert")
    step = pre[0] if len(pre) == 1 else {"type": "chunks"}  # sequences: every chunk through the library
    if step["type"] == "metaspace" and set(kinds) <= ASCII_SAFE:
        scheme = step.get("prepend_scheme", "always")
        return {"mode": "metaspace", "replacement": step.get("replacement", "\u2581"), "split": step.get("split", True),
                "prepend": {"never": 0, "always": 1, "first": 2}[scheme], "lowercase": lowercase, "any_text": not kinds}
    if step["type"] == "byte_level" and set(kinds) <= ASCII_SAFE and step.get("use_regex", True):
        return {"mode": "byte_level", "add_prefix_space": step.get("add_prefix_space", True), "lowercase": lowercase}
    if step["type"] == "bert" and set(kinds) <= ASCII_SAFE | {"bert"}:
        bert = [s for s in normalizer_steps if s["type"] == "bert"]
        return {"mode": "bert", "lowercase": lowercase, "clean_text": any(s.get("clean_text", True) for s in bert)}
    return {"mode": "chunks"}


def _pipeline(tokenizer):
    normalize = tokenizer.normalizer.normalize_str if tokenizer.normalizer else (lambda text: text)
    split = tokenizer.pre_tokenizer.pre_tokenize_str
    return lambda text: [word for word, _ in split(normalize(text))]


def _drain(counter, words: dict[str, int], words_of) -> None:
    """Split the counter's pending chunks: ASCII ones in C, the rest through the library's pipeline."""
    for chunk, count in counter.drain().items():
        for word in words_of(chunk):
            words[word] = words.get(word, 0) + count


def agrees(tokenizer, how: dict[str, Any], sample: list[str]) -> bool:
    """True when the fast count of these texts equals the library's own normalize + pre-tokenize."""
    from lmssl._bpe import ChunkCounter

    words_of = _pipeline(tokenizer)
    probe = ChunkCounter(**how)
    probe.update(sample)
    rest: dict[str, int] = {}
    _drain(probe, rest, words_of)
    fast = collections.Counter(probe.words())
    fast.update(rest)
    return fast == collections.Counter(word for text in sample for word in words_of(text))


def count_words(tokenizer, how: dict[str, Any], batches: Iterator[list[str]],
                pending_bytes: int = PENDING_BYTES) -> tuple[dict[str, int], int, int]:
    """({word: count} over the whole corpus, words as the tokenizer's pipeline cuts them; texts; UTF-8 bytes)."""
    from lmssl._bpe import ChunkCounter

    words_of = _pipeline(tokenizer)
    counter, rest = ChunkCounter(**how), {}
    for batch in batches:
        counter.update(batch)
        if counter.pending > pending_bytes:
            _drain(counter, rest, words_of)
    _drain(counter, rest, words_of)
    words = counter.words()
    for word, count in rest.items():
        words[word] = words.get(word, 0) + count
    return words, counter.texts, counter.bytes


def _cpus() -> int:
    """CPU cores this process may use (the Unigram E-step runs on up to 16 threads)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(16, cores))


def train_model(spec: dict, words: dict[str, int], vocab_size: int, specials: list[str], unk: Optional[str],
                min_frequency: int, trainer_options: dict, model_options: dict, initial_alphabet: list[str]):
    """A trained tokenizers model (BPE, WordPiece or Unigram) from word counts."""
    from tokenizers import models

    modules = native_trainers()
    if spec["model"] == "unigram":
        options = {k: trainer_options[k] for k in ("max_piece_length", "shrinking_factor", "n_sub_iterations",
                                                   "seed_size") if k in trainer_options}
        pieces = modules["unigram"].train(words, max(1, vocab_size - len(specials)),
                                          threads=_cpus(), **options)
        reserved = set(specials)
        vocab = [(token, 0.0) for token in specials] + [(p, score) for p, score in pieces if p not in reserved]
        return models.Unigram(vocab, unk_id=specials.index(unk) if unk in specials else None, byte_fallback=False)
    prefix = trainer_options.get("continuing_subword_prefix")
    vocab, merges = modules["bpe"].train_bpe(
        words, vocab_size, min_frequency, trainer_options.get("limit_alphabet"), initial_alphabet, specials,
        prefix, trainer_options.get("end_of_word_suffix"))
    ids = {token: i for i, token in enumerate(vocab)}
    if spec["model"] == "wordpiece":
        return models.WordPiece(ids, unk_token=unk or "[UNK]", **model_options)
    return models.BPE(ids, merges, **({"unk_token": unk} if unk else {}), **model_options)
