"""FSDP2 through Accelerate (recipes/accelerate/fsdp2.yaml): a pretrain stage sharded over the GPUs, its
checkpoints written by every rank through torch.distributed.checkpoint, killed with SIGKILL and resumed to the
uninterrupted run's weights, and its final model gathered into one folder that from_pretrained loads.

Accelerate runs FSDP only with CUDA (without it, `--use_fsdp` starts undistributed processes), so these tests
skip on machines without a GPU; the same checkpoint code (dcp/ shards, manifest, rename, resume) runs on CPU
under two DDP processes with checkpoint_format: dcp in tests/test_streaming.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import shared_file

REPO = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP through Accelerate needs CUDA (none here)"),
    pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate CLI is not on PATH"),
]

RECIPE = """\
name: fsdp
seed: 5
mixed_precision: bf16
stages:
  - {name: tok, kind: tokenizer, spec: gpt2-bytebpe, vocab_size: 1000, data: {path: text, files: TRAIN, max_samples: 4000}}
  - name: pre
    kind: pretrain
    objective: causal_lm
    tokenizer_from: tok
    model: {family: gpt2, size: mini}
    data: {path: text, files: {train: TRAIN, validation: VALID}, eval_split: validation, max_samples: 8000}
    documents: blank_lines
    max_length: 64
    batch_size: 8
    max_steps: 40
    log_every: 5
    save_every: 10
    eval_batches: 4
"""


def _processes() -> int:
    return max(1, min(2, torch.cuda.device_count()))


def _launch(recipe: Path, run_dir: Path):
    return ["accelerate", "launch", "--config_file", str(REPO / "recipes" / "accelerate" / "fsdp2.yaml"),
            "--num_processes", str(_processes()), "-m", "lmssl", "run", str(recipe), "--run-dir", str(run_dir)]


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    recipe = root / "fsdp.yaml"
    recipe.write_text(RECIPE.replace("TRAIN", str(shared_file("wikitext-2/train.txt.xz")))
                      .replace("VALID", str(shared_file("wikitext-2/valid.txt.xz"))))
    done = subprocess.run(_launch(recipe, root / "whole"), capture_output=True, text=True, env=_env(), cwd=root,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return root, recipe


def test_fsdp_run_is_sharded_and_its_gathered_model_loads(whole):
    from transformers import AutoModelForCausalLM

    root, _ = whole
    folder = root / "whole" / "pre"
    assert len(list(folder.glob("model*.safetensors"))) == 1
    model = AutoModelForCausalLM.from_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    assert sum(t.numel() for t in weights.values()) >= 0.9 * sum(p.numel() for p in model.parameters())
    record = json.loads((folder / "stage.json").read_text())
    assert record["metrics"]["eval/loss"] < 7.0                          # it trained (ln 1000 = 6.9 untrained)


def test_fsdp_sigkill_and_resume_gives_the_uninterrupted_weights(whole, tmp_path):
    import psutil

    root, recipe = whole
    run_dir = tmp_path / "run"
    shutil.copytree(root / "whole" / "tok", run_dir / "tok")
    proc = subprocess.Popen(_launch(recipe, run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=_env(), cwd=tmp_path, start_new_session=True)
    deadline = time.time() + 600
    while proc.poll() is None and not list(run_dir.glob(".partial/pre-*/checkpoints/step-00000010")):
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in tree:
        p.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(tree, timeout=60)
    assert not (run_dir / "pre").exists(), "the run finished before it could be killed"
    newest = sorted(run_dir.glob(".partial/pre-*/checkpoints/step-*"))[-1]
    shards = sorted(p.name for p in (newest / "dcp").glob("*.distcp"))
    assert len(shards) == _processes(), shards                         # every rank wrote its own shard
    manifest = json.loads((newest / "manifest.json").read_text())["files"]
    assert all(f"dcp/{name}" in manifest for name in shards) and "model.safetensors" not in manifest
    again = subprocess.run(_launch(recipe, run_dir), capture_output=True, text=True, env=_env(), cwd=tmp_path,
                           timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"resuming from {newest.name}" in again.stdout + again.stderr
    expected = load_file(root / "whole" / "pre" / "model.safetensors")
    got = load_file(run_dir / "pre" / "model.safetensors")
    assert got.keys() == expected.keys()
    for name in expected:   # CUDA kernels (embedding backward's atomics) may differ in the last bit between runs
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-5, msg=name)
