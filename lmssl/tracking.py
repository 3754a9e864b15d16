"""What a run shows and leaves behind: one progress bar, metrics.jsonl, the recipe's Accelerate trackers
(report_to: TensorBoard by default) and the run summary (summary.md). Only the main process writes; the
others get a silent tracker. The plots themselves are drawn in plots.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from tqdm.auto import tqdm

from lmssl.redact import redact_text


# The package each Accelerate tracker needs (what `pip install` takes), for the error when it is missing.
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet-ml",
                    "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
                    "trackio": "trackio"}


def check_trackers(names: list[str], where: str) -> None:
    """report_to names Accelerate trackers that are installed (or is empty / [none])."""
    import difflib

    from accelerate.tracking import _available_trackers

    from lmssl.errors import RecipeError

    available = {str(getattr(t, "value", t)) for t in _available_trackers}
    for index, name in enumerate(names):
        at = f"{where}[{index}]"
        if name == "none":
            if len(names) > 1:
                raise RecipeError(f"{at}: none turns every tracker off; list it alone")
            continue
        if name not in TRACKER_PACKAGES:
            near = difflib.get_close_matches(name, list(TRACKER_PACKAGES), n=1)
            raise RecipeError(f"{at}: unknown tracker {name!r}" + (f"; did you mean {near[0]!r}?" if near else "")
                              + f" Known: {', '.join(TRACKER_PACKAGES)}, none")
        if name not in available:
            raise RecipeError(f"{at}: the {name} tracker needs the {TRACKER_PACKAGES[name]!r} package, which is not "
                              f"installed: pip install {TRACKER_PACKAGES[name]}")
    if len(set(names)) != len(names):
        raise RecipeError(f"{where}: a tracker is listed twice: {names!r}")


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


# How each Accelerate tracker is built: (positional, keyword) arguments from the project (the run folder's
# name), the run (stage and training loop: `ft:sst2/seed0`) and the stage folder. Trackers not listed here
# take the project only.
TRACKER_ARGS = {
    "tensorboard": lambda project, run, folder: (("tensorboard", folder), {}),  # event files in <stage>/tensorboard
    "wandb": lambda project, run, folder: ((project,), {"name": run}),
    "mlflow": lambda project, run, folder: ((project,), {"run_name": run}),       # the experiment is the project
    "aim": lambda project, run, folder: ((run, folder), {}),                       # an Aim repo in the stage folder
    "dvclive": lambda project, run, folder: ((run,), {"dir": str(folder / "dvclive")}),
}


def _project_only(project: str, run: str, folder: Path) -> tuple[tuple, dict]:
    return (project,), {}


def start_trackers(names: tuple[str, ...], folder: Path, run: str) -> list:
    """One started Accelerate tracker per name (call on the main process only); a tracker that cannot
    start (not logged in, no server) is an LmsslError naming it, not a traceback from its library."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    from lmssl.errors import LmsslError

    parts = folder.resolve().parts
    if ".partial" in parts[1:-1]:  # a stage works in RUN_DIR/.partial/<stage>-<fingerprint>/
        at = parts.index(".partial")
        stage = parts[at + 1].rsplit("-", 1)[0]
        project, run = parts[at - 1], run if run == stage else f"{stage}:{run}"
    else:
        project = folder.name
    started = []
    for name in names:
        args, kwargs = TRACKER_ARGS.get(name, _project_only)(project, run, folder)
        try:
            tracker = LOGGER_TYPE_TO_CLASS[name](*args, **kwargs)
            tracker.start()
        except Exception as err:  # anything its library raises: the user's setup, not lmssl's bug
            for other in started:
                other.finish()
            raise LmsslError(f"report_to: the {name} tracker could not start: {' '.join(str(err).split())[:500]}; "
                             f"fix its setup (login, server, environment) or remove {name!r} from report_to") from None
        started.append(tracker)
    return started


def _short(count: float) -> str:
    """1234567 -> '1.23M': a count the progress bar can show in a few characters."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= scale:
            return f"{count / scale:.3g}{suffix}"
    return f"{count:.0f}"


class Tracker:
    """Progress bar + metrics.jsonl + the recipe's Accelerate trackers (report_to) for one training loop."""

    def __init__(self, out_dir: Path, enabled: bool, total_steps: int, start_step: int, desc: str,
                 report_to: tuple[str, ...] = ("tensorboard",)):
        self.out_dir = Path(out_dir)
        self.enabled, self.desc = enabled, desc
        self.units = 0
        self.unit_name = "tokens"
        self.window_start = time.perf_counter()
        self.window_units = 0
        self.rate = 0.0
        self.flops_per_unit: Optional[float] = None   # training FLOPs of one token or image (lmssl/flops.py)
        self.peak: Optional[float] = None             # peak FLOP/s of all processes' devices; None on CPU
        self.trackers: list = []
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, disable=not enabled,
                        dynamic_ncols=True, mininterval=1.0)
        if enabled:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.trackers = start_trackers(tuple(n for n in report_to if n != "none"), self.out_dir, desc)
            self.jsonl = open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8")  # always, whatever report_to says

    def add_units(self, n: int, unit: str) -> None:
        self.units += n
        self.window_units += n
        self.unit_name = unit

    def set_flops(self, per_unit: Optional[float], peak: Optional[float]) -> None:
        self.flops_per_unit, self.peak = per_unit, peak

    def flops_metrics(self, units_per_s: float) -> dict[str, float]:
        """FLOP/s at a throughput, and MFU where the device's peak is known."""
        if self.flops_per_unit is None:
            return {}
        flops = units_per_s * self.flops_per_unit
        return {"train/flops_per_s": flops, **({"train/mfu": flops / self.peak} if self.peak else {})}

    def step(self, step: int, loss: float, lr: float) -> None:
        """Advance the bar by one optimizer step; refresh throughput every couple of seconds. `loss` is the
        mean of the last logged steps (read from the device once per log_every, not every step)."""
        now = time.perf_counter()
        if now - self.window_start >= 2.0:
            self.rate = self.window_units / (now - self.window_start)
            self.window_start, self.window_units = now, 0
        elif self.rate == 0.0 and now > self.window_start:  # the first seconds: the rate so far
            self.rate = self.window_units / (now - self.window_start)
        self.bar.update(1)
        if self.enabled:
            # units seen so far, with no total (a stream has none), and the last seconds' rate, not the average
            shown = {self.unit_name: _short(self.units), f"{self.unit_name}/s now": f"{self.rate:,.0f}"}
            flops = self.flops_metrics(self.rate)
            if flops:
                shown["TFLOP/s"] = f"{flops['train/flops_per_s'] / 1e12:.3g}"
                if "train/mfu" in flops:
                    shown["MFU"] = f"{100 * flops['train/mfu']:.1f}%"
            if loss == loss:                       # the loss of the last log_every steps (NaN before the first)
                shown = {"loss": f"{loss:.4f}", **shown}
            self.bar.set_postfix(lr=f"{lr:.2e}", **shown, refresh=False)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in metrics.items()}
        self.jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
        self.jsonl.flush()
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def write(self, message: str) -> None:
        if self.enabled:
            self.bar.write(message)

    def close(self) -> None:
        """Finish the trackers, close metrics.jsonl and draw loss.png from it."""
        from lmssl.plots import plot_curves

        self.bar.close()
        if self.enabled:
            self.jsonl.close()
            for tracker in self.trackers:
                tracker.finish()
            self.trackers = []
            plot_curves(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png", self.desc)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _plot_links(run_dir: Path, rows: list[dict[str, Any]]) -> list[str]:
    """Markdown for every stage's plots: its own as images, those of its training runs as links."""
    from lmssl.plots import stage_plots

    lines = []
    for row in rows:
        own, runs = stage_plots(run_dir, row["name"])
        lines += [f"![{row['name']} {p.stem}]({p.as_posix()})" for p in own]
        if runs:
            lines.append(f"{row['name']} training runs: "
                         + ", ".join(f"[{p.parent.name}]({p.as_posix()})" for p in runs))
    return ["## Plots", "", *[line + "\n" for line in lines]] if lines else []


def write_summary(run_dir: Path, recipe_name: str, rows: list[dict[str, Any]], extra: list[str]) -> str:
    """The run summary: one line per stage (status, time, headline metrics), then stage tables, then
    every stage's plots (relative links, so the folder can move)."""
    lines = [f"# Run summary: {recipe_name}", "", "| stage | kind | status | time | metrics |", "|---|---|---|---|---|"]
    for row in rows:
        metrics = ", ".join(f"{k}={_fmt(v)}" for k, v in row.get("headline", {}).items())
        spent = f"{row['seconds']:.1f}s"
        if row.get("phases"):  # where the time went: prepare, train, eval, save (and other)
            spent += " (" + ", ".join(f"{k} {v:.1f}" for k, v in row["phases"].items() if v >= 0.05) + ")"
        lines.append(f"| {row['name']} | {row['kind']} | {row['status']} | {spent} | {metrics} |")
    lines += [""] + extra + _plot_links(Path(run_dir), rows)
    text = redact_text("\n".join(lines).rstrip() + "\n")
    (Path(run_dir) / "summary.md").write_text(text, encoding="utf-8")
    return text
