"""The `finetune` stage: fine-tune a pretrained model on labeled tasks and score it, optionally
next to the same architecture trained from random initialization."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Optional, Union

from lmssl.data.tasks import BUILTIN_TASKS, TaskSpec, task_spec
from lmssl.errors import LmsslError, RecipeError
from lmssl.recipe import TrainingConfig


@dataclass
class Config(TrainingConfig):
    model_from: Optional[str] = None
    """A pretrain stage, a folder or a hub id; its tokenizer comes with it."""
    tasks: list[Union[str, TaskSpec]] = field(default_factory=lambda: ["pydocs-topic"])
    """Task names (builtin) or task descriptions (data, text/label columns)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Fine-tune once per seed; results are mean and standard deviation over seeds."""
    max_length: int = 128
    """Longest input in tokens; longer texts are truncated."""
    scratch_baseline: bool = False
    """Also fine-tune the same architecture from random initialization, for a side-by-side score."""
    learning_rate: float = 1e-4
    """Fine-tuning learning rate (small models tolerate more than BERT-base's 2e-5)."""
    epochs: float = 3.0
    """Passes over each task's training data (GLUE practice: 3)."""
    warmup_ratio: float = 0.1
    """10% warmup, as in BERT fine-tuning."""
    save_every: Optional[int] = None
    """Fine-tuning runs are short; checkpoint only when interrupted."""

    REFERENCES = {"model_from": ("pretrain", "finetune")}

    def check(self, recipe, earlier, where: str) -> None:
        if self.model_from is None:
            raise RecipeError(f"{where}.model_from: name the model to fine-tune (a pretrain stage, folder or hub id)")
        if not self.tasks:
            raise RecipeError(f"{where}.tasks: name at least one task")
        for i, task in enumerate(self.tasks):
            if isinstance(task, str) and task not in BUILTIN_TASKS:
                raise RecipeError(f"{where}.tasks[{i}]: unknown task {task!r}; known: {', '.join(BUILTIN_TASKS)}")
            if isinstance(task, TaskSpec):
                task.data.check(f"{where}.tasks[{i}].data")


def load_task(spec: TaskSpec, seed: int, where: str):
    """(train, validation) for a task; rows carry the text columns and an integer/float `label`."""
    from lmssl.data.text import _load

    data = _load(spec.data, spec.data.split)
    for column in filter(None, (spec.text_column, spec.pair_column, spec.label_column)):
        if column not in data.column_names:
            raise LmsslError(f"{where}: task {spec.name!r} has no column {column!r}; columns: {', '.join(data.column_names)}")
    if "split" in data.column_names and not spec.data.eval_split:
        train = data.filter(lambda r: r["split"] == "train")
        valid = data.filter(lambda r: r["split"] == "validation")
    elif spec.data.eval_split:
        train, valid = data, _load(spec.data, spec.data.eval_split)
    else:
        parts = data.train_test_split(test_size=0.1, seed=seed)
        train, valid = parts["train"], parts["test"]
    if len(train) == 0 or len(valid) == 0:
        raise LmsslError(f"{where}: task {spec.name!r} has an empty {'training' if len(train) == 0 else 'validation'} split")
    if spec.label_column != "label":
        train = train.rename_column(spec.label_column, "label")
        valid = valid.rename_column(spec.label_column, "label")
    return train, valid


def _finetune_once(cfg: Config, ctx, spec: TaskSpec, train_rows, valid_rows, source, scratch: bool, seed: int,
                   out_dir):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from lmssl.evaluation import evaluate_objective
    from lmssl.objectives.classification import SequenceClassification
    from lmssl.training import seed_all, train

    tokenizer = AutoTokenizer.from_pretrained(str(source))
    num_labels = spec.num_labels or len(set(train_rows["label"]))
    objective = SequenceClassification(tokenizer, spec.text_column, spec.pair_column, cfg.max_length, num_labels)
    with ctx.main_process_first():
        train_data = objective.prepare(train_rows)
        valid_data = objective.prepare(valid_rows)
    seed_all(seed)
    if scratch:
        config = AutoConfig.from_pretrained(str(source), num_labels=num_labels)
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(source), num_labels=num_labels)
    result = train(objective, model, train_data, valid_data, cfg, ctx.accelerator, out_dir, out_dir / "checkpoints",
                   seed, ctx.gradient_accumulation_steps, desc=f"{spec.name}{'-scratch' if scratch else ''}/seed{seed}")
    scores = evaluate_objective(objective, model, valid_data, cfg.batch_size, ctx.accelerator, seed)
    return model, tokenizer, scores, result


def run(cfg: Config, ctx):
    from lmssl.hub import save_model, write_json, write_model_card
    from lmssl.runner import StageResult

    source = ctx.resolve(cfg.model_from)
    where = f"stages.{cfg.name}"
    metrics: dict[str, float] = {}
    table = ["| task | init | metric | mean | std | seeds |", "|---|---|---|---|---|---|"]
    results = []
    for task in cfg.tasks:
        spec = task_spec(task)
        train_rows, valid_rows = load_task(spec, ctx.seed, where)
        for scratch in ([False, True] if cfg.scratch_baseline else [False]):
            init = "scratch" if scratch else "pretrained"
            scores, best = [], None
            for seed in cfg.seeds:
                run_dir = ctx.out_dir / "runs" / f"{spec.name}-{init}-seed{seed}"
                model, tokenizer, score, _ = _finetune_once(cfg, ctx, spec, train_rows, valid_rows, source,
                                                             scratch, seed, run_dir)
                key = "accuracy" if "accuracy" in score else "loss"
                scores.append(score[key])
                better = best is None or (score[key] > best[0] if key == "accuracy" else score[key] < best[0])
                if better and not scratch:
                    best = (score[key], seed)
                    save_model(ctx.accelerator, model, ctx.out_dir / spec.name, tokenizer)
            mean = statistics.fmean(scores)
            std = statistics.stdev(scores) if len(scores) > 1 else 0.0
            metrics[f"{spec.name}/{init}/{key}"] = mean
            table.append(f"| {spec.name} | {init} | {key} | {mean:.4f} | {std:.4f} | {len(scores)} |")
            results.append({"task": spec.name, "init": init, "metric": key, "mean": mean, "std": std,
                            "scores": scores})
        if ctx.is_main:
            write_model_card(
                ctx.out_dir / spec.name, title=f"{spec.name} fine-tuned from {cfg.model_from}",
                summary=f"Fine-tuned by lmssl stage `{cfg.name}` on task `{spec.name}`; best of seeds {cfg.seeds}.",
                recipe_raw=ctx.recipe_raw, stage_name=cfg.name,
                metrics={k: v for k, v in metrics.items() if k.startswith(spec.name + "/")},
                pipeline_tag="text-classification", tags=("text-classification", spec.name),
            )
    if ctx.is_main:
        write_json(ctx.out_dir / "results.json", {"results": results})
        (ctx.out_dir / "results.md").write_text("\n".join(table) + "\n", encoding="utf-8")
    report = f"## {cfg.name}: fine-tuning results (validation)\n\n" + "\n".join(table) + "\n"
    return StageResult(ctx.out_dir, metrics, headline=metrics, report=report)
