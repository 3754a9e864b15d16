"""Two CPU processes (gloo) under `accelerate launch`: the same loss curve as one process with
the doubled batch, outputs written once, and a killed 2-process run resumes exactly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import free_port

REPO = Path(__file__).resolve().parent.parent

RECIPE = """\
name: two
seed: 1
stages:
  - {name: tok, kind: tokenizer, vocab_size: 800, data: {path: "builtin:pydocs", max_samples: 800}}
  - name: pre
    kind: pretrain
    tokenizer_from: tok
    model: {family: bert, size: tiny}
    data: {path: "builtin:pydocs", max_samples: 800}
    max_length: 32
    batch_size: BATCH
    learning_rate: 2.0e-3
    max_steps: 40
    log_every: 5
    save_every: 10
    eval_every: 20
"""

pytestmark = pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate CLI is not on PATH")


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


_PORTS = (free_port() for _ in iter(int, 1))   # a fresh free port per launch, forever


def _launch(recipe: Path, run_dir: Path, processes: int):
    if processes == 1:
        cmd = [sys.executable, "-m", "lmssl", "run", str(recipe), "--run-dir", str(run_dir)]
    else:
        cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--main_process_port", str(next(_PORTS)), "-m", "lmssl", "run", str(recipe),
               "--run-dir", str(run_dir)]
    return cmd


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(l) for l in (run_dir / "pre" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    (root / "two.yaml").write_text(RECIPE.replace("BATCH", "8"))
    (root / "one.yaml").write_text(RECIPE.replace("BATCH", "16"))
    two = subprocess.run(_launch(root / "two.yaml", root / "run2", 2), capture_output=True, text=True, env=_env(),
                         cwd=root, timeout=600)
    assert two.returncode == 0, two.stderr[-4000:]
    one = subprocess.run(_launch(root / "one.yaml", root / "run1", 1), capture_output=True, text=True, env=_env(),
                         cwd=root, timeout=600)
    assert one.returncode == 0, one.stderr[-4000:]
    return root, two


def test_two_processes_follow_the_one_process_loss_curve_with_doubled_batch(runs):
    root, _ = runs
    two, one = _losses(root / "run2"), _losses(root / "run1")
    assert sorted(two) == sorted(one) == list(range(5, 45, 5))
    assert two[40] < two[5] - 0.5, "loss should fall"
    for step in two:  # same examples per step; only the masks and dropout draws differ
        assert abs(two[step] - one[step]) < 0.12 * one[step], (step, two[step], one[step])
    e2 = json.loads((root / "run2" / "pre" / "stage.json").read_text())["metrics"]["eval/loss"]
    e1 = json.loads((root / "run1" / "pre" / "stage.json").read_text())["metrics"]["eval/loss"]
    assert abs(e2 - e1) < 0.1 * e1


def test_two_processes_write_each_output_once(runs):
    root, proc = runs
    lines = (root / "run2" / "pre" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(l)["step"] for l in lines if "train/loss" in l]
    assert steps == sorted(set(steps)), "only the main process logs"
    assert proc.stdout.count("Run summary: two") == 1
    assert len(list((root / "run2").glob("pre/model*.safetensors"))) == 1


def test_killed_two_process_run_resumes_to_identical_weights(runs, tmp_path):
    root, _ = runs
    run_dir = tmp_path / "run"
    shutil.copytree(root / "run2" / "tok", run_dir / "tok")  # tokenizer trainers are not reproducible across processes
    proc = subprocess.Popen(_launch(root / "two.yaml", run_dir, 2), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=_env(), cwd=tmp_path, start_new_session=True)
    deadline = time.time() + 300
    while proc.poll() is None and not list(run_dir.glob(".partial/pre-*/checkpoints/step-00000010")):
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    import psutil

    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in tree:  # the launcher and both workers (torch's agent may start them in their own sessions)
        p.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(tree, timeout=30)
    assert not (run_dir / "pre").exists(), "the run finished before it could be killed"
    again = subprocess.run(_launch(root / "two.yaml", run_dir, 2), capture_output=True, text=True, env=_env(),
                           cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resuming from step-000000" in again.stdout + again.stderr
    expected = load_file(root / "run2" / "pre" / "model.safetensors")
    got = load_file(run_dir / "pre" / "model.safetensors")
    for name in expected:
        assert (got[name] == expected[name]).all(), name
