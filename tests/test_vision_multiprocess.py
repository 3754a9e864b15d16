"""Contrastive negatives cross processes: under two CPU processes (gloo), SimCLR's NT-Xent on each
process's share of a batch, with gradients averaged by DDP, has exactly the loss and gradients of the
same loss over the whole batch on one process (the all-gather carries gradients back)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_multiprocess import _PORTS, _env

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate CLI is not on PATH")


def test_two_process_simclr_loss_and_gradients_equal_one_process_on_the_whole_batch(tmp_path):
    one = subprocess.run([sys.executable, str(HERE / "simclr_ranks.py"), str(tmp_path / "one.pt")],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--main_process_port", str(next(_PORTS)), str(HERE / "simclr_ranks.py"),
                          str(tmp_path / "two.pt")], capture_output=True, text=True, env=_env(), timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    single = torch.load(tmp_path / "one.pt", weights_only=True)
    double = torch.load(tmp_path / "two.pt", weights_only=True)
    assert (single["world"], double["world"]) == (1, 2)
    assert torch.allclose(single["loss"], double["loss"], rtol=1e-10), (single["loss"], double["loss"])
    assert single["grads"].keys() == double["grads"].keys()
    for name, grad in single["grads"].items():
        assert torch.allclose(grad, double["grads"][name], rtol=1e-8, atol=1e-12), name
    assert sum(g.abs().sum() for g in single["grads"].values()) > 0
