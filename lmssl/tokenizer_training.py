"""lmssl's own tokenizer trainers: count words once in C, then learn BPE / WordPiece / Unigram from
the counts (lmssl/_bpe.c, lmssl/_unigram.c).

The `tokenizers` library's trainers normalize and pre-tokenize every occurrence of every word
(with alignment tracking), so most of their time goes into text they have seen before. Here a
text is cut before each space that follows a non-whitespace character; for the normalizers and
pre-tokenizers allowed below, a text's pre-tokens are exactly the union of its chunks' pre-tokens,
so each distinct chunk is split into words once, weighted by its count:
  * distinct ASCII chunks in C (Metaspace, GPT-2's byte-level pattern, BERT's whitespace and
    punctuation split; ASCII is unchanged by the allowed normalizers except for lowercasing);
  * every other distinct chunk through the tokenizer's own normalizer and pre-tokenizer.
A seeded sample of texts spread over the whole corpus is also counted the library's way and
compared, so a difference falls back to the library's trainers instead of training on wrong
counts. The learned model is a plain `tokenizers` model (models.BPE, models.WordPiece,
models.Unigram) in the spec's pipeline.
"""

from __future__ import annotations

import collections
import math
import os
import random
from typing import Any, Iterator, Optional

# normalizer steps that act on each character alone (so a chunk normalizes the same in any text)
LOCAL_NORMALIZERS = {"nfc", "nfkc", "nfd", "nfkd", "lowercase", "strip_accents", "bert"}
# of those, the ones that leave ASCII text unchanged except for lowercasing
ASCII_SAFE = {"nfc", "nfkc", "nfd", "nfkd", "strip_accents", "lowercase"}
# distinct chunks the C side may hold before they are split (bounds memory on text without spaces, e.g. CJK)
PENDING_BYTES = 64 << 20
# the self-check: texts compared with the library's own pipeline, drawn over the whole corpus (1000 lines
# of prose take well under a second through the library), and at most this many characters of each
CHECK_TEXTS = 1000
CHECK_CHARS = 10_000
# pre-tokenizers that act on each piece alone (the first step must also end a piece at every space)
LOCAL_PRE_TOKENIZERS = {"metaspace", "byte_level", "bert", "whitespace", "whitespace_split", "digits", "punctuation"}
# normalizers that never turn a character that is not whitespace into nothing or into text ending in
# whitespace (strip_accents drops marks, bert drops controls and pads CJK with spaces): under them a chunk
# cut after a non-whitespace character stays so after normalizing, as GPT-2's byte-level pattern needs
KEEP_LAST_CHARACTER = {"nfc", "nfkc", "nfd", "nfkd", "lowercase"}


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


def _ends_a_piece_at_every_space(step: dict) -> bool:
    """True for a pre-tokenizer step that starts a new piece at (or drops) every space, so a chunk's end is
    always a piece's end; Digits, Punctuation, Metaspace without split and ByteLevel without its pattern
    keep "a b" whole."""
    if step["type"] == "metaspace":
        return step.get("split", True)
    if step["type"] == "byte_level":
        return step.get("use_regex", True)
    return step["type"] in ("bert", "whitespace", "whitespace_split")


def plan(spec: dict, normalizer_steps: list[dict]) -> Optional[dict[str, Any]]:
    """How to count words for this pipeline: ChunkCounter arguments, or None where it is not chunk-local."""
    kinds = [s["type"] for s in normalizer_steps]
    pre = spec.get("pre_tokenizer") or []
    if any(k not in LOCAL_NORMALIZERS for k in kinds) or not pre or any(
            s["type"] not in LOCAL_PRE_TOKENIZERS for s in pre):
        return None
    if not _ends_a_piece_at_every_space(pre[0]):
        return None  # later steps only cut the first step's pieces, which may hold a space
    if pre[0]["type"] == "byte_level" and not set(kinds) <= KEEP_LAST_CHARACTER:
        return None
    if any(s["type"] == "metaspace" and s.get("prepend_scheme", "always") == "first" for s in pre[1:]):
        return None  # "first" depends on where a piece sits in the whole text
    lowercase = "lowercase" in kinds or any(s.get("lowercase") for s in normalizer_steps if s["type"] == "bert")
    step = pre[0] if len(pre) == 1 else {"type": "chunks"}  # sequences: every chunk through the library
    if step["type"] == "metaspace" and set(kinds) <= ASCII_SAFE:
        scheme = step.get("prepend_scheme", "always")
        return {"mode": "metaspace", "replacement": step.get("replacement", "\u2581"),
                "prepend": {"never": 0, "always": 1, "first": 2}[scheme], "lowercase": lowercase, "any_text": not kinds}
    if step["type"] == "byte_level" and set(kinds) <= ASCII_SAFE:
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


def _fast_count(tokenizer, how: dict[str, Any], texts: list[str]) -> collections.Counter:
    from lmssl._bpe import ChunkCounter

    words_of = _pipeline(tokenizer)
    probe = ChunkCounter(**how)
    probe.update(texts)
    rest: dict[str, int] = {}
    _drain(probe, rest, words_of)
    fast = collections.Counter(probe.words())
    fast.update(rest)
    return fast


def disagreement(tokenizer, how: dict[str, Any], sample: list[str]) -> Optional[str]:
    """None when the fast count of these texts equals the library's own normalize + pre-tokenize, else
    the first text whose words differ."""
    words_of = _pipeline(tokenizer)
    if _fast_count(tokenizer, how, sample) == collections.Counter(w for text in sample for w in words_of(text)):
        return None
    differs = (text for text in sample if _fast_count(tokenizer, how, [text]) != collections.Counter(words_of(text)))
    return next(differs, sample[0])  # no text alone differs, only the sample as a whole: name its first text


class SpreadSample:
    """A seeded uniform sample of `size` texts from a stream of batches whose length is not known up front
    (Li's Algorithm L, ACM TOMS 1994: a reservoir that draws O(size log(n / size)) random numbers, so
    sampling costs nothing next to counting). Texts are cut to `chars` characters to bound memory."""

    def __init__(self, size: int = CHECK_TEXTS, seed: int = 0, chars: int = CHECK_CHARS):
        self.size, self.chars, self.texts, self.seen = size, chars, [], 0
        self._random = random.Random(seed).random
        self._weight = 1.0
        self._next = size  # index of the next text that enters the reservoir
        self._advance()

    def _advance(self) -> None:
        self._weight *= math.exp(math.log(1.0 - self._random()) / self.size)
        skip = math.log(1.0 - self._random()) / math.log(1.0 - self._weight) if self._weight < 1.0 else math.inf
        self._next += int(min(skip, 1 << 62)) + 1

    def add(self, batch: list[str]) -> None:
        start, end = self.seen, self.seen + len(batch)
        for index in range(start, min(end, self.size)):  # the first `size` texts fill the reservoir
            self.texts.append(batch[index - start][:self.chars])
        while self._next - 1 < end:  # then each chosen text replaces a random one
            self.texts[int(self._random() * self.size)] = batch[self._next - 1 - start][:self.chars]
            self._advance()
        self.seen = end


def count_words(tokenizer, how: dict[str, Any], batches: Iterator[list[str]], pending_bytes: int = PENDING_BYTES,
                sample: Optional[SpreadSample] = None) -> tuple[dict[str, int], int, int]:
    """({word: count} over the whole corpus, words as the tokenizer's pipeline cuts them; texts; UTF-8 bytes),
    drawing `sample` from the same pass when given."""
    from lmssl._bpe import ChunkCounter

    words_of = _pipeline(tokenizer)
    counter, rest = ChunkCounter(**how), {}
    for batch in batches:
        counter.update(batch)
        if sample is not None:
            sample.add(batch)
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
