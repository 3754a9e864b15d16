"""The `finetune` stage: fine-tune a pretrained model on GLUE or custom labeled tasks over several seeds,
score it offline, keep the best run per task, and (optionally) compare with random initialization."""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from lmssl.data.tasks import GLUE_TASKS, Task, TaskSpec, check_tasks, expand_tasks, load_task
from lmssl.errors import LmsslError, RecipeError
from lmssl.recipe import TrainingConfig
from lmssl.schema import Range


@dataclass
class Config(TrainingConfig):
    model_from: Optional[str] = None
    """A pretrain stage, a folder or a hub id; its tokenizer comes with it."""
    tasks: list[Union[str, TaskSpec]] = field(default_factory=lambda: ["pydocs-topic"])
    """GLUE task names (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli), `glue` for every GLUE task whose
    training data is present, builtin tasks (pydocs-topic), or mappings describing your own data."""
    glue_dir: Optional[str] = None
    """A local folder in the original glue_data layout (CoLA/, SST-2/, ...; .tsv or .tsv.xz); None reads
    nyu-mll/glue from the hub."""
    max_train_samples: Optional[Annotated[int, Range(1)]] = None
    """Keep only the first N training rows of each task (quick experiments, tests); None keeps all."""
    seeds: list[Annotated[int, Range(0, 2**32 - 1)]] = field(default_factory=lambda: [0])
    """Fine-tune once per seed; results are mean and standard deviation over seeds."""
    max_length: Optional[Annotated[int, Range(8, 65536)]] = None
    """Longest input in tokens (longer texts are truncated); None takes the task's default (128, 64 for SST-2)."""
    scratch_baseline: bool = False
    """Also fine-tune the same architecture from random initialization, for a side-by-side score."""
    learning_rate: Optional[Annotated[float, Range(0, 10, low_open=True)]] = None
    """Peak learning rate; None takes the task's default (2e-5, BERT practice for base-size models)."""
    epochs: Optional[Annotated[float, Range(0, low_open=True)]] = None
    """Passes over each task's training data; None takes the task's default (3; 5 on the small GLUE tasks)."""
    batch_size: Optional[Annotated[int, Range(1)]] = None
    """Examples per device per step; None takes the task's default (32; 16 on the small GLUE tasks)."""
    schedule: Literal["cosine", "linear", "constant"] = "linear"
    """Linear decay after warmup, as in BERT fine-tuning."""
    warmup_ratio: Annotated[float, Range(0, 1, high_open=True)] = 0.1
    """10% warmup, as in BERT fine-tuning."""
    save_every: Optional[Annotated[int, Range(1)]] = None
    """Fine-tuning runs are short; checkpoint only when interrupted."""
    trust_remote_code: bool = False
    """Run model code shipped inside model_from (a security decision: off unless you trust that repository)."""

    REFERENCES = {"model_from": ("pretrain", "finetune")}

    def check(self, recipe, earlier, where: str) -> None:
        if self.model_from is None:
            raise RecipeError(f"{where}.model_from: name the model to fine-tune (a pretrain stage, folder or hub id)")
        if not self.tasks:
            raise RecipeError(f"{where}.tasks: name at least one task")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise RecipeError(f"{where}.seeds: list one or more distinct seeds, got {self.seeds!r}")
        check_tasks(self.tasks, self.glue_dir, where)


def _settings(cfg: Config, task: Task, positions: Optional[int]) -> Config:
    """The stage's config with each unset hyperparameter filled from the task's defaults; the task's
    default length is capped at the model's positions, and a length beyond them is an error."""
    pick = {key: getattr(cfg, key) if getattr(cfg, key) is not None else getattr(task.defaults, key)
            for key in ("learning_rate", "epochs", "batch_size", "max_length")}
    if positions is not None and pick["max_length"] > positions:
        if cfg.max_length is not None:
            raise LmsslError(f"stages.{cfg.name}.max_length: {cfg.max_length} tokens is beyond the {positions} "
                             f"positions of {cfg.model_from}; lower it to {positions} or less")
        pick["max_length"] = positions
    return dataclasses.replace(cfg, **pick)


def _positions(source, trust_remote_code: bool) -> Optional[int]:
    """How many tokens the model at `source` takes (None: no limit, or no config to tell)."""
    from transformers import AutoConfig

    from lmssl.models import max_positions_of

    try:
        return max_positions_of(AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code))
    except (OSError, ValueError):
        return None


def _load_model(source, task: Task, scratch: bool, tokenizer, trust_remote_code: bool = False):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    names = task.label_names or ["score"]
    kwargs = dict(num_labels=len(names), id2label=dict(enumerate(names)),
                  label2id={n: i for i, n in enumerate(names)}, pad_token_id=tokenizer.pad_token_id,
                  problem_type="regression" if task.label_names is None else "single_label_classification",
                  trust_remote_code=trust_remote_code)
    try:
        if scratch:
            return AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(str(source), **kwargs))
        # A head trained for another task may have another size: it is replaced, the encoder is kept.
        return AutoModelForSequenceClassification.from_pretrained(str(source), ignore_mismatched_sizes=True, **kwargs)
    except (OSError, ValueError) as err:
        raise LmsslError(f"model_from: cannot load a model from {str(source)!r}: {' '.join(str(err).split())}") from None


def _scores(task: Task, predictions: dict[str, list], references: dict[str, list]) -> dict[str, float]:
    from lmssl.evaluation import METRIC_FUNCTIONS

    scores = {}
    for split, preds in predictions.items():
        suffix = "" if len(task.evals) == 1 else "_" + split.removeprefix("validation_")
        for metric in task.metrics:
            scores[metric + suffix] = float(METRIC_FUNCTIONS[metric](preds, references[split]))
    return scores


def _finetune_once(cfg: Config, ctx, task: Task, prepared: dict, objective, source, tokenizer, scratch: bool,
                   seed: int, run_dir: Path) -> tuple[object, dict]:
    """Train one model; return it (its best epoch's weights) with its validation scores."""
    from lmssl.evaluation import predict, task_score
    from lmssl.rng import seed_all
    from lmssl.training import train

    with ctx.phase("prepare"):
        seed_all(seed)  # the new head's initial weights (and the whole model's, from scratch) depend on the seed
        model = _load_model(source, task, scratch, tokenizer, cfg.trust_remote_code)
    first = next(iter(task.evals))
    references = {split: task.evals[split]["label"] for split in task.evals}
    best: dict = {"value": None}

    def score_and_keep_best(step: int) -> dict[str, float]:
        """Score the task metric after every epoch; keep the best weights (in memory) by it."""
        preds = {split: predict(objective, model, prepared[split], cfg.batch_size, ctx.accelerator)
                 for split in task.evals}
        scores = _scores(task, preds, references)
        value = task_score(scores)
        if best["value"] is None or value > best["value"]:
            state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            best.update(value=value, scores=scores, step=step, state=state)
        return {f"eval/{k}": v for k, v in scores.items()}

    per_epoch = len(prepared["train"]) // (cfg.batch_size * ctx.accelerator.num_processes)
    epoch_steps = max(1, per_epoch // ctx.gradient_accumulation_steps)
    result = train(objective, model, prepared["train"], prepared[first],
                   dataclasses.replace(cfg, eval_every=epoch_steps), ctx.accelerator, run_dir, run_dir / "checkpoints",
                   seed, ctx.gradient_accumulation_steps, desc=f"{task.name}{'-scratch' if scratch else ''}/seed{seed}",
                   on_eval=score_and_keep_best, report_to=ctx.report_to)
    ctx.add_phases(result.seconds)
    model = ctx.accelerator.unwrap_model(model)
    model.load_state_dict(best["state"])
    return model, {"seed": seed, "scores": best["scores"], "best_step": best["step"]}


def _test_predictions(cfg: Config, ctx, task: Task, prepared: dict, objective, model, folder: Path,
                      trust_remote_code: bool) -> dict[str, list]:
    """The test splits predicted by the kept (best) model: the one in memory, or the one saved in `folder`
    when it was trained before an interruption. Once per task, not per seed and init."""
    from lmssl.evaluation import predict

    if model is None:
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=trust_remote_code)
        model.to(ctx.accelerator.device)
    with ctx.phase("eval"):
        return {split: predict(objective, model, prepared[split], cfg.batch_size, ctx.accelerator)
                for split in task.tests}


def _write_submission(folder: Path, task: Task, predictions: dict[str, list]) -> None:
    """GLUE submission files: <TASK>.tsv with a header `index<TAB>prediction` and one row per test example."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, preds in predictions.items():
        lines = ["index\tprediction"]
        for idx, value in zip(task.tests[split]["idx"], preds):
            if task.label_names is None:
                lines.append(f"{idx}\t{min(5.0, max(0.0, value)) if task.name == 'stsb' else value:.3f}")
            else:
                lines.append(f"{idx}\t{task.label_names[int(value)] if task.predict_names else int(value)}")
        (folder / f"{task.submission[split]}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _table(rows: list[dict], scratch: bool) -> list[str]:
    """Markdown: one row per task and metric, scores x100 as mean ± std over seeds, inits side by side."""
    inits = ["pretrained", "scratch"] if scratch else ["pretrained"]
    table = ["| task | metric | seeds | " + " | ".join(inits) + " |", "|---|---|---|" + "---|" * len(inits)]
    for (task, metric), group in _grouped(rows).items():
        cells = [f"{100 * group[i]['mean']:.1f} ± {100 * group[i]['std']:.1f}" if i in group else "" for i in inits]
        table.append(f"| {task} | {metric} | {len(group['pretrained']['scores'])} | " + " | ".join(cells) + " |")
    return table


def _task_dataset(entry) -> tuple[str, str]:
    """(dataset type, name) of a task for the card: GLUE's hub dataset, or the task's own data."""
    from lmssl.hub import dataset_ref

    if isinstance(entry, str) and entry in GLUE_TASKS:
        return "nyu-mll/glue", f"GLUE {entry.upper()}"
    return dataset_ref(entry.data) if isinstance(entry, TaskSpec) else (entry, entry)


def _grouped(rows: list[dict]) -> dict:
    out: dict = {}
    for row in rows:
        out.setdefault((row["task"], row["metric"]), {})[row["init"]] = row
    return out


def run(cfg: Config, ctx):
    from transformers import AutoTokenizer

    from lmssl.evaluation import task_score
    from lmssl.hub import base_model_of, eval_result, is_hub_id, save_model, write_json, write_model_card
    from lmssl.models import fit_tokenizer
    from lmssl.objectives.classification import SequenceClassification
    from lmssl.stages.base import StageResult

    source = ctx.resolve(cfg.model_from)
    where = f"stages.{cfg.name}"
    try:
        with ctx.phase("prepare"):
            tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise LmsslError(f"{where}.model_from: cannot load a tokenizer from {str(source)!r}: "
                         f"{str(err).splitlines()[0]}") from None
    if tokenizer.pad_token is None:  # GPT-2 and Llama tokenizers have none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    positions = _positions(source, cfg.trust_remote_code)
    metrics: dict[str, float] = {}
    rows: list[dict] = []
    inits = [False, True] if cfg.scratch_baseline else [False]
    for entry in expand_tasks(cfg.tasks, cfg.glue_dir, lambda text: ctx.print(f"[{cfg.name}] {text}")):
        with ctx.phase("prepare"):
            task = load_task(entry, cfg.glue_dir, ctx.seed, where)
            if cfg.max_train_samples is not None:
                task.train = task.train.select(range(min(cfg.max_train_samples, len(task.train))))
            settings = _settings(cfg, task, positions)
            objective = SequenceClassification(tokenizer, "text", "text_pair" if task.has_pair else None,
                                               settings.max_length, len(task.label_names or [None]))
            with ctx.main_process_first():
                prepared = {split: objective.prepare(data) for split, data in
                            [("train", task.train), *task.evals.items(), *task.tests.items()]}
        for scratch in inits:
            init = "scratch" if scratch else "pretrained"
            runs, best, best_model = [], None, None
            for seed in cfg.seeds:
                run_dir = ctx.out_dir / "runs" / f"{task.name}-{init}-seed{seed}"
                done = run_dir / "result.json"
                if done.exists():  # finished before an interruption: its model, if best, is already saved
                    result = json.loads(done.read_text(encoding="utf-8"))
                    model = None
                else:
                    model, result = _finetune_once(settings, ctx, task, prepared, objective, source, tokenizer,
                                                   scratch, seed, run_dir)
                runs.append(result)
                score = task_score(result["scores"])
                if best is None or score > best[0]:
                    best, best_model = (score, result), model
                    if model is not None and not scratch:
                        with ctx.phase("save"):
                            fit_tokenizer(tokenizer, model)
                            save_model(ctx.accelerator, model, ctx.out_dir / task.name, tokenizer)
                if ctx.is_main and not done.exists():
                    run_dir.mkdir(parents=True, exist_ok=True)
                    write_json(done, result)
                    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            for metric in runs[0]["scores"]:
                values = [r["scores"][metric] for r in runs]
                mean, std = _mean_std(values)
                metrics[f"{task.name}/{init}/{metric}"] = mean
                rows.append({"task": task.name, "init": init, "metric": metric, "mean": mean, "std": std,
                             "seeds": list(cfg.seeds), "scores": values, "best_seed": best[1]["seed"]})
            if not scratch and task.tests:        # every process predicts (sharded); the main one writes
                tests = best[1].get("tests") or _test_predictions(settings, ctx, task, prepared, objective, best_model,
                                                                 ctx.out_dir / task.name, cfg.trust_remote_code)
                if ctx.is_main:
                    _write_submission(ctx.out_dir / "submission", task, tests)
            best_model = None
        if ctx.is_main:
            with ctx.phase("save"):
                best_seed = next(r["best_seed"] for r in rows if r["task"] == task.name and r["init"] == "pretrained")
                curve = ctx.out_dir / "runs" / f"{task.name}-pretrained-seed{best_seed}" / "loss.png"
                if curve.exists():  # the kept model's own training curve, beside its card
                    shutil.copyfile(curve, ctx.out_dir / task.name / "loss.png")
                write_model_card(
                    ctx.out_dir / task.name, title=f"{task.name} fine-tuned from {cfg.model_from}",
                    summary=(f"Fine-tuned by lmssl stage `{cfg.name}` on task `{task.name}` (learning rate "
                             f"{settings.learning_rate}, {settings.epochs} epochs, batch {settings.batch_size}, "
                             f"max length {settings.max_length}); the best of seeds {cfg.seeds} by validation score."),
                    recipe_raw=ctx.recipe_raw, stage_name=cfg.name,
                    metrics={k: v for k, v in metrics.items() if k.startswith(task.name + "/")},
                    pipeline_tag="text-classification", tags=("text-classification", task.name), license_id=ctx.license,
                    base_model=base_model_of(cfg.model_from, ctx.recipe_raw),
                    datasets=(_task_dataset(entry)[0],) if is_hub_id(_task_dataset(entry)[0]) else (),
                    eval_results=tuple(
                        eval_result("text-classification", *_task_dataset(entry), r["metric"], r["mean"],
                                    dataset_config=task.name if task.name in GLUE_TASKS else None,
                                    dataset_split="validation")
                        for r in rows if r["task"] == task.name and r["init"] == "pretrained"),
                )
    table = _table(rows, cfg.scratch_baseline)
    glue_means = [statistics.fmean(r["mean"] for r in rows if r["task"] == t and r["init"] == "pretrained")
                  for t in dict.fromkeys(r["task"] for r in rows) if t in GLUE_TASKS]
    if len(glue_means) > 1:
        metrics["glue/pretrained/average"] = statistics.fmean(glue_means)
    if ctx.is_main:
        with ctx.phase("save"):
            write_json(ctx.out_dir / "results.json", {"results": rows, "metrics": metrics})
            (ctx.out_dir / "results.md").write_text("\n".join(table) + "\n", encoding="utf-8")
            from lmssl.plots import finetune_bars, plot_results
            plot_results(finetune_bars(rows), ctx.out_dir / "results.png", f"{cfg.name}: validation, mean ± std of seeds")
    report = f"## {cfg.name}: fine-tuning results (validation, x100, mean ± std over seeds)\n\n" + "\n".join(table)
    if "glue/pretrained/average" in metrics:
        report += f"\n\nGLUE average over {len(glue_means)} tasks: {100 * metrics['glue/pretrained/average']:.1f}"
    headline = {k: v for k, v in metrics.items() if k.count("/") == 2}
    return StageResult(ctx.out_dir, metrics, headline=headline, report=report + "\n")
