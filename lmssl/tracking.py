"""What a run shows and leaves behind: one progress bar, metrics.jsonl, TensorBoard, loss plots,
and the run summary (summary.md). Only the main process writes; the others get a silent tracker.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from tqdm.auto import tqdm

from lmssl.redact import redact_text


def count_units(batch: dict) -> tuple[int, str]:
    """How much work a batch is, for throughput: real tokens for text, images for vision."""
    for key in ("images", "pixel_values"):
        if key in batch:
            return int(batch[key].shape[0]), "images"
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum()), "tokens"
    if "input_ids" in batch:
        return int(batch["input_ids"].numel()), "tokens"
    first = next(iter(batch.values()))
    return int(first.shape[0]), "examples"


class Tracker:
    """Progress bar + JSONL + TensorBoard for one training stage."""

    def __init__(self, out_dir: Path, enabled: bool, total_steps: int, start_step: int, desc: str):
        self.out_dir = Path(out_dir)
        self.enabled, self.desc = enabled, desc
        self.units = 0
        self.unit_name = "tokens"
        self.window_start = time.perf_counter()
        self.window_units = 0
        self.rate = 0.0
        self.writer = None
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, disable=not enabled,
                        dynamic_ncols=True, mininterval=1.0)
        if enabled:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.out_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional at run time
                self.writer = None

    def add_units(self, n: int, unit: str) -> None:
        self.units += n
        self.window_units += n
        self.unit_name = unit

    def step(self, step: int, loss: float, lr: float) -> None:
        """Advance the bar by one optimizer step; refresh throughput every couple of seconds."""
        now = time.perf_counter()
        if now - self.window_start >= 2.0:
            self.rate = self.window_units / (now - self.window_start)
            self.window_start, self.window_units = now, 0
        elif self.rate == 0.0 and now > self.window_start:  # the first seconds: the rate so far
            self.rate = self.window_units / (now - self.window_start)
        self.bar.update(1)
        if self.enabled:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}",  # the last seconds' rate, not the average
                                 **{f"{self.unit_name}/s now": f"{self.rate:,.0f}"}, refresh=False)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **{k: float(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, float(value), step)

    def write(self, message: str) -> None:
        if self.enabled:
            self.bar.write(message)

    def close(self) -> None:
        self.bar.close()
        if self.enabled:
            self.jsonl.close()
            if self.writer is not None:
                self.writer.close()
            plot_losses(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png", self.desc)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_losses(metrics_file: Path, out_png: Path, title: Optional[str] = None) -> Optional[Path]:
    """Training and evaluation loss against step (and the kNN monitor's top-1, when there is one),
    one PNG per training stage."""
    records = read_metrics(metrics_file)
    train = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
    evals = [(r["step"], r["eval/loss"]) for r in records if "eval/loss" in r]
    knn = [(r["step"], 100 * r["eval/knn_top1"]) for r in records if "eval/knn_top1" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title or out_png.parent.name)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if knn:  # image pretraining: the kNN monitor on its own axis
        right = ax.twinx()
        right.plot(*zip(*knn), "s--", color="tab:green", label="kNN top-1 (%)", markersize=3)
        right.set_ylabel("kNN top-1 (%)")
        more_handles, more_labels = right.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, loc="best")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_summary(run_dir: Path, recipe_name: str, rows: list[dict[str, Any]], extra: list[str]) -> str:
    """The run summary: one line per stage (status, time, headline metrics), then stage tables."""
    lines = [f"# Run summary: {recipe_name}", "", "| stage | kind | status | time | metrics |", "|---|---|---|---|---|"]
    for row in rows:
        metrics = ", ".join(f"{k}={_fmt(v)}" for k, v in row.get("headline", {}).items())
        spent = f"{row['seconds']:.1f}s"
        if row.get("phases"):  # where the time went: prepare, train, eval, save (and other)
            spent += " (" + ", ".join(f"{k} {v:.1f}" for k, v in row["phases"].items() if v >= 0.05) + ")"
        lines.append(f"| {row['name']} | {row['kind']} | {row['status']} | {spent} | {metrics} |")
    lines += [""] + extra
    text = redact_text("\n".join(lines).rstrip() + "\n")
    (Path(run_dir) / "summary.md").write_text(text, encoding="utf-8")
    return text
