"""What the runner does for the Hub around each stage: a preflight before anything runs (login, offline
mode, hub inputs in the cache), completing every model card once its stage is done, and pushing the
finished folders (with retries on a rerun, and `lmssl push` after the fact). The Hub client calls
themselves live in hub.py."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any, Optional

from lmssl import hub
from lmssl.errors import LmsslError


def preflight(recipe) -> None:
    """Fail in seconds, before any stage runs: a push needs a login and the network; a hub input needs
    the network or the local cache."""
    from huggingface_hub import constants

    pushing = [s for s in recipe.stages if s.push_to_hub is not None]
    if pushing and constants.HF_HUB_OFFLINE:
        raise LmsslError(f"stages.{pushing[0].name}.push_to_hub: HF_HUB_OFFLINE=1 is set, so nothing can be pushed; "
                         "unset it, or drop push_to_hub and run `lmssl push RUN_DIR/STAGE REPO_ID` when online")
    if pushing:
        from huggingface_hub import HfApi

        with hub.hub_errors(f"check the Hub login for stages.{pushing[0].name}.push_to_hub"):
            HfApi().whoami()
    for where, reference, kind in hub_inputs(recipe):
        check_input(where, reference, kind, offline=constants.HF_HUB_OFFLINE)


def hub_inputs(recipe) -> list[tuple[str, str, str]]:
    """(key, hub id[@revision], 'model' or 'dataset') for every hub repository the recipe reads."""
    names = {s.name for s in recipe.stages}
    found = []
    for stage in recipe.stages:
        where = f"stages.{stage.name}"
        for ref, value in stage.references():
            if value not in names and hub.is_hub_id(value):
                found.append((f"{where}.{ref}", value, "model"))
        model = getattr(stage, "model", None)
        if model is not None and hub.is_hub_id(getattr(model, "init_from", None)):
            revision = getattr(model, "revision", None)
            found.append((f"{where}.model.init_from", model.init_from + (f"@{revision}" if revision else ""), "model"))
        data = getattr(stage, "data", None)
        if data is not None and hub.is_hub_id(data.path) and "/" in data.path:
            found.append((f"{where}.data.path", data.path + (f"@{data.revision}" if data.revision else ""), "dataset"))
    return found


def check_input(where: str, reference: str, kind: str, offline: bool) -> None:
    """Offline, a hub input must be in the local cache (else exit 2 at once); online, it must exist."""
    from huggingface_hub import HfApi, scan_cache_dir

    repo_id, revision = hub.split_revision(reference)
    if offline:
        cached = False
        try:
            cached = any(r.repo_id == repo_id and r.repo_type == kind for r in scan_cache_dir().repos)
        except Exception:  # noqa: BLE001 - no cache folder at all: nothing is cached
            cached = False
        if kind == "dataset" and not cached:
            from datasets import config as datasets_config

            cached = any(Path(datasets_config.HF_DATASETS_CACHE).glob(repo_id.replace("/", "___") + "*"))
        if not cached:
            raise LmsslError(f"{where}: {repo_id!r} is a Hub {kind} that is not in the local cache, and HF_HUB_OFFLINE=1 "
                             f"is set; run once online (or `hf download {repo_id}"
                             f"{' --repo-type dataset' if kind == 'dataset' else ''}`), or point {where.rsplit('.', 1)[1]} "
                             "at a local copy")
        return
    with hub.hub_errors(f"find {where} = {reference!r} on the Hub"):
        HfApi().repo_info(repo_id, repo_type=kind, revision=revision)


def facts(accelerator, recipe, seconds: float, phases: dict[str, float], fingerprint: str, data: list[str]) -> dict:
    """What a model card says about the run that made it."""
    import torch

    if accelerator.device.type == "cuda":
        hardware = f"{accelerator.num_processes} x {torch.cuda.get_device_name(accelerator.device)}"
    else:
        hardware = (f"{accelerator.num_processes} process(es) on {accelerator.device.type} "
                    f"({platform.machine()}, {os.cpu_count()} cores)")
    spent = ", ".join(f"{k} {v:.1f} s" for k, v in phases.items() if v >= 0.05)
    return {"hardware": hardware, "mixed precision": recipe.mixed_precision, "wall time": f"{seconds:.1f} s ({spent})",
            "stage fingerprint": fingerprint[:16],
            "local data": "; ".join(_short(entry) for entry in data) or "none (builtin or hub data)"}


def _short(entry: str) -> str:
    """'path:size:mtime' or 'folder:digest' without the local directory names."""
    name, _, rest = entry.partition(":")
    return f"{Path(name).name} ({rest.split(':')[0]} bytes)" if rest.count(":") == 1 else f"{Path(name).name} ({rest[:12]})"


def complete_cards(stage, partial: Path, final: Path, run_facts: dict) -> None:
    """Usage snippet and run facts in every card the stage wrote, naming the repo it will be pushed to
    (or the local folder it will end up in)."""
    push = stage.push_to_hub
    for folder, repo in hub.push_targets(partial, push.repo_id if push else "{name}"):
        hub.complete_card(folder, repo if push else str(final / folder.relative_to(partial)), run_facts)


def push_stage(stage, final: Path) -> list[str]:
    """Push every model of a finished stage not pushed yet (stage.json records what was); returns the
    failures, each with the command that retries it."""
    push = stage.push_to_hub
    record_file = final / "stage.json"
    record = json.loads(record_file.read_text())
    done = {(p["repo_id"], p.get("revision")) for p in record.get("pushed", [])}
    failures = []
    for folder, repo in hub.push_targets(final, push.repo_id):
        if (repo, push.revision) in done:
            continue
        try:
            url = hub.push_folder(folder, repo, push.private, push.revision, f"lmssl stage {stage.name}")
        except LmsslError as err:
            retry = f"lmssl push {folder} {repo}" + (f" --revision {push.revision}" if push.revision else "")
            failures.append(f"{err}. The folder {folder} is complete; retry with `{retry}` (or run the recipe again)")
            continue
        record.setdefault("pushed", []).append({"repo_id": repo, "revision": push.revision, "commit": url})
        print(f"[{stage.name}] pushed {folder.name} to {repo}" + (f"@{push.revision}" if push.revision else ""))
    hub.write_json(record_file, record)
    return failures


def push_command(folder: str, repo_id: str, revision: Optional[str], private: bool) -> str:
    """`lmssl push RUN_DIR/STAGE[/MODEL] REPO_ID`: push a finished stage folder, or one model in it."""
    from lmssl.recipe import PushConfig

    path = Path(folder)
    stage_dir = path if (path / "stage.json").is_file() else path.parent
    if not (stage_dir / "stage.json").is_file():
        raise LmsslError(f"{folder}: not a finished lmssl stage folder (no stage.json in it or its parent); "
                         "push what `lmssl run` made, once its stage is done")
    PushConfig(repo_id=repo_id, revision=revision).check("REPO_ID", "push")
    targets = hub.push_targets(path, repo_id)
    if not targets:
        raise LmsslError(f"{folder}: holds no model or tokenizer to push")
    lines = []
    for target, repo in targets:
        url = hub.push_folder(target, repo, private, revision, "lmssl push")
        lines.append(f"pushed {target} to {repo}" + (f"@{revision}" if revision else "") + f": {url}")
        record = json.loads((stage_dir / "stage.json").read_text())
        record.setdefault("pushed", []).append({"repo_id": repo, "revision": revision, "commit": url})
        hub.write_json(stage_dir / "stage.json", record)
    return "\n".join(lines)


def pushed_everything(stage, record: dict[str, Any], final: Path) -> bool:
    push = stage.push_to_hub
    done = {(p["repo_id"], p.get("revision")) for p in record.get("pushed", [])}
    return push is None or all((repo, push.revision) in done for _, repo in hub.push_targets(final, push.repo_id))
