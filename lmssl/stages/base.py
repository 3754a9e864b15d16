"""What every stage kind is given and gives back. A stage kind is one module in this package with a
`Config` dataclass (a StageConfig, checked without training) and `run(cfg, ctx) -> StageResult`;
the stage sees only its own config and the results of earlier stages, through its StageContext."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

PHASES = ("prepare", "train", "eval", "save")
"""Where a stage's wall time goes: reading and preparing data and models, training, evaluating, saving
(outputs and checkpoints). What none of them covers is reported as `other`."""


@dataclass
class StageResult:
    path: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    headline: dict[str, Any] = field(default_factory=dict)
    """The few metrics the run summary shows for this stage."""
    report: str = ""
    """Markdown the stage adds to summary.md (e.g. a results table)."""
    fingerprint: str = ""


@dataclass
class StageContext:
    accelerator: Any
    run_dir: Path
    outputs: dict[str, StageResult]
    out_dir: Path
    """Where this stage writes; renamed to run_dir/<name> when the stage completes."""
    seed: int = 0
    gradient_accumulation_steps: int = 1
    recipe_raw: dict = field(default_factory=dict)
    report_to: tuple[str, ...] = ("tensorboard",)
    """The recipe's trackers, for every training loop the stage runs."""
    license: str = "other"
    """The recipe's license, for the model cards."""
    on_save: Optional[Any] = None
    """on_save(step, save_to), called on every process after each checkpoint a pretraining loop writes;
    save_to(folder) writes the model as from_pretrained loads it (the runner's hook that pushes checkpoints
    to the Hub as branches). None when nothing wants them."""
    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    """Seconds spent so far in each phase (see PHASES)."""

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Count the wall time of the block as phase `name`."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] += time.perf_counter() - started

    def add_phases(self, seconds: dict[str, float]) -> None:
        """Count seconds measured elsewhere (the training loop's train/eval/save split)."""
        for name, value in seconds.items():
            self.phases[name] += value

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def main_process_first(self):
        """Tokenize/prepare on the main process first (cached), then the others read the cache."""
        return self.accelerator.main_process_first()

    def print(self, *args) -> None:
        self.accelerator.print(*args)

    def resolve(self, reference: Optional[str], revision: Optional[str] = None) -> Optional[Path | str]:
        """A *_from value: an earlier stage's folder, a local folder, or a hub id (`org/name`, or
        `org/name@revision`) fetched into the HF cache (offline: read from it), as a local folder."""
        from lmssl.hub import is_hub_id, split_revision

        if reference is None:
            return None
        if reference in self.outputs:
            return self.outputs[reference].path
        if not is_hub_id(reference):
            return reference
        from huggingface_hub import snapshot_download

        from lmssl.hub import hub_errors

        repo_id, pinned = split_revision(reference)
        with self.main_process_first(), hub_errors(f"fetch {reference!r} from the Hub"):
            return Path(snapshot_download(repo_id, revision=pinned or revision))
