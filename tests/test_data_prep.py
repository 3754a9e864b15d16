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
