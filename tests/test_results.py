"""The results suite (`lmssl results`, recipes/results/) and the perplexity stage it scores causal LMs with.

The smoke version runs the whole suite (tokenizers, mlm, mlm_nsp, GLUE x 6 tasks, causal LM + WikiText-2
test perplexity, SimCLR + MAE + probes) with tiny models on slices of the real data; the tests check that
every cell of RESULTS.md is the number the stages wrote, computed again here from their own files."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest
import torch

from conftest import REPO, data_root, shared_file
from lmssl.__main__ import main
from lmssl.stages.perplexity import count_words, score_stream, windows


@pytest.mark.parametrize("n,length,stride", [(2, 4, 4), (10, 4, 4), (100, 16, 16), (100, 16, 5), (97, 8, 1), (5, 64, 64)])
def test_windows_score_every_target_once_with_context(n, length, stride):
    spans = windows(n, length, stride)
    targets = [t for _, end, first in spans for t in range(first, end)]
    assert targets == list(range(1, n))                       # each position after the first, once, in order
    for start, end, first in spans:
        assert end - start <= length and start < first        # a window fits and every target has context
        if first > 1 and first - start < length - min(stride, length - 1):
            assert start == 0                                 # short context only at the stream's start


def _tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()


def test_score_stream_equals_the_models_own_loss_and_depends_on_context():
    model = _tiny_gpt2()
    ids = torch.randint(0, 50, (60,), generator=torch.Generator().manual_seed(1)).tolist()
    nll, count = score_stream(model, ids, 64, 64, 4, "cpu")   # one window holds the whole stream
    with torch.no_grad():
        reference = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert int(count) == len(ids) - 1
    assert float(nll) / int(count) == pytest.approx(reference, rel=1e-5)
    one, _ = score_stream(model, ids, 16, 4, 1, "cpu")          # padded batches score what single windows do
    many, n = score_stream(model, ids, 16, 4, 7, "cpu")
    assert int(n) == len(ids) - 1 and float(many) == pytest.approx(float(one), rel=1e-6)
    short, _ = score_stream(model, ids, 16, 15, 7, "cpu")       # less context per token: another number
    assert abs(float(short) - float(many)) > 1e-4
    halves = [score_stream(model, ids, 16, 4, 3, "cpu", (rank, 2)) for rank in (0, 1)]
    assert sum(float(h[0]) for h in halves) == pytest.approx(float(many), rel=1e-6)   # two processes' shares
    assert sum(int(h[1]) for h in halves) == len(ids) - 1


def test_wikitext2_test_word_count_is_the_published_one():
    from lmssl.data.text import _load
    from lmssl.recipe import DataConfig

    path = shared_file("wikitext-2/test.txt.xz")
    lines = _load(DataConfig(path="text", files={"test": str(path)}), "test")["text"]
    assert len(lines) == 4358
    assert count_words(lines, "words_and_lines") == 245_569    # ../shared/data README: tokens incl. <eos>
    assert count_words(lines, "words") == 245_569 - 4358


def test_compressed_text_with_bad_bytes_reads_with_replacement(tmp_path):
    """datasets 5 drops encoding_errors for .xz files; lmssl reads local text files itself."""
    import lzma

    from lmssl.data.text import _load
    from lmssl.recipe import DataConfig

    path = tmp_path / "book.txt.xz"
    with lzma.open(path, "wb") as handle:
        handle.write("caf\u00e9 ok\n".encode("latin-1") + "plain line\n\nlast\n".encode())
    rows = _load(DataConfig(path="text", files=str(path)), "train")["text"]
    assert rows == ["caf\ufffd ok", "plain line", "", "last"]


def test_perplexity_stage_refuses_a_masked_lm_and_a_stride_beyond_the_window(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "stages:\n"
        "  - {name: tok, kind: tokenizer, spec: bert-wordpiece, vocab_size: 500}\n"
        "  - {name: lm, kind: pretrain, objective: mlm, tokenizer_from: tok, max_steps: 2}\n"
        "  - {name: ppl, kind: perplexity, model_from: lm, data: {path: builtin:pydocs}}\n")
    assert main(["validate", str(recipe)]) == 2
    assert "stages.ppl.model_from: stage 'lm' trains mlm" in capsys.readouterr().err
    recipe.write_text(recipe.read_text().replace("bert-wordpiece", "gpt2-bytebpe")
                      .replace("objective: mlm", "objective: causal_lm, model: {family: gpt2}"))
    assert main(["validate", str(recipe)]) == 0
    recipe.write_text(recipe.read_text().replace("path: builtin:pydocs}", "path: builtin:pydocs}, max_length: 16, stride: 32"))
    assert main(["validate", str(recipe)]) == 2
    assert "stages.ppl.stride: 32 is beyond max_length 16" in capsys.readouterr().err


def test_results_command_refuses_a_folder_without_a_suite(tmp_path, capsys):
    assert main(["results", "--recipes", str(tmp_path), "--run-dir", str(tmp_path / "runs")]) == 2
    assert "suite.yaml" in capsys.readouterr().err
    (tmp_path / "suite.yaml").write_text("recipes: [a.yaml]\nsmoke: {b.yaml: []}\n")
    (tmp_path / "a.yaml").write_text("stages: []\n")
    assert main(["results", "--recipes", str(tmp_path), "--run-dir", str(tmp_path / "runs")]) == 2
    assert "'b.yaml' is not one of the recipes" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- the whole suite, smoke version

def _cells(markdown: str, heading: str) -> list[list[str]]:
    """The body rows of the first table after `heading`, as lists of cells."""
    part = markdown.split(heading, 1)[1]
    rows, started = [], False
    for line in part.splitlines():
        if line.startswith("|"):
            started = True
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not set("".join(cells)) <= set("-: "):
                rows.append(cells)
        elif started:
            break
    return rows[1:]                                           # without the header


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    shared_file("glue/CoLA/train.tsv.xz")
    shared_file("cifar10/sample")
    out = tmp_path_factory.mktemp("results")
    argv = ["results", "--smoke", "--recipes", str(REPO / "recipes" / "results"), "--run-dir", str(out / "runs"),
            "--out", str(out / "RESULTS.md"), "--data-dir", str(data_root())]
    assert main(argv) == 0
    return out, argv


def _stage_results(runs: Path, recipe: str, stage: str) -> dict:
    return json.loads((runs / recipe / stage / "results.json").read_text())


def test_smoke_results_table_holds_what_the_stages_wrote(smoke):
    out, _ = smoke
    text = (out / "RESULTS.md").read_text()
    runs = out / "runs"
    # GLUE: one row per task and metric, the two pretrainings and scratch, mean ± std of 2 seeds (mlm_nsp: 1)
    rows = {(r[0], r[1]): r for r in _cells(text, "## GLUE") if not r[0].startswith("**")}
    mlm = _stage_results(runs, "text", "glue-mlm")["results"]
    nsp = _stage_results(runs, "text", "glue-mlm_nsp")["results"]
    assert set(rows) == {(r["task"], r["metric"]) for r in mlm} and len(rows) == 8   # 6 tasks, mrpc/stsb x2
    for column, source in ((3, [r for r in mlm if r["init"] == "pretrained"]), (4, nsp),
                           (5, [r for r in mlm if r["init"] == "scratch"])):
        for r in source:
            spread = statistics.stdev(r["scores"]) if len(r["scores"]) > 1 else 0.0   # mlm_nsp: one seed
            mean, std = 100 * statistics.fmean(r["scores"]), 100 * spread
            assert rows[(r["task"], r["metric"])][column] == f"{mean:.1f} ± {std:.1f}"
    assert rows[("mrpc", "f1")][6] == "81.1" and rows[("sst2", "accuracy")][7] == "85.9"   # published rows
    # where pretraining does not beat scratch: the list matches the task scores recomputed here
    def task_scores(results, init):
        by_task = {}
        for r in results:
            if r["init"] == init:
                by_task.setdefault(r["task"], []).append(statistics.fmean(r["scores"]))
        return {t: statistics.fmean(v) for t, v in by_task.items()}
    scratch = task_scores(mlm, "scratch")
    expected = {(name, t) for name, results in (("mlm", mlm), ("mlm_nsp", nsp))
                for t, v in task_scores(results, "pretrained").items() if v <= scratch[t]}
    section = text.split("### Where pretraining does not beat scratch", 1)[1].split("\n## ", 1)[0]
    assert set(re.findall(r"`(\w+)` on \*\*(\w+)\*\*", section)) == expected
    # perplexity: per word is the summed NLL over the word count of the scored lines
    metrics = _stage_results(runs, "causal", "test-perplexity")["metrics"]
    assert metrics["words"] > 0 and metrics["targets"] > metrics["words"]
    per_word = math.exp(metrics["loss"] * metrics["targets"] / metrics["words"])
    row = _cells(text, "## Causal LM")[0]
    assert row[5] == f"**{per_word:.2f}**" and row[4] == f"{math.exp(metrics['loss']):.2f}"
    # vision: a row per backbone and scratch, numbers from the probe stage
    probes = {r[0]: r for r in _cells(text, "## Vision")}
    for r in _stage_results(runs, "vision", "probe")["results"]:
        assert probes[r["backbone"]][3] == f"{100 * r['top1']:.1f}"
        assert probes[r["backbone"]][4] == f"{100 * r['knn_top1']:.1f}"
    assert set(probes) == {"simclr", "mae", "scratch"}
    # wall time: every stage of the three recipes, and their sum
    times = _cells(text, "## Wall time per stage")
    assert [r[1] for r in times[:-1]] == ["tokenizer", "mlm", "mlm_nsp", "glue-mlm", "glue-mlm_nsp", "tokenizer",
                                           "gpt2", "test-perplexity", "simclr", "mae", "probe"]
    seconds = [json.loads(p.read_text())["seconds"] for p in sorted(runs.glob("*/*/stage.json"))]
    assert times[-1][3].startswith(f"**{sum(seconds):.0f} s")
    for png in ("glue.png", "vision.png"):
        assert (out / "results-plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(results-plots/{png})" in text


def test_smoke_results_rerun_skips_every_finished_stage(smoke, capsys):
    out, argv = smoke
    finished = {p: json.loads(p.read_text())["finished"] for p in (out / "runs").glob("*/*/stage.json")}
    assert len(finished) == 11
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("up to date, skipped") == 11
    assert {p: json.loads(p.read_text())["finished"] for p in finished} == finished
    assert "## GLUE" in (out / "RESULTS.md").read_text()
