"""Every random draw of a run is a function of the seed and the step: seeding per micro-batch, and the
RNG states a checkpoint carries (as plain JSON, never pickled)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_all(key: int) -> None:
    """Seed python, numpy and torch (every device) from one integer."""
    key %= 2**32
    random.seed(key)
    np.random.seed(key)
    torch.manual_seed(key)


def batch_key(seed: int, micro: int, rank: int) -> int:
    """A distinct, reproducible RNG seed for micro-batch `micro` on process `rank`."""
    return (seed * 1_000_003 + micro * 7_919 + rank * 104_729 + 17) % 2**32


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from, as plain JSON."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() returned."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
