"""report_to goes through Accelerate's trackers (TensorBoard by default, metrics.jsonl always), missing or
unknown trackers are recipe errors, every run folder carries its plots linked from summary.md, and the
shipped two-process CPU config really starts two processes."""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest

from lmssl import load_recipe
from lmssl.__main__ import main
from lmssl.runner import run_recipe

REPO = Path(__file__).resolve().parent.parent

TOKENIZER = '{name: tok, kind: tokenizer, vocab_size: 300, data: {path: "builtin:pydocs", max_samples: 300}}'
PRETRAIN = """\
  - name: pre
    kind: pretrain
    tokenizer_from: TOK
    model: {family: bert, size: tiny}
    data: {path: "builtin:pydocs", max_samples: 300}
    max_length: 32
    batch_size: 8
    learning_rate: 2.0e-3
    max_steps: 6
    log_every: 2
    eval_every: 3
"""
FINETUNE = """\
  - name: ft
    kind: finetune
    model_from: pre
    tasks: [pydocs-topic]
    max_train_samples: 128
    seeds: [0, 1]
    scratch_baseline: true
    max_length: 32
    batch_size: 32
    learning_rate: 2.0e-3
    epochs: 1
"""


def _recipe(folder: Path, head: str = "", stages: str = PRETRAIN + FINETUNE, tok: str = "tok") -> Path:
    text = f"name: tracked\nseed: 0\n{head}stages:\n"
    text += (f"  - {TOKENIZER}\n" if tok == "tok" else "") + stages.replace("TOK", tok)
    path = folder / "recipe.yaml"
    path.write_text(text)
    return path


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """tokenizer -> pretrain -> finetune (two seeds, with a scratch baseline), default report_to."""
    root = tmp_path_factory.mktemp("tracked")
    run_recipe(load_recipe(_recipe(root)), run_dir=root / "run")
    return root / "run"


def test_tensorboard_is_the_default_and_its_scalars_equal_metrics_jsonl(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list((run / "pre" / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(run / "pre" / "tensorboard"))
    events.Reload()
    logged = {r["step"]: r["train/loss"] for r in _records(run / "pre" / "metrics.jsonl") if "train/loss" in r}
    assert sorted(logged) == [2, 4, 6]
    board = {e.step: e.value for e in events.Scalars("train/loss")}
    assert board == pytest.approx(logged, rel=1e-6)
    assert {e.step for e in events.Scalars("eval/loss")} == {3, 6}
    # every training loop of a stage has its own: each fine-tuning run, in its run folder
    assert list((run / "ft" / "runs" / "pydocs-topic-scratch-seed1" / "tensorboard").glob("events.out.tfevents.*"))


def test_report_to_none_writes_metrics_jsonl_and_no_tensorboard_folder(tmp_path, run):
    recipe = _recipe(tmp_path, head="report_to: [none]\n", stages=PRETRAIN, tok=str(run / "tok"))
    run_recipe(load_recipe(recipe), run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "pre" / "tensorboard").exists()
    assert [r["step"] for r in _records(tmp_path / "run" / "pre" / "metrics.jsonl") if "train/loss" in r] == [2, 4, 6]


@pytest.mark.parametrize("tracker, package", [("wandb", "wandb"), ("mlflow", "mlflow")])
def test_a_tracker_that_is_not_installed_is_a_recipe_error_naming_its_package(tmp_path, capsys, tracker, package):
    import importlib.util

    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    assert main(["validate", str(_recipe(tmp_path, head=f"report_to: [{tracker}]\n"))]) == 2
    err = capsys.readouterr().err
    assert "report_to[0]" in err and f"pip install {package}" in err


def test_an_unknown_tracker_is_a_recipe_error_with_the_nearest_name(tmp_path, capsys):
    assert main(["validate", str(_recipe(tmp_path, head="report_to: tensorbord\n"))]) == 2
    assert "unknown tracker 'tensorbord'; did you mean 'tensorboard'?" in capsys.readouterr().err


def test_a_tracker_that_cannot_start_is_an_lmssl_error_naming_it(tmp_path, monkeypatch):
    from accelerate import tracking

    from lmssl.errors import LmsslError
    from lmssl.tracking import Tracker

    class Refuses(tracking.TensorBoardTracker):
        def start(self):
            raise RuntimeError("api key not configured")

    monkeypatch.setitem(tracking.LOGGER_TYPE_TO_CLASS, "tensorboard", Refuses)
    with pytest.raises(LmsslError, match=r"the tensorboard tracker could not start: api key not configured"):
        Tracker(tmp_path / "stage", True, 10, 0, "pre", ("tensorboard",))


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_training_loop_leaves_its_curves_and_summary_md_links_every_plot(run):
    for folder in [run / "pre", *sorted((run / "ft" / "runs").iterdir())]:
        assert _is_png(folder / "loss.png"), folder
    assert len(list((run / "ft" / "runs").glob("*/loss.png"))) == 4  # 2 inits x 2 seeds
    assert _is_png(run / "ft" / "results.png")
    summary = (run / "summary.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", summary)
    assert {"pre/loss.png", "ft/results.png"} <= set(images)
    links = re.findall(r"\]\(([^)]+\.png)\)", summary)
    assert "ft/runs/pydocs-topic-pretrained-seed0/loss.png" in links
    assert all((run / link).is_file() for link in links)


def test_curves_plot_the_task_metric_beside_the_loss(run):
    from lmssl.plots import plot_curves

    records = _records(run / "ft" / "runs" / "pydocs-topic-pretrained-seed0" / "metrics.jsonl")
    assert any("eval/accuracy" in r for r in records)
    assert plot_curves(run / "ft" / "runs" / "pydocs-topic-pretrained-seed0" / "metrics.jsonl",
                       run / "ft" / "again.png") == run / "ft" / "again.png"
    (run / "ft" / "again.png").unlink()


def test_results_chart_bars_are_the_mean_and_seed_std_of_results_json(run, tmp_path):
    from lmssl.plots import finetune_bars, plot_results

    rows = json.loads((run / "ft" / "results.json").read_text())["results"]
    bars = plot_results(finetune_bars(rows), tmp_path / "results.png", "ft")
    assert _is_png(tmp_path / "results.png")
    expected = {("pretrained", "accuracy"), ("scratch", "accuracy")}
    assert {(init, group.split("\n")[1]) for group, init, _, _ in bars} >= expected
    by_init = {init: (mean, std) for group, init, mean, std in bars if group == "pydocs-topic\naccuracy"}
    for row in rows:
        if row["metric"] == "accuracy":
            mean, std = by_init[row["init"]]
            assert mean == pytest.approx(100 * statistics.fmean(row["scores"]))
            assert std == pytest.approx(100 * statistics.stdev(row["scores"]))


def test_probe_results_chart_has_one_group_per_backbone():
    from lmssl.plots import probe_bars

    rows = [{"backbone": "mae", "init": "pretrained", "mode": "linear", "knn_top1": 0.5, "top1": 0.625},
            {"backbone": "scratch", "init": "scratch", "mode": "linear", "knn_top1": 0.25, "top1": 0.3}]
    assert probe_bars(rows) == [("mae", "kNN top-1", 50.0, 0.0), ("mae", "linear top-1", 62.5, 0.0),
                                ("scratch", "kNN top-1", 25.0, 0.0), ("scratch", "linear top-1", 30.0, 0.0)]


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate CLI is not on PATH")
def test_shipped_cpu_config_starts_two_processes(run, tmp_path):
    recipe = _recipe(tmp_path, head="report_to: [none]\n", stages=PRETRAIN, tok=str(run / "tok"))
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("ACCELERATE_USE_CPU", None)   # the command as it stands: the config file alone
    cmd = ["accelerate", "launch", "--config_file", str(REPO / "recipes" / "accelerate" / "cpu-2proc.yaml"),
           "-m", "lmssl", "run", str(recipe), "--run-dir", str(tmp_path / "run")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    # Packed 32-token rows, 8 per process per step: the tokens counted over 6 steps tell the world size.
    metrics = json.loads((tmp_path / "run" / "pre" / "stage.json").read_text())["metrics"]
    assert metrics["train/tokens"] == 6 * 8 * 32 * 2
    assert done.stdout.count("Run summary: tracked") == 1
