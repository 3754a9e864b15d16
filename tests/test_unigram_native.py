"""The native Unigram trainer (lmssl._unigram) on real text: a usable vocabulary, every character
kept, deterministic across dict order and threads; tiny inputs with known answers; bad input named."""

from __future__ import annotations

import collections
import itertools
import lzma
import math
import random

import pytest
from conftest import shared_file

unigram = pytest.importorskip("lmssl._unigram", reason="the C extension is not built (python setup.py build_ext --inplace)")
tokenizers = pytest.importorskip("tokenizers")
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers  # noqa: E402

NFKC = normalizers.NFKC()
METASPACE = dict(replacement="▁", prepend_scheme="always", split=True)
VOCAB = 4000  # the smallest round size whose held-out fertility on this slice is below 1.6


def _lines(relative: str, n: int) -> list[str]:
    with lzma.open(shared_file(relative), "rt", encoding="utf-8") as f:
        return list(itertools.islice((line.rstrip("\n") for line in f if line.strip()), n))


def _word_counts(lines: list[str]) -> collections.Counter:
    """The reference counter: HF's own NFKC + Metaspace pipeline, one word at a time."""
    pre = pre_tokenizers.Metaspace(**METASPACE)
    counts = collections.Counter()
    for line in lines:
        counts.update(word for word, _ in pre.pre_tokenize_str(NFKC.normalize_str(line)))
    return counts


def _hf_tokenizer(vocab: list[tuple[str, float]]) -> Tokenizer:
    tok = Tokenizer(models.Unigram(vocab + [("<unk>", 0.0)], unk_id=len(vocab)))
    tok.normalizer = NFKC
    tok.pre_tokenizer = pre_tokenizers.Metaspace(**METASPACE)
    tok.decoder = decoders.Metaspace(**METASPACE)
    return tok


@pytest.fixture(scope="module")
def train_lines() -> list[str]:
    return _lines("wikitext-2/train.txt.xz", 3000)


@pytest.fixture(scope="module")
def counts(train_lines) -> collections.Counter:
    return _word_counts(train_lines)


@pytest.fixture(scope="module")
def vocab(counts) -> list[tuple[str, float]]:
    return unigram.train(counts, VOCAB)


def test_returns_vocab_size_pieces_with_every_character(counts, vocab):
    pieces = [piece for piece, _ in vocab]
    assert len(vocab) == VOCAB and len(set(pieces)) == VOCAB
    assert {c for word in counts for c in word} <= set(pieces)
    assert all(isinstance(p, str) and 1 <= len(p) <= 16 for p in pieces)
    assert all("▁" not in p[1:] for p in pieces), "the space mark may only start a piece"


def test_scores_are_sorted_log_probabilities(vocab):
    assert vocab == sorted(vocab, key=lambda item: (-item[1], item[0]))
    assert all(math.isfinite(score) and score < 0 for _, score in vocab)
    assert sum(math.exp(score) for _, score in vocab) <= 1 + 1e-6


def test_learns_multi_character_subwords(vocab):
    pieces = {piece for piece, _ in vocab}
    assert {"▁the", "▁of", "▁and", "ing", "ed"} <= pieces
    assert sum(len(p) > 1 for p in pieces) > 0.9 * len(pieces)
    assert vocab[0][0].startswith("▁") and len(vocab[0][0]) > 1  # the most probable piece is a word


def test_hf_unigram_built_from_the_vocab_round_trips_text(train_lines, vocab):
    tok = _hf_tokenizer(vocab)
    for line in train_lines[:500]:
        text = line.strip()  # Metaspace(prepend_scheme="always") decodes without the leading space
        encoding = tok.encode(text)
        assert "<unk>" not in encoding.tokens, text
        assert tok.decode(encoding.ids) == NFKC.normalize_str(text)


def test_held_out_fertility_below_1_6_tokens_per_word(vocab):
    held_out = _lines("wikitext-2/valid.txt.xz", 500)
    words = sum(len(line.split()) for line in held_out)
    tokens = sum(len(e.ids) for e in _hf_tokenizer(vocab).encode_batch(held_out))
    assert tokens / words < 1.6


def test_same_result_for_any_dict_order_and_thread_count(counts, vocab):
    items = list(counts.items())
    random.Random(0).shuffle(items)
    assert unigram.train(dict(items), VOCAB) == vocab
    assert unigram.train(counts, VOCAB, threads=2) == vocab
    assert unigram.train(counts, VOCAB, threads=3) == vocab


def test_unicode_words_give_valid_pieces():
    words = {"▁日本語": 7, "▁日本": 5, "▁中文文本": 3, "▁😀🚀": 4, "▁👩‍👩‍👧": 2, "▁café": 6, "▁naïve": 2,
             "▁Ωμέγα": 3, "▁𝔘𝔫𝔦": 2, "▁a▁b": 3, "▁": 9}
    vocab = unigram.train(words, 60)
    pieces = {piece for piece, _ in vocab}
    assert {c for word in words for c in word} <= pieces
    assert {"▁日本", "▁café"} <= pieces
    assert all(piece.encode("utf-8").decode("utf-8") == piece for piece in pieces)
    assert all("▁" not in p[1:] for p in pieces)


def test_one_word_gives_its_characters_and_itself_first():
    vocab = unigram.train({"▁ab": 10}, 4)
    assert [piece for piece, _ in vocab][0] == "▁ab"
    assert {piece for piece, _ in vocab} == {"▁", "a", "b", "▁ab"}


def test_returns_every_substring_when_the_words_cannot_fill_vocab_size():
    vocab = unigram.train({"▁ab": 10, "▁zz": 0}, 100)  # a word counted 0 times is not in the corpus
    assert {piece for piece, _ in vocab} == {"▁", "a", "b", "▁a", "ab", "▁ab"}


def test_substrings_seen_once_are_not_pieces():
    vocab = unigram.train({"▁abc": 1, "▁abd": 1}, 50)
    assert {piece for piece, _ in vocab} == {"▁", "a", "b", "c", "d", "▁a", "ab", "▁ab"}


def test_counts_beyond_32_bits():
    vocab = unigram.train({"▁ab": 3 << 40, "▁ba": 1 << 40}, 6)
    assert len(vocab) == 6 and all(math.isfinite(score) for _, score in vocab)
    assert [piece for piece, _ in vocab][:2] == ["▁ab", "▁ba"]


def test_vocab_smaller_than_the_alphabet_names_the_character_count():
    with pytest.raises(ValueError, match=r"smaller than the 5 distinct characters"):
        unigram.train({"▁abcd": 3}, 4)


@pytest.mark.parametrize(
    ("words", "kwargs", "error", "message"),
    [
        ({"▁a": 1}, {"vocab_size": 0}, ValueError, "vocab_size must be >= 1"),
        ({"▁a": 1}, {"vocab_size": 10, "max_piece_length": 0}, ValueError, "max_piece_length"),
        ({"▁a": 1}, {"vocab_size": 10, "shrinking_factor": 1.0}, ValueError, "shrinking_factor"),
        ({"▁a": 1}, {"vocab_size": 10, "n_sub_iterations": 0}, ValueError, "n_sub_iterations"),
        ({"▁a": 1}, {"vocab_size": 10, "seed_size": 0}, ValueError, "seed_size"),
        ({"▁a": 1}, {"vocab_size": 10, "threads": 0}, ValueError, "threads"),
        ({"▁a": -1}, {"vocab_size": 10}, ValueError, "negative"),
        ({"▁a": 1.5}, {"vocab_size": 10}, TypeError, "must be an int, not float"),
        ({"▁a": "3"}, {"vocab_size": 10}, TypeError, "must be an int, not str"),
        ({"▁a": True}, {"vocab_size": 10}, TypeError, "must be an int, not bool"),
        ({b"\xe2\x96\x81a": 1}, {"vocab_size": 10}, TypeError, "must map str to int"),
        ({"▁a": 1 << 63}, {"vocab_size": 10}, ValueError, "does not fit in 64 bits"),
        ({"▁a": (1 << 62) + 1, "▁b": 1 << 62}, {"vocab_size": 10}, ValueError, "sum past"),
        ([("▁a", 1)], {"vocab_size": 10}, TypeError, "must be a dict"),
    ],
)
def test_bad_input_is_named(words, kwargs, error, message):
    with pytest.raises(error, match=message):
        unigram.train(words, **kwargs)
