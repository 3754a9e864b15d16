"""Vision runs survive too: SIGKILL during mae and during simclr pretraining at random checkpoints,
resume each time, and end with weights (backbone and what continued pretraining needs) bit-identical
to an uninterrupted run; views and masks are functions of the seed and the step."""

from __future__ import annotations

import random
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_resume import _cmd, _env

RECIPE = """\
name: vresume
seed: 7
stages:
  - name: pre
    kind: pretrain
    objective: OBJECTIVE
    objective_args: ARGS
    model: {family: vit, size: tiny, image_size: 16, patch_size: 4}
    data: {path: "builtin:digits", eval_split: test, max_samples: 400}
    batch_size: 16
    learning_rate: 1.0e-3
    max_steps: 48
    save_every: 4
    keep_checkpoints: 2
    eval_every: 24
"""
ARGS = {"mae": "{decoder_width: 32, decoder_depth: 1}", "simclr": "{projection_hidden: 64, views: {blur: 0.5}}"}


def _newest(run_dir: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in run_dir.glob(".partial/pre-*/checkpoints/step-*")]
    return max(steps, default=0)


def _weights(run_dir: Path) -> dict:
    found = {"backbone": load_file(run_dir / "pre" / "model.safetensors")}
    for extra in (run_dir / "pre" / "pretraining").glob("*.safetensors"):
        found[extra.name] = load_file(extra)
    return found


def reference_weights(recipe: Path, tmp_path: Path) -> dict:
    """The weights an uninterrupted run of `recipe` saves (backbone and pretraining extras)."""
    reference = subprocess.run(_cmd(recipe, tmp_path / "reference"), capture_output=True, text=True, env=_env(),
                               cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]
    return _weights(tmp_path / "reference")


def killed_then_resumed_weights(recipe: Path, tmp_path: Path, seed: str, kills: int = 2, steps=range(6, 40)) -> dict:
    """Run `recipe`, SIGKILL it once its newest checkpoint reaches each of `kills` seeded steps, then run it
    to the end: the weights it saves (after checking that every kill and the resume happened)."""
    import time

    run_dir, done = tmp_path / "run", 0
    for target in sorted(random.Random(seed).sample(steps, kills)):
        proc = subprocess.Popen(_cmd(recipe, run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=_env(), cwd=tmp_path)
        deadline = time.time() + 240
        while proc.poll() is None and _newest(run_dir) < target and time.time() < deadline:
            time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            done += 1
        proc.wait()
    assert done == kills, "the run finished before it could be killed"
    final = subprocess.run(_cmd(recipe, run_dir), capture_output=True, text=True, env=_env(), cwd=tmp_path)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "resuming from step-" in final.stdout + final.stderr
    return _weights(run_dir)


def assert_same_weights(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for group in expected:
        assert got[group].keys() == expected[group].keys()
        for name in expected[group]:
            assert torch.equal(got[group][name], expected[group][name]), f"{group}:{name} differs after kill/resume"


@pytest.mark.parametrize("objective", ["mae", "simclr"])
def test_sigkill_during_vision_pretraining_then_resume_gives_identical_weights(objective, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.replace("OBJECTIVE", objective).replace("ARGS", ARGS[objective]))
    expected = reference_weights(recipe, tmp_path)
    assert len(expected) == 2, "the backbone and the continued-pretraining weights are both saved"
    assert_same_weights(killed_then_resumed_weights(recipe, tmp_path, objective), expected)
