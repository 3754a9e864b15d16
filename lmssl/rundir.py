"""The run directory: that it can be written, one run at a time (a lock the kernel releases even after a
SIGKILL), and which folders in it lmssl made. lmssl removes or replaces only those; anything else in its
way is an error that names it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from lmssl.errors import LmsslError

LOCK = ".lmssl.lock"
MARKER = ".lmssl-stage"  # inside every stage folder lmssl is building (.partial/<name>-<fingerprint>/)
PSEUDO_FILESYSTEMS = ("/proc", "/sys", "/dev")


def prepare(run_dir: Path) -> None:
    """Create the run directory, or explain why it cannot be one (exit 2): a file, under a file, a
    pseudo file system, or not writable."""
    resolved = run_dir.expanduser().resolve()
    if any(resolved == Path(p) or Path(p) in resolved.parents for p in PSEUDO_FILESYSTEMS):
        raise LmsslError(f"--run-dir {run_dir}: {resolved} is in a system file system ({', '.join(PSEUDO_FILESYSTEMS)}); "
                         "choose a folder of your own")
    for ancestor in [resolved, *resolved.parents]:
        if ancestor.exists() and not ancestor.is_dir():
            where = "is a file" if ancestor == resolved else f"lies under the file {ancestor}"
            raise LmsslError(f"--run-dir {run_dir}: {where}; choose a folder")
    try:
        resolved.mkdir(parents=True, exist_ok=True)
        probe = resolved / f".lmssl-write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise LmsslError(f"--run-dir {run_dir}: cannot write there ({err.strerror or err}); choose a writable "
                         "folder") from None


class RunLock:
    """An exclusive lock on RUN_DIR/.lmssl.lock for the whole run (POSIX flock: the kernel drops it when
    the process ends, however it ends, so a lock left by a killed run is simply taken over). The file
    says who holds it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.handle = None

    def acquire(self) -> Optional[str]:
        """None when this process now holds the lock; else why not (who holds it)."""
        try:
            import fcntl
        except ImportError:  # no flock (Windows): one run per folder is then the user's to keep
            return None
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            try:
                who = json.loads(holder)
                return (f"another lmssl run (pid {who['pid']} on {who['host']}, started {who['started']}) is using "
                        f"{self.path.parent}; wait for it to end, or use another --run-dir")
            except (ValueError, KeyError, TypeError):
                return f"another lmssl run holds {self.path}; wait for it to end, or use another --run-dir"
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "argv": sys.argv,
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        handle.flush()
        self.handle = handle
        return None

    def release(self) -> None:
        if self.handle is not None:
            import fcntl

            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def owned(folder: Path) -> bool:
    """Whether lmssl made `folder`: a finished stage (stage.json) or one it is building (its marker)."""
    return (folder / "stage.json").is_file() or (folder / MARKER).is_file()


def claim(folder: Path, stage: str) -> None:
    """Mark a stage folder lmssl is about to build as its own."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text(json.dumps({"stage": stage, "pid": os.getpid()}), encoding="utf-8")


def check_free(folder: Path, what: str) -> None:
    """An error (exit 2) when `folder` exists and lmssl did not make it: it is never moved or deleted."""
    if folder.exists() and not (folder.is_dir() and owned(folder)):
        raise LmsslError(f"{what}: {folder} exists and was not made by lmssl (no stage.json); lmssl never replaces "
                         "it: move it away, or use another --run-dir")


def remove(folder: Path) -> None:
    """Delete `folder` if lmssl made it; leave anything else alone."""
    if folder.is_dir() and owned(folder):
        shutil.rmtree(folder, ignore_errors=True)


def discard_unresumable(folder: Path) -> None:
    """After a stage failed: delete its folder (lmssl's own) unless it holds a checkpoint to resume from,
    and the .partial folder around it when nothing else is left there."""
    if folder.is_dir() and owned(folder) and not any(p.is_dir() for p in folder.rglob("step-*")):
        shutil.rmtree(folder, ignore_errors=True)
        try:
            folder.parent.rmdir()  # only when empty
        except OSError:
            pass
