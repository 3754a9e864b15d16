"""Streaming pretraining (data.streaming: true): the stream cuts the blocks the prepared path cuts, in the same
order, on real text; a 2-process streaming run killed with SIGKILL resumes to the weights of the uninterrupted
one; recipes that cannot stream are refused by name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import free_port, shared_file
from test_objectives import train_tokenizer, wikitext_lines

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer("wordpiece", tmp_path_factory.mktemp("tok"), wikitext_lines(limit=2000), vocab_size=800)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return train_tokenizer("bytebpe", tmp_path_factory.mktemp("bpe"), wikitext_lines(limit=2000), vocab_size=800)


def _both_paths(objective_cls, options, tokenizer, data, documents, max_length):
    """(blocks of the prepared path, blocks of the stream) for one stage's data, one process."""
    from lmssl.data.streaming import TextStream
    from lmssl.recipe import DataConfig
    from lmssl.stages.pretrain import Config

    stage = Config(name="pre", objective=objective_cls.name, data=DataConfig(**data), documents=documents,
                   max_length=max_length, tokenizer_from="tok")
    objective = objective_cls(options, tokenizer, max_length)
    prepared = objective.prepare(objective_cls.read(stage, 0, "stages.pre").train)
    splits = objective_cls.read_stream(stage, 0, "stages.pre")
    stream = TextStream(splits.train, objective.packing(), tokenizer, objective.collate, "text", documents,
                        stage.data.max_chars, shuffle_buffer=0)
    return prepared, list(stream.reader().blocks())


def test_stream_cuts_the_prepared_blocks_in_order_from_line_documents(tokenizer):
    """WikiText-2 lines grouped into documents (12,000 lines: across a 10,000-line batch edge), BERT blocks with
    whole-word starts: the same input_ids and word_starts, block for block."""
    from lmssl.objectives.mlm import MaskedLM, Options

    data = {"path": "text", "files": {"train": str(shared_file("wikitext-2/train.txt.xz"))}, "max_samples": 12_000,
            "eval_fraction": 0.0}
    prepared, streamed = _both_paths(MaskedLM, Options(whole_word=True), tokenizer, data, "blank_lines", 64)
    assert len(prepared) > 1000
    assert [b["input_ids"] for b in streamed] == prepared["input_ids"]
    assert [b["word_starts"] for b in streamed] == prepared["word_starts"]
    assert len({len(ids) for ids in prepared["input_ids"]}) > 1      # shorter remainders exist and match too


def test_stream_cuts_the_prepared_blocks_in_order_from_books(bpe):
    """Two Gutenberg books (compressed; one is not UTF-8 throughout), causal blocks joined by EOS, one document
    per line: more than a 1,000-document packing group, the same blocks in the same order."""
    from lmssl.objectives.causal_lm import CausalLM, Options

    books = [str(shared_file(f"gutenberg_nltk/{name}.txt.xz")) for name in ("carroll-alice", "blake-poems")]
    data = {"path": "text", "files": {"train": books}, "eval_fraction": 0.0}
    prepared, streamed = _both_paths(CausalLM, Options(), bpe, data, "rows", 48)
    assert len(prepared) > 500
    assert [b["input_ids"] for b in streamed] == prepared["input_ids"]


def test_a_resumed_reader_continues_with_the_next_block(tokenizer):
    """The reader's state between chunks (source position, unfinished document, carry-over tokens) is all
    a resume needs: a reader built from it yields exactly the blocks the first one went on to yield."""
    from lmssl.data.streaming import DocumentReader, open_source
    from lmssl.objectives.mlm import MaskedLM, Options
    from lmssl.recipe import DataConfig

    data = DataConfig(path="text", files={"train": str(shared_file("wikitext-2/train.txt.xz"))}, max_samples=3000)
    packing = MaskedLM(Options(), tokenizer, 64).packing()
    source = open_source(data, "stages.pre")
    reader = DocumentReader(source, 0, 1, packing, tokenizer, "text", "blank_lines", 1_000_000)
    for _ in range(7):
        reader.next_chunk()
    state = json.loads(json.dumps(reader.state()))                 # as a checkpoint keeps it
    assert state["packer"]["ids"] and state["source"] is not None and "examples_iterable" in json.dumps(state)
    expected = [b["input_ids"] for _ in range(5) for b in reader.next_chunk()]
    again = DocumentReader(source, 0, 1, packing, tokenizer, "text", "blank_lines", 1_000_000, state)
    assert [b["input_ids"] for _ in range(5) for b in again.next_chunk()] == expected
    assert expected


def test_recipes_that_cannot_stream_are_refused(tmp_path):
    from lmssl import load_recipe
    from lmssl.errors import RecipeError

    base = {"name": "s", "stages": [{"name": "tok", "kind": "tokenizer", "vocab_size": 800,
                                     "data": {"path": "builtin:pydocs", "max_samples": 200}},
                                    {"name": "pre", "kind": "pretrain", "tokenizer_from": "tok",
                                     "model": {"family": "bert", "size": "tiny"},
                                     "data": {"path": "builtin:pydocs", "streaming": True}}]}
    import copy

    import yaml

    def load(change):
        recipe = copy.deepcopy(base)
        change(recipe["stages"][1])
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return load_recipe(path)

    with pytest.raises(RecipeError, match=r"stages\.pre\.max_steps: a streamed corpus"):
        load(lambda s: None)
    with pytest.raises(RecipeError, match=r"stages\.pre\.data\.streaming: the mlm_nsp objective cannot"):
        load(lambda s: s.update(objective="mlm_nsp", max_steps=10))
    with pytest.raises(RecipeError, match=r"stages\.pre\.data\.shuffle_buffer"):
        load(lambda s: s.update(max_steps=10, data={**s["data"], "shuffle_buffer": -1}))
    assert load(lambda s: s.update(max_steps=10)).stages[1].data.streaming


def _books(*names):
    return [str(shared_file(f"gutenberg_nltk/{name}.txt.xz")) for name in names]


def test_workers_resumed_mid_turn_hand_out_the_batches_of_the_uninterrupted_stream(tokenizer):
    """Two DataLoader workers (one book each), a shuffle window, MLM masks drawn in the workers: restarted
    from the states the loop kept after micro-batch 5 (worker 1's turn), the loader yields micro-batches 5...
    of the uninterrupted stream, masks included, and nothing before them."""
    import itertools

    from lmssl.data.streaming import TextStream, open_source
    from lmssl.objectives.mlm import MaskedLM, Options
    from lmssl.recipe import DataConfig

    objective = MaskedLM(Options(), tokenizer, 32)
    source = open_source(DataConfig(path="text", files={"train": _books("blake-poems", "carroll-alice")}), "pre")
    stream = TextStream(source, objective.packing(), tokenizer, objective.collate, "text", "rows", 1_000_000,
                        shuffle_buffer=24)
    batches, workers = stream.loader(4, 0, 1, 7, 0, 2, None, False, "stages.pre")
    assert workers == 2
    full = list(itertools.islice(batches, 14))
    assert [b["_state"]["worker"] for b in full] == [0, 1] * 7
    kept = [None, None]
    for batch in full[:5]:
        kept[batch["_state"]["worker"]] = json.loads(json.dumps(batch["_state"]))   # as data-<rank>.json holds it
    again, _ = stream.loader(4, 0, 1, 7, 5, 2, {"workers": 2, "streams": kept}, False, "stages.pre")
    resumed = list(itertools.islice(again, 9))
    for want, got in zip(full[5:], resumed, strict=True):
        assert got["_key"] == want["_key"]
        for name in ("input_ids", "labels", "attention_mask"):
            assert torch.equal(got[name], want[name]), name
    firsts = [b["input_ids"][0].tolist() for b in full]
    assert len({tuple(r) for r in firsts}) == len(firsts), "every micro-batch is new: nothing repeats"
    with pytest.raises(Exception, match="num_workers"):
        stream.loader(4, 0, 1, 7, 5, 1, {"workers": 2, "streams": kept}, False, "stages.pre")


RECIPE = """\
name: stream
seed: 3
stages:
  - {name: tok, kind: tokenizer, vocab_size: 600, data: {path: text, files: BOOKS, max_samples: 3000}}
  - name: pre
    kind: pretrain
    objective: mlm
    tokenizer_from: tok
    model: {family: bert, size: tiny}
    data: {path: text, files: BOOKS, streaming: true, shuffle_buffer: 32}
    max_length: 32
    batch_size: 8
    max_steps: 30
    log_every: 5
    save_every: 5
    num_workers: 2
    checkpoint_format: dcp
"""


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _launch(recipe: Path, run_dir: Path, port: int):
    return ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--main_process_port", str(port), "-m", "lmssl", "run", str(recipe), "--run-dir", str(run_dir)]


@pytest.mark.skipif(__import__("shutil").which("accelerate") is None, reason="the accelerate CLI is not on PATH")
def test_killed_two_process_streaming_run_resumes_to_the_uninterrupted_weights(tmp_path):
    """Two processes, each with two DataLoader workers reading one of its two books (four books split by
    split_dataset_by_node), killed with SIGKILL after its first checkpoint and run again: the final weights
    equal those of the uninterrupted run bit for bit, and the data states were what it resumed from. The
    checkpoints go through torch.distributed.checkpoint (checkpoint_format: dcp, as FSDP's do): every rank
    writes its shard, the manifest covers them."""
    import shutil

    import psutil

    books = json.dumps(_books("blake-poems", "carroll-alice", "shakespeare-caesar", "shakespeare-macbeth"))
    recipe = tmp_path / "stream.yaml"
    recipe.write_text(RECIPE.replace("BOOKS", books))
    whole = subprocess.run(_launch(recipe, tmp_path / "whole", free_port()), capture_output=True, text=True,
                           env=_env(), cwd=tmp_path, timeout=600)
    assert whole.returncode == 0, whole.stderr[-4000:]
    run_dir = tmp_path / "killed"
    shutil.copytree(tmp_path / "whole" / "tok", run_dir / "tok")   # tokenizer trainers differ between processes
    log = tmp_path / "killed.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(_launch(recipe, run_dir, free_port()), stdout=sink, stderr=subprocess.STDOUT,
                                env=_env(), cwd=tmp_path, start_new_session=True)
    deadline = time.time() + 300
    while proc.poll() is None and not list(run_dir.glob(".partial/pre-*/checkpoints/step-*")):
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed: " + log.read_text()[-3000:]
    launcher = psutil.Process(proc.pid)
    tree = [launcher, *launcher.children(recursive=True)]
    for p in tree:                       # the launcher, both ranks and their DataLoader workers
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:     # a worker that ended on its own meanwhile
            pass
    proc.wait()
    psutil.wait_procs(tree, timeout=30)
    assert not (run_dir / "pre").exists(), "the run finished before it could be killed"
    newest = sorted(run_dir.glob(".partial/pre-*/checkpoints/step-*"))[-1]
    manifest = json.loads((newest / "manifest.json").read_text())["files"]
    shards = sorted(p.name for p in (newest / "dcp").glob("*.distcp"))
    assert len(shards) == 2 and all(f"dcp/{name}" in manifest for name in shards)
    assert "model.safetensors" not in manifest and "dcp/.metadata" in manifest
    for rank in (0, 1):
        saved = json.loads((newest / f"data-{rank}.json").read_text())
        assert saved["workers"] == 2 and all(s is not None and s["next_g"] > 0 for s in saved["streams"])
    again = subprocess.run(_launch(recipe, run_dir, free_port()), capture_output=True, text=True, env=_env(),
                           cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"resuming from {newest.name}" in again.stdout + again.stderr
    expected = load_file(tmp_path / "whole" / "pre" / "model.safetensors")
    got = load_file(run_dir / "pre" / "model.safetensors")
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), f"{name} differs after kill/resume"


@pytest.mark.parametrize("documents", ["blank_lines", "rows"])
def test_processes_split_a_one_file_stream_into_disjoint_parts_that_cover_it(tokenizer, documents):
    """One file cannot be split by shards: documents are then dealt out whole, one in two per process (a split
    by rows would cut line documents, and would hand one process all of WikiText's blank lines). The two parts
    are disjoint, as large, and together hold every document of the single-process stream."""
    from collections import Counter

    from lmssl.data.streaming import DocumentReader, open_source
    from lmssl.objectives.mlm import MaskedLM, Options
    from lmssl.recipe import DataConfig

    data = DataConfig(path="text", files={"train": str(shared_file("wikitext-2/valid.txt.xz"))}, max_samples=4000)
    packing = MaskedLM(Options(), tokenizer, 64).packing()
    source = open_source(data, "stages.pre")

    def documents_of(rank, world):
        reader = DocumentReader(source, rank, world, packing, tokenizer, "text", documents, 1_000_000)
        docs, ended = [], False
        while not ended:
            chunk, ended = reader._documents(64)
            docs += chunk
        return docs

    whole, parts = documents_of(0, 1), [documents_of(r, 2) for r in (0, 1)]
    assert len(whole) > 100 and all(len(p) >= len(whole) // 2 - 1 for p in parts)
    assert Counter(parts[0]) + Counter(parts[1]) == Counter(whole)
    assert parts[0] == whole[0::2] and parts[1] == whole[1::2]


def test_a_stream_with_no_usable_text_is_a_clear_error_from_a_worker(tokenizer, tmp_path):
    """The error is raised inside a DataLoader worker; the user sees its message, not the worker's traceback."""
    import itertools

    from lmssl.data.streaming import TextStream, open_source
    from lmssl.errors import LmsslError
    from lmssl.objectives.mlm import MaskedLM, Options
    from lmssl.recipe import DataConfig

    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n\t\n")
    objective = MaskedLM(Options(), tokenizer, 32)
    source = open_source(DataConfig(path="text", files={"train": str(blank)}), "stages.pre")
    stream = TextStream(source, objective.packing(), tokenizer, objective.collate, "text", "rows", 1_000_000, 0)
    batches, workers = stream.loader(4, 0, 1, 0, 0, 1, None, False, "stages.pre")
    assert workers == 1
    with pytest.raises(LmsslError) as caught:
        list(itertools.islice(batches, 2))
    assert str(caught.value).startswith("the streamed training data has no usable text for this process")
    assert "Traceback" not in str(caught.value)
