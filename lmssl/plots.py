"""The PNGs a run leaves in its folders: training curves (loss.png, one per training loop) and the
results chart of a finetune or probe stage (results.png). Reading and writing only; no training here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

# Metrics that are no score to plot beside the others: the loss has its own panel, perplexity is exp(loss).
NOT_SCORES = {"eval/loss", "eval/perplexity"}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window: runs are headless
    import matplotlib.pyplot as plt

    return plt


def plot_curves(metrics_file: Path, out_png: Path, title: Optional[str] = None) -> Optional[Path]:
    """Training and evaluation loss against step and, on a second panel, every other evaluation score
    (accuracy, the kNN monitor's top-1, a task's metric; x100). None when nothing was logged."""
    records = read_metrics(metrics_file)
    train = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
    evals = [(r["step"], r["eval/loss"]) for r in records if "eval/loss" in r]
    score_names = sorted({k for r in records for k in r if k.startswith("eval/") and k not in NOT_SCORES})
    scores = {name: [(r["step"], 100 * r[name]) for r in records if name in r] for name in score_names}
    if not train and not evals and not scores:
        return None
    plt = _pyplot()
    panels = 2 if scores else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 3.5), dpi=100, squeeze=False)
    loss_ax = axes[0][0]
    if train:
        loss_ax.plot(*zip(*train), ".-" if len(train) < 30 else "-", label="train", linewidth=1)  # a short run: dots
    if evals:
        loss_ax.plot(*zip(*evals), "o-", label="eval", markersize=3)
    loss_ax.set_ylabel("loss")
    if train or evals:
        loss_ax.legend(loc="best")
    if scores:
        score_ax = axes[0][1]
        for name, points in scores.items():
            score_ax.plot(*zip(*points), "s--", label=name.removeprefix("eval/"), markersize=3)
        score_ax.set_ylabel("evaluation score (x100)")
        score_ax.legend(loc="best")
    for ax in axes[0]:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.suptitle(title or Path(out_png).parent.name)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)


Bars = list[tuple[str, str, float, float]]
"""(group, series, mean, std) per bar, in the plotted units (scores x100)."""


def finetune_bars(rows: list[dict]) -> Bars:
    """A finetune stage's results.json rows: one group per task and metric, one bar per init
    (pretrained, scratch), the error bar the standard deviation over seeds."""
    return [(f"{r['task']}\n{r['metric']}", r["init"], 100 * r["mean"], 100 * r["std"]) for r in rows]


def probe_bars(rows: list[dict]) -> Bars:
    """A probe stage's results.json rows: one group per backbone row (a scratch baseline is a row of its
    own), one bar for the kNN top-1 and one for the probe's top-1; one seed, so no error bar."""
    bars: Bars = []
    for r in rows:
        bars += [(r["backbone"], "kNN top-1", 100 * r["knn_top1"], 0.0),
                 (r["backbone"], f"{r['mode']} top-1", 100 * r["top1"], 0.0)]
    return bars


def plot_results(bars: Bars, out_png: Path, title: str) -> Bars:
    """A grouped bar chart of `bars` with error bars; returns the bars as plotted (nothing when empty)."""
    if not bars:
        return []
    plt = _pyplot()
    groups = list(dict.fromkeys(g for g, _, _, _ in bars))
    series = list(dict.fromkeys(s for _, s, _, _ in bars))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(groups) * len(series) + 1.5), 3.5), dpi=100)
    for i, name in enumerate(series):
        mine = {g: (m, s) for g, n, m, s in bars if n == name}
        xs = [x + (i - (len(series) - 1) / 2) * width for x, g in enumerate(groups) if g in mine]
        means = [mine[g][0] for g in groups if g in mine]
        stds = [mine[g][1] for g in groups if g in mine]
        drawn = ax.bar(xs, means, width, yerr=stds if any(stds) else None, capsize=3, label=name)
        ax.bar_label(drawn, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_ylabel("score (x100)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return list(bars)


def stage_plots(run_dir: Path, stage: str) -> tuple[list[Path], list[Path]]:
    """A finished stage's PNGs relative to the run directory: (its own: loss.png, results.png, ...;
    those of the training runs inside it: runs/<run>/loss.png)."""
    folder = Path(run_dir) / stage
    own = sorted(p.relative_to(run_dir) for p in folder.glob("*.png"))
    runs = sorted(p.relative_to(run_dir) for p in folder.glob("runs/*/*.png"))
    return own, runs
