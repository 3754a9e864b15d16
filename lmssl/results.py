"""`lmssl results`: run the results suite (the recipes listed in recipes/results/suite.yaml) and write
RESULTS.md from what the stages left in their folders: GLUE after each pretraining beside the same model
from scratch, causal perplexity per token and per word, vision probes, published reference rows, plots,
the commands, the device, the date and the wall time of every stage. Finished stages are skipped on a
re-run as in `lmssl run`, so an interrupted results run continues where it stopped. `--smoke` applies the
suite's smoke overrides (tiny models, a few steps): the same pipeline in minutes, for the test suite."""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from lmssl.errors import LmsslError

SUITE_FILE = "suite.yaml"

# Published rows, for reference only: GLUE *test-set* scores (x100) of the BERT miniatures, pretrained on
# BookCorpus + English Wikipedia for 1M steps of 256 x 512 tokens, fine-tuned 4 epochs with the best batch
# size and learning rate per task (Turc et al. 2019, "Well-Read Students Learn Better", arXiv:1908.08962; the
# table in the google-research/bert README). MRPC is F1/accuracy, STS-B Pearson/Spearman there.
PUBLISHED_GLUE = {
    "BERT-Tiny 2x128 (Turc et al. 2019, test)": {
        ("cola", "matthews_correlation"): 0.0, ("sst2", "accuracy"): 83.2, ("mrpc", "f1"): 81.1,
        ("mrpc", "accuracy"): 71.1, ("stsb", "pearson"): 74.3, ("stsb", "spearmanr"): 73.6, ("rte", "accuracy"): 57.2,
        ("wnli", "accuracy"): 62.3},
    "BERT-Mini 4x256 (Turc et al. 2019, test)": {
        ("cola", "matthews_correlation"): 0.0, ("sst2", "accuracy"): 85.9, ("mrpc", "f1"): 81.1,
        ("mrpc", "accuracy"): 71.8, ("stsb", "pearson"): 75.4, ("stsb", "spearmanr"): 73.3, ("rte", "accuracy"): 57.9,
        ("wnli", "accuracy"): 62.3},
}
# Published WikiText-2 test perplexities per word (word-level WikiText-2 v1, 245,569 test words with <eos>).
PUBLISHED_WIKITEXT2 = [
    ("GPT-2 small, 117M (Radford et al. 2019, table 3)", "WebText (40 GB), zero-shot: never trained on WikiText-2; "
     "1,024-token context, invertible detokenizers", 29.41),
    ("AWD-LSTM, 33M (Merity et al. 2018, table 2)", "trained on WikiText-2 train, word-level vocabulary of 33,278, "
     "750 epochs, no cache", 65.8),
    ("Pointer Sentinel-LSTM, 21M (Merity et al. 2017, table 2)", "trained on WikiText-2 train, word-level", 80.8),
]


@dataclass
class Suite:
    folder: Path
    recipes: list[str]
    """Recipe files of the folder, run in this order; each runs in RUN_DIR/<file stem>."""
    smoke: dict[str, list[str]] = field(default_factory=dict)
    """--set overrides per recipe file for the CPU smoke version."""
    data_root: str = "../shared/data"
    """The data folder the recipes name; --data-dir replaces this prefix in their paths."""
    notes: str = ""
    """Markdown that RESULTS.md carries under the tables: what was tried where pretraining does not pay."""


def load_suite(folder: Path) -> Suite:
    path = Path(folder) / SUITE_FILE
    if not path.is_file():
        raise LmsslError(f"--recipes: {str(folder)!r} holds no {SUITE_FILE} listing the results recipes")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise LmsslError(f"{path}: YAML syntax error: {' '.join(str(err).split())}") from None
    if not isinstance(raw, dict):
        raise LmsslError(f"{path}: a mapping with `recipes:` (and optionally smoke, data_root, notes)")
    recipes = raw.get("recipes")
    if not isinstance(recipes, list) or not recipes or not all(isinstance(r, str) for r in recipes):
        raise LmsslError(f"{path}: recipes: list the recipe files to run, e.g. [text.yaml, causal.yaml]")
    for name in recipes:
        if not (Path(folder) / name).is_file():
            raise LmsslError(f"{path}: recipes: {name!r} is not a file in {folder}")
    smoke = raw.get("smoke") or {}
    unknown = [k for k in smoke if k not in recipes]
    if unknown:
        raise LmsslError(f"{path}: smoke: {unknown[0]!r} is not one of the recipes")
    return Suite(Path(folder), recipes, {k: [str(v) for v in smoke[k] or []] for k in smoke},
                 str(raw.get("data_root", "../shared/data")), str(raw.get("notes", "")).strip())


def _rebase(value: Any, old: str, new: str) -> Any:
    """Every string of a raw recipe that starts with the `old` data root, moved to `new`."""
    if isinstance(value, dict):
        return {k: _rebase(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_rebase(v, old, new) for v in value]
    if isinstance(value, str) and (value == old or value.startswith(old.rstrip("/") + "/")):
        return new.rstrip("/") + value[len(old.rstrip("/")):]
    return value


def device_line() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), model)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU: {model}, {cores} cores usable, no GPU; torch {torch.__version__}, Python {platform.python_version()}"


def run_suite(suite: Suite, run_dir: Path, smoke: bool, data_dir: Optional[str],
              on_recipe: Callable[[str], None] = lambda name: None) -> float:
    """Run every recipe of the suite (finished stages are skipped); return the wall seconds of this call."""
    from lmssl import load_recipe, run_recipe

    started = time.time()
    for name in suite.recipes:
        on_recipe(name)
        rewrite = (lambda raw: _rebase(raw, suite.data_root, data_dir)) if data_dir else None
        recipe = load_recipe(suite.folder / name, suite.smoke.get(name, []) if smoke else [], rewrite=rewrite)
        run_recipe(recipe, run_dir=run_dir / Path(name).stem)
    return time.time() - started


# --------------------------------------------------------------------------- reading what the stages left

@dataclass
class Stage:
    recipe: str
    name: str
    kind: str
    config: dict
    metrics: dict
    seconds: float
    phases: dict
    results: Optional[dict]
    folder: Path


def collect(suite: Suite, run_dir: Path) -> list[Stage]:
    stages = []
    for name in suite.recipes:
        folder = run_dir / Path(name).stem
        raw = yaml.safe_load((suite.folder / name).read_text(encoding="utf-8"))
        for entry in raw.get("stages", []):
            stage_name = entry.get("name", entry.get("kind"))
            record_file = folder / stage_name / "stage.json"
            if not record_file.is_file():
                raise LmsslError(f"{folder / stage_name}: no finished stage there; run `lmssl results` to make it")
            record = json.loads(record_file.read_text(encoding="utf-8"))
            results_file = folder / stage_name / "results.json"
            results = json.loads(results_file.read_text(encoding="utf-8")) if results_file.is_file() else None
            stages.append(Stage(Path(name).stem, stage_name, record["kind"], record["config"], record["metrics"],
                                float(record.get("seconds", 0.0)), record.get("phases", {}), results,
                                folder / stage_name))
    return stages


# --------------------------------------------------------------------------- tables

def _fmt(mean: float, std: Optional[float] = None) -> str:
    return f"{100 * mean:.1f}" if std is None else f"{100 * mean:.1f} ± {100 * std:.1f}"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def glue_columns(stages: list[Stage]) -> tuple[list[str], dict]:
    """The finetune stages' rows merged: {(task, metric): {column: row}}, a column per pretrained source
    (the finetune stage's model_from) and one `scratch` column (the stage that ran the baseline)."""
    cells: dict = {}
    columns: list[str] = []
    for stage in stages:
        if stage.kind != "finetune" or not stage.results:
            continue
        for row in stage.results["results"]:
            column = "scratch" if row["init"] == "scratch" else str(stage.config.get("model_from"))
            if column not in columns:
                columns.append(column)
            cells.setdefault((row["task"], row["metric"]), {})[column] = row
    columns.sort(key=lambda c: c == "scratch")     # the baseline last
    return columns, cells


def task_means(cells: dict, column: str) -> dict[str, float]:
    """Each task's score (the mean of its metrics, the GLUE convention) in one column, mean over seeds."""
    by_task: dict[str, list[float]] = {}
    for (task, _), group in cells.items():
        if column in group:
            by_task.setdefault(task, []).append(group[column]["mean"])
    return {task: statistics.fmean(values) for task, values in by_task.items()}


def not_beating_scratch(cells: dict, columns: list[str]) -> list[tuple[str, str]]:
    """(pretrained column, task) wherever that pretraining's task score is not above scratch's."""
    if "scratch" not in columns:
        return []
    scratch = task_means(cells, "scratch")
    out = []
    for column in columns:
        if column == "scratch":
            continue
        mine = task_means(cells, column)
        out += [(column, task) for task in mine if task in scratch and mine[task] <= scratch[task]]
    return out


def glue_table(stages: list[Stage]) -> list[str]:
    columns, cells = glue_columns(stages)
    if not cells:
        return []
    published = list(PUBLISHED_GLUE)
    head = ["task", "metric", "seeds", *[f"{c} (validation)" for c in columns], *published]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|" + "---:|" * (len(columns) + len(published))]
    for (task, metric), group in cells.items():
        seeds = len(next(iter(group.values()))["scores"])
        row = [task, metric, str(seeds)]
        row += [_fmt(group[c]["mean"], group[c]["std"]) if c in group else "" for c in columns]
        row += [f"{PUBLISHED_GLUE[p][(task, metric)]:.1f}" if (task, metric) in PUBLISHED_GLUE[p] else "-"
                for p in published]
        lines.append("| " + " | ".join(row) + " |")
    averages = {c: task_means(cells, c) for c in columns}
    tasks = sorted(set.intersection(*(set(v) for v in averages.values())))
    if len(tasks) > 1:
        row = [f"**average of {len(tasks)} task scores**", "mean of metrics per task", ""]
        row += [f"**{100 * statistics.fmean(averages[c][t] for t in tasks):.1f}**" for c in columns]
        row += ["-" for _ in published]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def tokenizer_table(stages: list[Stage]) -> list[str]:
    rows = [s for s in stages if s.kind == "tokenizer"]
    if not rows:
        return []
    lines = ["| recipe | stage | spec | vocabulary | held-out bytes per token | words per token | wall time |",
             "|---|---|---|---:|---:|---:|---:|"]
    for s in rows:
        m = s.metrics
        lines.append(f"| {s.recipe} | {s.name} | {s.config.get('spec')} | {s.config.get('vocab_size'):,} | "
                     f"{m.get('bytes_per_token', 0):.2f} | {1 / max(m.get('fertility', 1), 1e-9):.2f} | "
                     f"{_minutes(s.seconds)} |")
    return lines


def pretrain_table(stages: list[Stage]) -> list[str]:
    rows = [s for s in stages if s.kind == "pretrain"]
    if not rows:
        return []
    lines = ["| recipe | stage | objective | model | parameters | steps x batch | seen | final eval | wall time |",
             "|---|---|---|---|---:|---|---:|---|---:|"]
    for s in rows:
        cfg, m = s.config, s.metrics
        model = cfg.get("model", {})
        shape = f"{model.get('family')} {model.get('size')}" + (f" {model['overrides']}" if model.get("overrides") else "")
        steps = int(m.get("steps", 0))
        image = m.get("data/images") is not None or model.get("family") == "vit"
        per_step = cfg.get("batch_size", 0) * (1 if image else cfg.get("max_length", 0))
        seen = f"{steps * per_step:,} {'images' if image else 'tokens'}"
        evals = ", ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in m.items()
                          if k.startswith("eval/") and isinstance(v, (int, float)))
        lines.append(f"| {s.recipe} | {s.name} | {cfg.get('objective')} | {shape} | {m.get('parameters', 0) / 1e6:.1f}M "
                     f"| {steps} x {cfg.get('batch_size')} | {seen} | {evals or '-'} | {_minutes(s.seconds)} |")
    return lines


def perplexity_table(stages: list[Stage]) -> list[str]:
    rows = [s for s in stages if s.kind == "perplexity"]
    if not rows:
        return []
    trained = {(s.recipe, s.name): s for s in stages if s.kind == "pretrain"}
    lines = ["| model | training | tokens scored | words | per token | **per word** | bits per byte | window / stride |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for s in rows:
        m = s.metrics
        source = trained.get((s.recipe, s.config.get("model_from")))
        if source is not None:
            cfg = source.config
            what = (f"lmssl `{source.name}`: {cfg['model'].get('family')} {cfg['model'].get('size')}, "
                    f"{source.metrics.get('parameters', 0) / 1e6:.1f}M")
            how = (f"{int(source.metrics.get('steps', 0))} steps x {cfg.get('batch_size')} x {cfg.get('max_length')} "
                   f"tokens, {_minutes(source.seconds)}")
        else:
            what, how = f"`{s.config.get('model_from')}`", "-"
        lines.append(f"| {what} | {how} | {int(m['targets']):,} | {int(m['words']):,} | {m['perplexity']:.2f} | "
                     f"**{m['perplexity_per_word']:.2f}** | {m['bits_per_byte']:.3f} | {m['window']} / {m['stride']} |")
    for name, how, value in PUBLISHED_WIKITEXT2:
        lines.append(f"| {name} | {how} | - | 245,569 | - | {value:.2f} | - | - |")
    return lines


def probe_table(stages: list[Stage]) -> list[str]:
    rows = [(s, r) for s in stages if s.kind == "probe" and s.results for r in s.results["results"]]
    if not rows:
        return []
    trained = {(s.recipe, s.name): s for s in stages if s.kind == "pretrain"}
    lines = ["| backbone | pretraining | probe | probe top-1 | kNN top-1 | train / test images |",
             "|---|---|---|---:|---:|---:|"]
    for stage, r in rows:
        source = trained.get((stage.recipe, r["backbone"]))
        how = "random initialization" if r["init"] == "scratch" else (
            f"{source.config.get('objective')}, {int(source.metrics.get('steps', 0))} steps x "
            f"{source.config.get('batch_size')}, {_minutes(source.seconds)}" if source else "-")
        lines.append(f"| {r['backbone']} | {how} | {r['mode']} | {_fmt(r['top1'])} | {_fmt(r['knn_top1'])} | "
                     f"{r.get('train_images', '-'):,} / {r.get('test_images', '-'):,} |")
    return lines


def time_table(stages: list[Stage]) -> list[str]:
    lines = ["| recipe | stage | kind | wall time | prepare | train | eval | save |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for s in stages:
        p = s.phases
        lines.append(f"| {s.recipe} | {s.name} | {s.kind} | {s.seconds:.0f} s | "
                     + " | ".join(f"{p.get(k, 0):.0f} s" for k in ("prepare", "train", "eval", "save")) + " |")
    total = sum(s.seconds for s in stages)
    lines.append(f"| **total** | | | **{total:.0f} s ({total / 60:.1f} min)** | | | | |")
    return lines


def plots(stages: list[Stage], folder: Path) -> list[Path]:
    from lmssl.plots import plot_results, probe_bars

    folder.mkdir(parents=True, exist_ok=True)
    made = []
    columns, cells = glue_columns(stages)
    bars = [(f"{task}\n{metric}", column, 100 * group[column]["mean"], 100 * group[column]["std"])
            for (task, metric), group in cells.items() for column in columns if column in group]
    if plot_results(bars, folder / "glue.png", "GLUE validation (x100), mean ± std over seeds"):
        made.append(folder / "glue.png")
    rows = [r for s in stages if s.kind == "probe" and s.results for r in s.results["results"]]
    if plot_results(probe_bars(rows), folder / "vision.png", "CIFAR-10 test top-1 (x100) of frozen features"):
        made.append(folder / "vision.png")
    return made


def render(suite: Suite, stages: list[Stage], out: Path, command: str, wall: float, smoke: bool) -> str:
    figures = plots(stages, out.parent / (out.stem.lower() + "-plots"))
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    total = sum(s.seconds for s in stages)
    text = [f"# Results{' (smoke version: tiny models, a few steps; the numbers mean nothing)' if smoke else ''}", "",
            "Does self-supervised pretraining pay at a budget one machine can spend? Every number below was produced "
            "by the committed recipes in `recipes/results/` and this command, on this machine:", "",
            f"    {command}", "",
            f"- Device: {device_line()}", f"- Date: {when}",
            f"- Wall time: {total / 60:.1f} min of stage time in all (this call: {wall / 60:.1f} min; stages finished "
            "by an earlier call were skipped and keep their own time)",
            "- One part alone: " + "; ".join(f"`lmssl run {suite.folder / n} --run-dir RUN_DIR/{Path(n).stem}`"
                                             for n in suite.recipes), ""]
    sections = [
        ("Tokenizers", "Trained by each recipe's tokenizer stage; compression measured on held-out text.",
         tokenizer_table(stages)),
        ("Pretraining", "The fixed budgets, and each run's last held-out evaluation.", pretrain_table(stages)),
        ("GLUE: pretrained against scratch",
         "Validation sets of ../shared/data/glue, official metrics x100, mean ± std over the seeds; each column "
         "fine-tunes the same architecture with the same settings, from the named pretraining or from random "
         "initialization. The published rows are **test-set** scores of models pretrained on BookCorpus + "
         "Wikipedia for 1M steps of 256 x 512 tokens (131B tokens), shown only to place the numbers.", glue_table(stages)),
        ("Causal LM: WikiText-2 test perplexity",
         "Per token: exp of the mean NLL of every test token (byte-level BPE tokens, so not comparable across "
         "tokenizers). **Per word**: exp of the summed NLL over the test set divided by its word count (words and "
         "line ends, as WikiText's `<eos>`), the number papers report; published rows are per word.",
         perplexity_table(stages)),
        ("Vision: CIFAR-10 probes", "A linear probe (logistic regression on frozen CLS features) and kNN on the training "
         "images, top-1 x100 on the held-out images (the counts in the last column).", probe_table(stages)),
    ]
    for title, intro, table in sections:
        if table:
            text += [f"## {title}", "", intro, "", *table, ""]
    columns, cells = glue_columns(stages)
    losing = not_beating_scratch(cells, columns)
    if cells and "scratch" in columns:
        text += ["### Where pretraining does not beat scratch", ""]
        text += ([f"- `{c}` on **{t}**: {100 * task_means(cells, c)[t]:.1f} against scratch "
                  f"{100 * task_means(cells, 'scratch')[t]:.1f} (task score, mean over seeds)" for c, t in losing]
                 or ["Nowhere: every pretraining beats scratch on every task (mean over seeds)."])
        text.append("")
    if suite.notes and not smoke:
        text += [suite.notes, ""]
    for figure in figures:
        text += [f"![{figure.stem}]({figure.relative_to(out.parent)})", ""]
    text += ["## Wall time per stage", "", *time_table(stages), ""]
    body = "\n".join(text)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(body, encoding="utf-8")
    partial.replace(out)                       # never a half-written RESULTS.md
    return body


def results_command(recipes: str, run_dir: str, out: str, smoke: bool, data_dir: Optional[str],
                    argv: list[str]) -> str:
    suite = load_suite(Path(recipes))
    if data_dir is not None and not Path(data_dir).is_dir():
        raise LmsslError(f"--data-dir: {data_dir!r} is not a folder")
    out_path = Path(out)
    if not out_path.parent.is_dir():
        raise LmsslError(f"--out: the folder of {out!r} does not exist")
    wall = run_suite(suite, Path(run_dir), smoke, data_dir, lambda name: print(f"[results] {name}", flush=True))
    stages = collect(suite, Path(run_dir))
    render(suite, stages, out_path, "lmssl " + " ".join(shlex.quote(a) for a in argv), wall, smoke)
    return f"wrote {out_path} ({len(stages)} stages, {sum(s.seconds for s in stages) / 60:.1f} min of stage time)"
