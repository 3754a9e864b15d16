"""run_recipe(): the one Accelerator of a run, stages in order, fingerprints, skip and resume.

A stage works in RUN_DIR/.partial/<name>-<fingerprint>/ and is renamed to RUN_DIR/<name>/ only
when complete, with stage.json beside its outputs. A re-run skips stages whose fingerprint (own
config + inputs' fingerprints) is unchanged; an interrupted stage finds its partial folder and
its checkpoints again and resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import os
import json
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from lmssl.data.builtin import FORMAT as BUILTIN_FORMAT
import lmssl.rundir as rundir
import lmssl.sharing as sharing
from lmssl.errors import LmsslError, RecipeError
from lmssl.hub import CheckpointPusher
from lmssl.recipe import Recipe, StageConfig
from lmssl.redact import redact
from lmssl.stages.base import StageContext, StageResult

# Fields that change how a stage reports or checkpoints, not what it produces.
NOT_FINGERPRINTED = {"log_every", "save_every", "keep_checkpoints", "num_workers", "eval_every", "push_to_hub",
                     "compile", "checkpoint_format"}


def _folder_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            stat = p.stat()
            digest.update(f"{p.relative_to(path)}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return digest.hexdigest()


def _patterns(value: Any, under_data_key: bool = False) -> list[str]:
    """Every string found under a `files`, `data_dir` or `glue_dir` key, at any depth of a config, and
    every `path` that is a local file or folder (image folders and zips are read from data.path)."""
    if isinstance(value, dict):
        local = [v for k, v in value.items() if k == "path" and isinstance(v, str) and not v.startswith("builtin:")
                 and Path(v).expanduser().exists()]
        return local + [p for k, v in value.items()
                        for p in _patterns(v, under_data_key or k in ("files", "data_dir", "glue_dir"))]
    if isinstance(value, list):
        return [p for v in value for p in _patterns(v, under_data_key)]
    return [value] if under_data_key and isinstance(value, str) else []


def _data_fingerprint(config: dict) -> list[str]:
    """Local data files and folders by name, size and mtime (a changed corpus re-runs the stage)."""
    found = []
    for pattern in _patterns(config):
        for name in sorted(glob.glob(os.path.expanduser(pattern))):
            path = Path(name)
            if path.is_file():
                stat = path.stat()
                found.append(f"{name}:{stat.st_size}:{int(stat.st_mtime)}")
            elif path.is_dir():
                found.append(f"{name}:{_folder_fingerprint(path)}")
    return found


def _without_inert(value: Any) -> Any:
    """A config dict without the data fields that do nothing where they are: shuffle_buffer of a source that
    does not stream (so adding it left every earlier stage's fingerprint as it was)."""
    if isinstance(value, dict):
        inert = {"shuffle_buffer"} if value.get("streaming") is False else set()
        return {k: _without_inert(v) for k, v in value.items() if k not in inert}
    if isinstance(value, list):
        return [_without_inert(v) for v in value]
    return value


def fingerprint(stage: StageConfig, recipe: Recipe, outputs: dict[str, StageResult]) -> str:
    config = _without_inert({k: v for k, v in dataclasses.asdict(stage).items() if k not in NOT_FINGERPRINTED})
    inputs = {}
    for ref, value in stage.references():
        key = f"{ref}:{value}" if isinstance(getattr(stage, ref), list) else ref
        if value in outputs:
            inputs[key] = outputs[value].fingerprint
        elif Path(value).exists():
            inputs[key] = _folder_fingerprint(Path(value))
    payload = {
        "config": config, "inputs": inputs, "data": _data_fingerprint(config), "extra": stage.fingerprint_inputs(),
        "builtin_data_format": BUILTIN_FORMAT,
        "run": {"seed": recipe.seed, "mixed_precision": recipe.mixed_precision,
                "gradient_accumulation_steps": recipe.gradient_accumulation_steps},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def make_accelerator(recipe: Recipe):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    import torch

    # Several processes on a machine without CUDA (accelerate launch with a multi-process config): they are
    # CPU processes, gloo, whatever the config's distributed type says (no key of the config can say so).
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=recipe.mixed_precision, cpu=cpu,
                              gradient_accumulation_steps=recipe.gradient_accumulation_steps)
    set_seed(recipe.seed)
    return accelerator


def _quiet_libraries(is_main: bool) -> None:
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()
    if not is_main:
        datasets.disable_progress_bars()


def run_recipe(recipe: Recipe, run_dir: Optional[str | Path] = None, force: tuple[str, ...] = (),
               accelerator=None) -> dict[str, StageResult]:
    """Run every stage of `recipe` in order, holding the run directory's lock; return their results by name."""
    run_dir = Path(run_dir or recipe.run_dir or Path("runs") / recipe.name)
    owned = accelerator is None
    accelerator = accelerator or make_accelerator(recipe)
    _quiet_libraries(accelerator.is_main_process)
    unknown = [name for name in force if name not in {s.name for s in recipe.stages}]
    if unknown:
        raise RecipeError(f"--force {unknown[0]}: no such stage; stages: {', '.join(s.name for s in recipe.stages)}")
    lock = rundir.RunLock(run_dir)
    problem = None
    if accelerator.is_main_process:
        try:
            from lmssl.sharing import preflight

            preflight(recipe)                    # login, offline mode, hub inputs: seconds, before any stage
            rundir.prepare(run_dir)
            problem = lock.acquire()
        except LmsslError as err:
            problem = str(err)
    problem = _from_main(accelerator, problem)  # every process stops if the main one could not start
    if problem:
        raise LmsslError(problem)
    try:
        outputs = _run_stages(recipe, run_dir, force, accelerator)
    finally:
        lock.release()
    if owned:  # several processes: leave the process group before exiting, so none aborts at shutdown
        accelerator.wait_for_everyone()
        accelerator.end_training()
    return outputs


def _from_main(accelerator, value):
    """The main process's `value`, on every process."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _run_stages(recipe: Recipe, run_dir: Path, force: tuple[str, ...], accelerator) -> dict[str, StageResult]:
    from accelerate.utils import set_seed

    from lmssl.hub import library_versions, write_json
    from lmssl.stages import STAGES
    from lmssl.tracking import write_summary

    outputs: dict[str, StageResult] = {}
    rows = []
    failures: list[str] = []  # pushes that failed: reported after every stage has run and been saved
    for stage in recipe.stages:
        started = time.time()
        fp = fingerprint(stage, recipe, outputs)
        final = run_dir / stage.name
        rundir.check_free(final, f"stages.{stage.name}")          # a folder of the user's is never replaced
        rundir.check_free(run_dir / f".old-{stage.name}", f"stages.{stage.name}")
        record_file = final / "stage.json"
        if stage.name not in force and record_file.exists():
            record = json.loads(record_file.read_text())
            if record.get("fingerprint") == fp:
                result = StageResult(final, record.get("metrics", {}), record.get("headline", {}),
                                     record.get("report", ""), fp)
                outputs[stage.name] = result
                rows.append({"name": stage.name, "kind": stage.kind, "status": "skipped (up to date)",
                             "seconds": time.time() - started, "headline": result.headline, "report": result.report})
                accelerator.print(f"[{stage.name}] up to date, skipped")
                if accelerator.is_main_process and not sharing.pushed_everything(stage, record, final):
                    failures += sharing.push_stage(stage, final)  # a push that failed last time
                continue

        partial = run_dir / ".partial" / f"{stage.name}-{fp[:16]}"
        rundir.check_free(partial, f"stages.{stage.name}")
        if accelerator.is_main_process:
            for stale in (run_dir / ".partial").glob(f"{stage.name}-*"):
                if stale != partial:
                    rundir.remove(stale)                          # an older attempt of lmssl's, nothing else
            resuming = partial.exists()
            rundir.claim(partial, stage.name)
            accelerator.print(f"[{stage.name}] {'resuming' if resuming else 'running'} ({stage.kind})")
        accelerator.wait_for_everyone()
        set_seed(recipe.seed)  # every stage starts from the same RNG state, whichever stages ran before it
        ctx = StageContext(
            accelerator=accelerator, run_dir=run_dir, outputs=dict(outputs), out_dir=partial, seed=recipe.seed,
            gradient_accumulation_steps=getattr(stage, "gradient_accumulation_steps", None)
            or recipe.gradient_accumulation_steps,
            recipe_raw=recipe.raw, report_to=tuple(n for n in recipe.report_to if n != "none"), license=recipe.license,
        )
        pusher = None
        if stage.push_to_hub is not None and stage.push_to_hub.strategy == "checkpoints":
            pusher = CheckpointPusher(stage.push_to_hub, partial / ".hub-snapshots", accelerator.is_main_process,
                                      lambda message, name=stage.name: accelerator.print(f"[{name}] {message}"))
            ctx.on_save = pusher.on_save
        try:
            result = STAGES[stage.kind].run(stage, ctx)
        except LmsslError:  # bad data or settings found while running: keep only what a rerun can resume
            if pusher is not None:
                pusher.finish()
            if accelerator.is_main_process:
                rundir.discard_unresumable(partial)
            raise
        if pusher is not None:
            failures += [f"stages.{stage.name}: checkpoint {line}" for line in pusher.finish()]
        result.fingerprint = fp
        seconds = time.time() - started
        seconds = max(seconds, sum(ctx.phases.values()))  # a resumed stage: its training before the interruption too
        phases = {**ctx.phases, "other": max(0.0, seconds - sum(ctx.phases.values()))}
        result.metrics.update({f"time/{name}_s": value for name, value in phases.items()})
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(partial / "checkpoints", ignore_errors=True)
            sharing.complete_cards(stage, partial, final, sharing.facts(
                accelerator, recipe, seconds, phases, fp, _data_fingerprint(dataclasses.asdict(stage))))
            write_json(partial / "stage.json", {
                "name": stage.name, "kind": stage.kind, "fingerprint": fp,
                "config": redact(dataclasses.asdict(stage)), "metrics": result.metrics, "headline": result.headline,
                "report": result.report, "seconds": round(seconds, 2),
                "phases": {name: round(value, 2) for name, value in phases.items()}, "versions": library_versions(),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            })
            (partial / rundir.MARKER).unlink()                    # stage.json marks the finished folder now
            old = run_dir / f".old-{stage.name}"
            rundir.remove(old)
            if final.exists():
                final.rename(old)                                 # checked above: lmssl's own
            partial.rename(final)
            rundir.remove(old)
            if stage.push_to_hub is not None:                     # the local folder is complete: now share it
                failures += sharing.push_stage(stage, final)
        accelerator.wait_for_everyone()
        result.path = final
        outputs[stage.name] = result
        rows.append({"name": stage.name, "kind": stage.kind, "status": "done", "seconds": seconds, "phases": phases,
                     "headline": result.headline, "report": result.report})

    if accelerator.is_main_process:
        with contextlib.suppress(OSError):
            (run_dir / ".partial").rmdir()
        extra = [row["report"] for row in rows if row["report"]]
        text = write_summary(run_dir, recipe.name, rows, extra)
        print("\n" + text + f"\nOutputs in {run_dir}/ (summary.md, one folder per stage)")
    failures = _from_main(accelerator, failures)
    if failures:
        raise LmsslError("pushing to the Hub failed; every local output is complete:\n  " + "\n  ".join(failures))
    return outputs
