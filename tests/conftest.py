"""Shared test setup: offline HF libraries, a private cache, and the real-data locator.

Tests that need ../shared/data take the `data_dir` fixture (or call `shared_file`): it skips
with a reason when the data is absent, and fails instead when LMSSL_REQUIRE_DATA=1 (CI).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # several pytest workers share the cores: each gets its share of compute threads (before torch is imported),
    # and so do the runs its tests start, so no two thread pools spin on one core
    _cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cpus // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A port nobody listens on now, picked by the OS, for a launched run's main process: pytest workers launch
    runs side by side, so fixed or pid-derived ports collide."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def data_root() -> Path:
    return Path(os.environ.get("LMSSL_DATA_DIR", REPO.parent / "shared" / "data"))


def shared_file(relative: str) -> Path:
    """Path of a file under the shared data folder, or skip (fail under LMSSL_REQUIRE_DATA=1)."""
    path = data_root() / relative
    if not path.exists():
        message = f"real data {path} is absent (set LMSSL_DATA_DIR to the shared/data folder)"
        if os.environ.get("LMSSL_REQUIRE_DATA") == "1":
            pytest.fail(message + " and LMSSL_REQUIRE_DATA=1")
        pytest.skip(message)
    return path


@pytest.fixture
def data_dir() -> Path:
    return shared_file("")


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    """Builtin datasets are harvested once per session into a temp cache, never into ~/.cache."""
    cache = tmp_path_factory.getbasetemp() / "lmssl-cache"
    monkeypatch.setenv("LMSSL_CACHE", str(cache))
