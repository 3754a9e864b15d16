"""Resumable training checkpoints: atomic writes, checksummed manifests, latest-valid lookup.

A checkpoint is a folder `step-00000123/` holding the model (safetensors; under FSDP a dcp/ folder of
torch.distributed.checkpoint shards, one per process, with the optimizer's), optimizer, scheduler
and grad-scaler state (torch tensors, read back with weights_only=True), every process's RNG
state (JSON), the loop's position (JSON) and, when streaming, every process's position in its
stream (JSON). It is written under a temporary name and renamed only when complete, with a
manifest of SHA-256 sums written last, so a folder without a valid manifest is never resumed from.
Final models are not saved here (see hub.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from lmssl.errors import LmsslError
from lmssl.rng import rng_state, set_rng_state

MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _complete(folder: Path) -> bool:
    """True when the manifest exists and every file it lists has the recorded checksum."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return all(_sha256(folder / name) == digest for name, digest in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under `root`, newest first (valid or not)."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: p.name, reverse=True)


def latest_valid(root: Path, log=print) -> Optional[Path]:
    """The newest checkpoint whose manifest checks out; corrupt or partial ones are reported and skipped."""
    for folder in checkpoints(root):
        if _complete(folder):
            return folder
        log(f"checkpoint {folder} is incomplete or corrupt; trying the one before it")
    return None


SHARDS = "dcp"  # the torch.distributed.checkpoint folder of a sharded checkpoint


def sharded(accelerator, checkpoint_format: str = "auto") -> bool:
    """Whether checkpoints go through torch.distributed.checkpoint: asked for, or (auto) the weights are sharded
    (FSDP), where no process holds them whole. A single process always writes safetensors."""
    from accelerate.utils import DistributedType

    if checkpoint_format == "auto":
        return accelerator.distributed_type == DistributedType.FSDP
    return checkpoint_format == "dcp" and accelerator.num_processes > 1


def _dcp_state(model, optimizer) -> dict[str, Any]:
    """Model and optimizer state as torch.distributed.checkpoint sees them: each process's own shards (FSDP)
    or replicated tensors (DDP), keyed by parameter names."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, getattr(optimizer, "optimizer", optimizer))
    return {"model": model_state, "optimizer": optim_state}


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def save(accelerator, root: Path, step: int, model: torch.nn.Module, optimizer, scheduler,
         loop_state: dict[str, Any], keep: int, data_state: Optional[dict[str, Any]] = None,
         checkpoint_format: str = "auto") -> Path:
    """Write checkpoint `step` atomically on every process; keep the newest `keep` checkpoints.
    `data_state`: this process's own data position (a stream's), written by each process as data-<rank>.json.
    Sharded (see `sharded`): model and optimizer go to dcp/, every process writing its shard; the manifest
    and the rename still happen once, on the main process, after every shard is written."""
    root = Path(root)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    main = accelerator.is_main_process
    try:
        if main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        rank = accelerator.process_index
        (tmp / f"rng-{rank}.json").write_text(json.dumps(rng_state()))
        if data_state is not None:
            (tmp / f"data-{rank}.json").write_text(json.dumps(data_state))
        if sharded(accelerator, checkpoint_format):
            import torch.distributed.checkpoint as dcp

            dcp.save(_dcp_state(model, optimizer), checkpoint_id=str(tmp / SHARDS))   # a collective: every rank
        elif main:
            save_model(accelerator.unwrap_model(model), str(tmp / "model.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if main:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            if getattr(accelerator, "scaler", None) is not None:
                torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
            (tmp / "loop.json").write_text(json.dumps(dict(loop_state, step=step, world=accelerator.num_processes)))
        accelerator.wait_for_everyone()
        if main:
            files = {str(p.relative_to(tmp)): _sha256(p) for p in _files(tmp)}
            (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in checkpoints(root)[max(1, keep):]:  # the newest (this one) always stays
                shutil.rmtree(old, ignore_errors=True)
    except (OSError, RuntimeError, SafetensorError) as err:  # a full disk: OSError, or torch's/safetensors' own
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_valid(root, log=lambda _: None)
        kept = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
        why = getattr(err, "strerror", None) or " ".join(str(err).split())[:200]
        raise LmsslError(f"could not write checkpoint {final}: {why}; {kept}") from None
    accelerator.wait_for_everyone()
    return final


def load(accelerator, folder: Path, model: torch.nn.Module, optimizer, scheduler) -> dict[str, Any]:
    """Restore model, optimizer, scheduler, scaler and this process's RNG; return the loop state."""
    folder = Path(folder)
    loop_state = json.loads((folder / "loop.json").read_text())
    if loop_state.get("world", 1) != accelerator.num_processes:
        raise LmsslError(
            f"checkpoint {folder} was written by {loop_state['world']} processes and this run has "
            f"{accelerator.num_processes}; resume with the same number of processes (or --force the stage)"
        )
    if (folder / SHARDS).is_dir():       # each process reads its own shards back (any process count would do)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = _dcp_state(model, optimizer)
        dcp.load(state, checkpoint_id=str(folder / SHARDS))
        set_state_dict(model, getattr(optimizer, "optimizer", optimizer), model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
    else:
        device = "cpu" if accelerator.device.type == "cpu" else str(accelerator.device)  # safetensors: no "cpu:0"
        load_model(accelerator.unwrap_model(model), str(folder / "model.safetensors"), device=device)
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=True))
    if (folder / "scaler.pt").exists() and getattr(accelerator, "scaler", None) is not None:
        accelerator.scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=True))
    rng_file = folder / f"rng-{accelerator.process_index}.json"
    if rng_file.exists():
        set_rng_state(json.loads(rng_file.read_text()))
    data_file = folder / f"data-{accelerator.process_index}.json"
    if data_file.exists():
        loop_state["data"] = json.loads(data_file.read_text())
    return loop_state
