"""The `pretrain` stage: self-supervised training of a transformers model with one objective, text or
images. The stage follows the objective contract (objectives/base.py) and knows no method by name."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Optional

from lmssl.errors import RecipeError
from lmssl.models import ModelConfig, check_model, check_positions
from lmssl.recipe import DataConfig, TrainingConfig
from lmssl.schema import Range, parse_dataclass


@dataclass
class KnnConfig:
    """The kNN monitor of image pretraining: labeled training images are the memory bank, held-out
    images the queries, classified by their nearest bank features (cosine, weighted votes)."""

    enabled: bool = True
    """Run the monitor at every evaluation (eval_every and the end) when labels are at hand."""
    k: Annotated[int, Range(1, 10_000)] = 20
    """Neighbours that vote (20 suits banks of thousands; DINO and solo-learn use 20 and 200 on ImageNet)."""
    temperature: Annotated[float, Range(0.001, 100)] = 0.07
    """Votes weigh exp(similarity / temperature) (0.07, as in Wu et al. 2018 and DINO)."""
    bank_size: Annotated[int, Range(10)] = 10_000
    """Labeled training images in the bank, drawn with the seed (features of all of them each evaluation)."""
    max_queries: Annotated[int, Range(1)] = 10_000
    """Held-out images classified per evaluation, at most."""
    data: Optional[DataConfig] = None
    """Labeled images for the monitor: its split is the bank, its eval_split the queries; None takes the
    stage's own data (its training split and its held-out images)."""

    def check(self, where: str) -> None:
        if self.data is not None:
            self.data.check(f"{where}.data")


@dataclass
class Config(TrainingConfig):
    objective: str = "mlm"
    """The self-supervised objective: mlm, mlm_nsp, sop (BERT), causal_lm (gpt2, llama); mae, simclr (vit)."""
    objective_args: dict[str, Any] = field(default_factory=dict)
    """The objective's own options, e.g. {mask_rate: 0.15} for mlm or {mask_ratio: 0.75} for mae."""
    model_from: Optional[str] = None
    """Continue from an earlier pretrain stage (SimCSE after MLM, say), a folder or a hub id: its model
    (and, without tokenizer_from, its tokenizer or image processor); the same as model.init_from, which
    cannot name a stage."""
    tokenizer_from: Optional[str] = None
    """Text: a tokenizer stage, folder or hub id; None takes the tokenizer of model.init_from."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture family and size, or a checkpoint to warm-start from."""
    data: DataConfig = field(default_factory=DataConfig)
    """The unlabeled text, or the images (labels, when present, feed the kNN monitor only)."""
    documents: Literal["rows", "blank_lines"] = "rows"
    """Text: what a document is: rows (each row of data.column) or blank_lines (rows are lines of text
    and blank lines end a document, as in WikiText). NSP/SOP pairs and EOS joins follow documents."""
    max_length: Annotated[int, Range(8, 65536)] = 128
    """Text: tokens per training sequence, the causal block size (BERT pretrains mostly at 128)."""
    image_mean: Optional[list[Annotated[float, Range(0, 1)]]] = None
    """Images: per-channel mean (R, G, B in [0, 1]) to normalize with; None measures the training images."""
    image_std: Optional[list[Annotated[float, Range(0, 1, low_open=True)]]] = None
    """Images: per-channel standard deviation to normalize with; None measures the training images."""
    knn: KnnConfig = field(default_factory=KnnConfig)
    """Images: the kNN monitor (top-1 of held-out images by their nearest training images' labels)."""

    REFERENCES = {"tokenizer_from": ("tokenizer",), "model_from": ("pretrain",)}

    def check(self, recipe, earlier, where: str) -> None:
        from lmssl.objectives import OBJECTIVES

        if self.objective not in OBJECTIVES:
            raise RecipeError(f"{where}.objective: unknown objective {self.objective!r}; known: {', '.join(OBJECTIVES)}")
        objective = OBJECTIVES[self.objective]
        options = parse_dataclass(objective.Options, self.objective_args, f"{where}.objective_args")
        written = next((s for s in recipe.raw.get("stages", []) if isinstance(s, dict)
                        and s.get("name", s.get("kind")) == self.name), {})
        for key in objective.unused_fields:  # a field the method would ignore is a mistake, not a no-op
            head, _, tail = key.partition(".")
            if head in written and (not tail or (isinstance(written[head], dict) and tail in written[head])):
                raise RecipeError(f"{where}.{key}: the {self.objective} objective ({objective.modality}) does not use "
                                  "this field; drop it")
        if self.model_from is not None and self.model.init_from is not None:
            raise RecipeError(f"{where}.model_from: give model_from or model.init_from, not both")
        checked = self.model if self.model_from is None else dataclasses.replace(self.model, init_from=self.model_from)
        check_model(checked, f"{where}.model")
        objective.check(options, self if checked is self.model else dataclasses.replace(self, model=checked), where)
        if objective.modality == "text":
            check_positions(checked, self.max_length, f"{where}.model")
        if self.data.streaming:
            if not objective.streams:
                kind = "images are decoded once into an on-disk cache" if objective.modality == "image" else \
                    "it draws from the whole corpus at once"
                streamers = ", ".join(n for n, o in OBJECTIVES.items() if o.streams)
                raise RecipeError(f"{where}.data.streaming: the {self.objective} objective cannot train from a stream "
                                  f"({kind}); objectives that stream: {streamers}. Set streaming: false")
            if self.max_steps is None:
                raise RecipeError(f"{where}.max_steps: a streamed corpus has no known length, so epochs cannot say how "
                                  "long to train; give max_steps")
        self.knn.check(f"{where}.knn")
        self.data.check(f"{where}.data")


def _knn_monitor(cfg: Config, ctx, objective, model, splits, where: str):
    """on_eval for the loop: kNN top-1 of the held-out images, or None (with a notice) without labels."""
    from lmssl.data.images import labeled, load_image_splits
    from lmssl.evaluation import extract_features, knn_accuracy

    if not cfg.knn.enabled:
        return None
    if cfg.knn.data is not None:
        with ctx.main_process_first():
            own = load_image_splits(cfg.knn.data, objective.size, ctx.seed, f"{where}.knn")
        bank, queries, names = own.train, own.eval, own.label_names
    else:
        bank, queries, names = splits.train, splits.eval, splits.label_names
    if names is not None and queries is not None:
        (bank, _), (queries, _) = labeled(bank), labeled(queries)   # rows without a label (-1) cannot vote
    if names is None or queries is None or len(queries) == 0 or len(bank) == 0:
        ctx.print(f"[{cfg.name}] no kNN monitor: it needs labeled images and held-out ones "
                  "(data.label_column and data.eval_split, or knn.data)")
        return None
    # seeded subsets, not the first rows: folders and zips list their images class by class
    if len(bank) > cfg.knn.bank_size:
        bank = bank.shuffle(seed=ctx.seed).select(range(cfg.knn.bank_size))
    if len(queries) > cfg.knn.max_queries:
        queries = queries.shuffle(seed=ctx.seed + 1).select(range(cfg.knn.max_queries))
    batch = 2 * cfg.batch_size

    def monitor(step: int) -> dict[str, float]:
        bank_features, bank_labels = extract_features(objective, model, bank, batch, ctx.accelerator)
        features, labels = extract_features(objective, model, queries, batch, ctx.accelerator)
        top1 = knn_accuracy(bank_features, bank_labels, features, labels, cfg.knn.k, cfg.knn.temperature,
                            len(names))
        return {"eval/knn_top1": top1}

    return monitor


def run(cfg: Config, ctx):
    from lmssl.hub import base_model_of, dataset_ref, eval_result, is_hub_id, write_model_card
    from lmssl.objectives import OBJECTIVES
    from lmssl.stages.base import StageResult
    from lmssl.training import train

    where = f"stages.{cfg.name}"
    objective_cls = OBJECTIVES[cfg.objective]
    options = parse_dataclass(objective_cls.Options, cfg.objective_args, f"{where}.objective_args")
    base_model = cfg.model.init_from if is_hub_id(cfg.model.init_from) else None
    if base_model:  # a hub checkpoint (at model.revision): fetched into the HF cache, then read as a folder
        local = ctx.resolve(cfg.model.init_from, cfg.model.revision)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=str(local)))
    if cfg.model_from is not None:  # an earlier stage's folder (or a folder / hub id): a warm start
        base_model = base_model_of(cfg.model_from, ctx.recipe_raw)
        local = ctx.resolve(cfg.model_from)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=str(local)))
    with ctx.phase("prepare"):
        with ctx.main_process_first():
            streaming = cfg.data.streaming
            splits = (objective_cls.read_stream if streaming else objective_cls.read)(cfg, ctx.seed, where)
            preprocessor = objective_cls.load_preprocessor(cfg, splits.train, ctx.resolve, where)
            objective = objective_cls(options, preprocessor, cfg.max_length, ctx.seed)
            if streaming:   # nothing read yet: DataLoader workers tokenize, pack and collate as training goes
                from lmssl.data.streaming import TextStream

                train_data = TextStream(splits.train, objective.packing(), objective.tokenizer, objective.collate,
                                        cfg.data.column, cfg.documents, cfg.data.max_chars, cfg.data.shuffle_buffer)
            else:
                train_data = objective.prepare(splits.train)
            eval_data = objective.prepare(splits.eval) if splits.eval is not None else None
        model = objective.build_model(cfg.model)
        objective.check_model(model, where)
        monitor = _knn_monitor(cfg, ctx, objective, model, splits, where) if objective.modality == "image" else None
    def push_checkpoint(step, trained):  # strategy: checkpoints; the runner's hook gets a saver for this step
        ctx.on_save(step, lambda folder: objective.save(ctx.accelerator, trained, folder))
    result = train(objective, model, train_data, eval_data, cfg, ctx.accelerator, ctx.out_dir, ctx.ckpt_dir,
                   ctx.seed, ctx.gradient_accumulation_steps, desc=cfg.name, on_eval=monitor,
                   report_to=ctx.report_to, on_save=push_checkpoint if ctx.on_save is not None else None)
    ctx.add_phases(result.seconds)
    n_params = sum(p.numel() for p in model.parameters())
    seen = result.steps * ctx.gradient_accumulation_steps * cfg.batch_size * ctx.accelerator.num_processes
    metrics = dict(result.metrics, **splits.metrics, steps=result.steps, parameters=n_params,
                   train_examples=seen if streaming else len(train_data),
                   eval_examples=len(eval_data) if eval_data is not None else 0)
    shown = {f"eval/{name}" for name in objective.headline} | {"steps", "train/tokens_per_s", "train/images_per_s",
                                                               "train/flops_per_s", "train/mfu"}
    with ctx.phase("save"):
        objective.save(ctx.accelerator, model, ctx.out_dir)
        if ctx.is_main:
            family = model.config.model_type
            write_model_card(
                ctx.out_dir, title=f"{family} pretrained with {cfg.objective} ({cfg.name})",
                summary=f"A {n_params / 1e6:.1f}M-parameter {family} model pretrained from "
                        f"{'scratch' if not cfg.model.init_from else cfg.model.init_from} with the `{cfg.objective}` "
                        f"objective for {result.steps} steps on `{cfg.data.path}` by lmssl.",
                recipe_raw=ctx.recipe_raw, stage_name=cfg.name, metrics=metrics,
                pipeline_tag=objective.pipeline_tag, tags=(cfg.objective, family), license_id=ctx.license,
                datasets=(cfg.data.path,) if is_hub_id(cfg.data.path) else (), base_model=base_model,
                eval_results=tuple(
                    eval_result(objective.pipeline_tag or "feature-extraction", *dataset_ref(cfg.data),
                                key.split("/", 1)[1], metrics[key], dataset_split=cfg.data.eval_split or "held-out")
                    for key in sorted(shown) if key.startswith("eval/") and key in metrics),
            )
    headline = {k: v for k, v in metrics.items() if k in shown or (k.startswith("data/skipped") and v)}
    return StageResult(ctx.out_dir, metrics, headline=headline)
