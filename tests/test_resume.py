"""Runs that survive: SIGKILL at random moments during pretraining, resume each time, and end
with weights bit-identical to an uninterrupted run; SIGTERM writes a checkpoint and exits."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent

RECIPE = """\
name: resume
seed: 3
stages:
  - {name: tok, kind: tokenizer, vocab_size: 800, data: {path: "builtin:pydocs", max_samples: 600}}
  - name: pre
    kind: pretrain
    tokenizer_from: tok
    model: {family: bert, size: tiny}
    data: {path: "builtin:pydocs", max_samples: 600}
    max_length: 32
    batch_size: 8
    max_steps: 120
    save_every: 7
    keep_checkpoints: 2
    eval_every: 50
"""


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cmd(recipe: Path, run_dir: Path):
    return [sys.executable, "-m", "lmssl", "run", str(recipe), "--run-dir", str(run_dir)]


def _wait_for_checkpoint(proc, run_dir: Path, step: int, seconds: float = 240) -> None:
    """Wait until the run has written checkpoint `step` (or later), or has ended."""
    deadline = time.time() + seconds
    while proc.poll() is None and _newest_step(run_dir) < step and time.time() < deadline:
        time.sleep(0.05)


def _newest_step(run_dir: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in run_dir.glob(".partial/pre-*/checkpoints/step-*")]
    return max(steps, default=0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE)
    proc = subprocess.run(_cmd(recipe, root / "run"), capture_output=True, text=True, env=_env(), cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return recipe, load_file(root / "run" / "pre" / "model.safetensors"), root / "run" / "tok"


def _with_reference_tokenizer(run_dir: Path, tok: Path) -> None:
    """Start from the reference run's finished tokenizer stage: the HF tokenizers trainers break
    ties in hash-map order, which differs between processes, so only pretraining is compared."""
    shutil.copytree(tok, run_dir / "tok")


def test_sigkill_at_random_steps_then_resume_gives_identical_weights(reference, tmp_path):
    recipe, expected, tok = reference
    run_dir = tmp_path / "run"
    _with_reference_tokenizer(run_dir, tok)
    rng = random.Random(0)
    kills = 0
    for target in sorted(rng.sample(range(8, 110), 3)):
        proc = subprocess.Popen(_cmd(recipe, run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=_env(), cwd=tmp_path, text=True)
        _wait_for_checkpoint(proc, run_dir, target)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2, "the run finished before it could be killed"
    newest = _newest_step(run_dir)
    assert newest > 0
    before = json.loads(next(run_dir.glob(f".partial/pre-*/checkpoints/step-{newest:08d}/loop.json")).read_text())
    final = subprocess.run(_cmd(recipe, run_dir), capture_output=True, text=True, env=_env(), cwd=tmp_path)
    assert final.returncode == 0, final.stderr[-3000:]
    assert f"resuming from step-{newest:08d}" in final.stdout + final.stderr
    # the stage's time counts the training before the last kill (up to the checkpoint it resumed from)
    record = json.loads((run_dir / "pre" / "stage.json").read_text())
    resumed_only = record["metrics"]["train/tokens"] / record["metrics"]["train/tokens_per_s"]  # the last call's
    assert before["seconds"]["train"] > 0
    assert record["phases"]["train"] == pytest.approx(before["seconds"]["train"] + resumed_only, rel=0.05, abs=0.05)
    assert record["seconds"] >= record["phases"]["train"]
    got = load_file(run_dir / "pre" / "model.safetensors")
    assert got.keys() == expected.keys()
    for name in expected:
        assert (got[name] == expected[name]).all(), f"{name} differs after kill/resume"


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(reference, tmp_path):
    recipe, _, tok = reference
    run_dir = tmp_path / "run"
    _with_reference_tokenizer(run_dir, tok)
    proc = subprocess.Popen(_cmd(recipe, run_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
                            cwd=tmp_path, text=True)
    _wait_for_checkpoint(proc, run_dir, 7)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted at step" in err and "Traceback" not in err
    import re

    step = int(re.search(r"interrupted at step (\d+)", err).group(1))
    assert step >= 7
    assert list(run_dir.glob(f".partial/pre-*/checkpoints/step-{step:08d}/manifest.json"))


def test_a_second_ctrl_c_exits_at_once(reference, tmp_path):
    recipe, _, tok = reference
    run_dir = tmp_path / "run"
    _with_reference_tokenizer(run_dir, tok)
    slow = tmp_path / "slow.yaml"
    slow.write_text(recipe.read_text().replace("max_steps: 120", "max_steps: 100000"))
    proc = subprocess.Popen(_cmd(slow, run_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
                            cwd=tmp_path, text=True)
    _wait_for_checkpoint(proc, run_dir, 7)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "stopped at once" in err or "interrupted at step" in err
    assert "Traceback" not in err
