"""Preparing text for pretraining: tokenized by several processes for large sources (the same ids as one),
stored compactly, and cached: a second run reads the prepared blocks instead of computing them again."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest

from conftest import shared_file
from test_objectives import train_tokenizer, wikitext_lines


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer("bytebpe", tmp_path_factory.mktemp("tok"), wikitext_lines(limit=2000), vocab_size=800)


def _lines(tmp_path, limit=None):
    from lmssl.data.text import _load
    from lmssl.recipe import DataConfig

    data = _load(DataConfig(path="text", files=str(shared_file("wikitext-2/train.txt.xz"))), "train")
    return data if limit is None else data.select(range(limit))


def test_several_tokenizing_processes_give_the_ids_of_one(tokenizer, tmp_path, monkeypatch):
    import lmssl.data.packing as packing

    assert packing.prep_processes(100) is None                 # small sources stay in this process
    assert packing.prep_processes(10**9) == len(__import__("os").sched_getaffinity(0)) or \
        len(__import__("os").sched_getaffinity(0)) == 1       # large ones take every CPU
    data = _lines(tmp_path, limit=6000)
    monkeypatch.setattr(packing, "prep_processes", lambda n: 2)
    parallel = packing.tokenize_column(data, tokenizer, "text", append=[tokenizer.eos_token_id])
    monkeypatch.setattr(packing, "prep_processes", lambda n: None)
    single = packing.tokenize_column(data, tokenizer, "text", append=[tokenizer.eos_token_id],
                                     desc="tokenizing again")
    assert parallel.features["ids"].feature.dtype == "int32"
    assert len(parallel) == len(single) > 3000
    assert parallel["ids"] == single["ids"]


def test_prepared_blocks_are_read_back_on_a_second_run_not_recomputed(tokenizer, tmp_path):
    from lmssl.objectives.causal_lm import CausalLM, Options

    data = _lines(tmp_path, limit=3000)
    folder = Path(data.cache_files[0]["filename"]).parent if data.cache_files else None
    objective = CausalLM(Options(), tokenizer, 64)
    first = objective.prepare(data)
    made = {p.name: p.stat().st_mtime_ns for p in folder.glob("cache-*.arrow")}
    assert first.cache_files and all(Path(f["filename"]).name in made for f in first.cache_files)
    again = CausalLM(Options(), tokenizer, 64).prepare(data)   # another objective: the same fingerprints
    assert [f["filename"] for f in again.cache_files] == [f["filename"] for f in first.cache_files]
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("cache-*.arrow")} == made   # nothing written
    assert again["input_ids"] == first["input_ids"]


def test_the_backend_fast_path_gives_the_ids_of_the_tokenizer_call(tokenizer):
    """Packing.encode skips the transformers wrapper (encode_batch_fast on the backend) when the backend neither
    truncates nor pads; the ids must be exactly those of tokenizer(texts), EOS appended, on real lines."""
    from lmssl.data.packing import Packing

    texts = [t for t in _lines(None, limit=3000)["text"] if t.strip()]
    spec = Packing(64, append=(tokenizer.eos_token_id,))
    fast = [ids for ids, _ in spec.encode(tokenizer, texts)]
    slow = [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    assert fast == slow and len(fast) > 1000
    tokenizer.backend_tokenizer.enable_truncation(8)      # a backend that truncates: the wrapper's path, untruncated
    try:
        assert [ids for ids, _ in spec.encode(tokenizer, texts[:50])] == slow[:50]
    finally:
        tokenizer.backend_tokenizer.no_truncation()


def test_block_packer_cuts_what_a_hand_concatenation_gives(monkeypatch):
    """Documents joined by the separator, cut every content_length tokens, each block wrapped in prefix and
    suffix, a group's remainder kept as a shorter block; a document without tokens adds no separator; the
    group ends after DOCS_PER_GROUP documents (3 here), and the next group starts without a separator."""
    import lmssl.data.packing as packing

    monkeypatch.setattr(packing, "DOCS_PER_GROUP", 3)
    spec = packing.Packing(4, separator=(0,), prefix=(101,), suffix=(102,))
    packer = packing.BlockPacker(spec)
    docs = [[1, 2, 3], [], [4, 5, 6, 7, 8], [9], [10, 11]]
    blocks = [b["input_ids"] for d in docs for b in packer.add(d)] + [b["input_ids"] for b in packer.flush()]
    # group 1: 1 2 3 0 4 5 6 7 8 -> [1 2 3 0] [4 5 6 7] [8]; group 2: 9 0 10 11 -> [9 0 10 11]
    assert blocks == [[101, 1, 2, 3, 0, 102], [101, 4, 5, 6, 7, 102], [101, 8, 102], [101, 9, 0, 10, 11, 102]]


def test_prepare_stores_the_packer_blocks_as_compact_columns(tokenizer, monkeypatch):
    """Packing.prepare hands each map batch's blocks to Arrow as flat arrays (blocks_table), tokenizing
    ENCODE_DOCS documents per call: the rows must be exactly what BlockPacker cuts from the same documents,
    group by group, word starts included, stored as uint16 ids and int8 starts."""
    import lmssl.data.packing as packing
    from lmssl.data.text import to_documents

    monkeypatch.setattr(packing, "ENCODE_DOCS", 7)        # calls that do not divide a group
    documents = to_documents(_lines(None, limit=12000), "text", "blank_lines")
    spec = packing.Packing(62, separator=(3,), prefix=(2,), suffix=(3,), word_starts=True)
    prepared = spec.prepare(documents, tokenizer)
    assert prepared.features["input_ids"].feature.dtype == "uint16"
    assert prepared.features["word_starts"].feature.dtype == "int8"
    texts = [t for t in documents["text"] if t.strip()]
    expected = []
    for first in range(0, len(texts), packing.DOCS_PER_GROUP):
        packer = packing.BlockPacker(spec)
        for ids, starts in spec.encode(tokenizer, texts[first:first + packing.DOCS_PER_GROUP]):
            expected += packer.add(ids, starts)
        expected += packer.flush()
    assert len(texts) > packing.DOCS_PER_GROUP and len(expected) > 100
    assert prepared["input_ids"] == [b["input_ids"] for b in expected]
    assert prepared["word_starts"] == [b["word_starts"] for b in expected]
    assert {len(ids) for ids in prepared["input_ids"][:-1]} >= {64}


def test_blocks_table_keeps_lengths_values_and_types(monkeypatch):
    import lmssl.data.packing as packing

    dtypes = {"input_ids": "int32", "word_starts": "int8"}
    blocks = [{"input_ids": [70_000, 1, 2], "word_starts": [1, 0, 1]}, {"input_ids": [5], "word_starts": [1]}]
    table = packing.blocks_table(blocks, dtypes)
    assert table.to_pydict() == {"input_ids": [[70_000, 1, 2], [5]], "word_starts": [[1, 0, 1], [1]]}
    assert str(table.schema.field("input_ids").type) == "list<item: int32>"
    assert packing.blocks_table([], dtypes).num_rows == 0
    packing.release_memory()                                # glibc here
    monkeypatch.setattr(packing, "_libc_trim", lambda: None)
    packing.release_memory()                                # no glibc (macOS, musl): Arrow's pool only
