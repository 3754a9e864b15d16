"""The `probe` stage: how good are a pretrained ViT backbone's features? A linear probe on frozen
features (computed once; logistic regression solved to convergence) or full fine-tuning through the
training loop, scored by top-1 on held-out labeled images, with the kNN top-1 of the same features
beside it, optionally next to the same architecture from random initialization. Each backbone's
probe saves as a `ViTForImageClassification` folder with its label names and image processor, which
`pipeline("image-classification")` runs and which predicts exactly what the probe predicted.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from lmssl.data.views import ViewOptions
from lmssl.errors import LmsslError, RecipeError
from lmssl.models import VIT_SHAPE
from lmssl.recipe import DataConfig, TrainingConfig
from lmssl.schema import Range

# Fine-tuning defaults for the fields left unset (None), after MAE's fine-tuning recipe (1e-3 peak,
# warmup, cosine decay, weight decay 0.05), at a batch that suits small data.
FINETUNE_DEFAULTS = dict(learning_rate=1e-3, epochs=20.0, batch_size=64, weight_decay=0.05)


@dataclass
class Config(TrainingConfig):
    model_from: Union[str, list[str], None] = None
    """The backbone(s) to probe: pretrain stages, ViT folders or hub ids (one probe each, one table)."""
    data: DataConfig = field(default_factory=lambda: DataConfig(path="builtin:digits", eval_split="test"))
    """Labeled images: `split` trains the probe, `eval_split` scores it (else eval_fraction is held out);
    data.max_samples keeps that many training images (label-efficient probes)."""
    mode: Literal["linear", "finetune"] = "linear"
    """linear: a linear classifier on frozen CLS features; finetune: train the whole ViTForImageClassification."""
    scratch_baseline: bool = False
    """Also probe the same architecture from random initialization, side by side."""
    knn_k: Annotated[int, Range(1, 10_000)] = 20
    """kNN top-1 beside the probe: neighbours that vote (training images are the bank)."""
    knn_temperature: Annotated[float, Range(0.001, 100)] = 0.07
    """kNN votes weigh exp(cosine similarity / temperature)."""
    l2: Optional[Annotated[float, Range(0, 100)]] = None
    """linear: the L2 penalty of the logistic regression; None picks it from 1e-6..1e-1 by accuracy on a
    seeded tenth of the training features, then refits on all of them."""
    views: ViewOptions = field(default_factory=lambda: ViewOptions(jitter=0.0, grayscale=0.0, blur=0.0))
    """finetune: the training augmentation (random resized crop and flip; no color changes)."""
    learning_rate: Optional[Annotated[float, Range(0, 10, low_open=True)]] = None
    """finetune: peak learning rate; None: 1e-3."""
    epochs: Optional[Annotated[float, Range(0, low_open=True)]] = None
    """finetune: passes over the training images; None: 20."""
    batch_size: Optional[Annotated[int, Range(1)]] = None
    """Images per step (finetune); features are computed in batches of twice as many. None: 64."""
    weight_decay: Optional[Annotated[float, Range(0, 10)]] = None
    """finetune: AdamW weight decay; None: 0.05 (as MAE)."""
    warmup_ratio: Annotated[float, Range(0, 1, high_open=True)] = 0.05
    """5% warmup."""
    save_every: Optional[Annotated[int, Range(1)]] = None
    """Probes are short; checkpoint only when interrupted."""

    REFERENCES = {"model_from": ("pretrain",)}

    def check(self, recipe, earlier, where: str) -> None:
        if not self.backbones:
            raise RecipeError(f"{where}.model_from: name the backbone(s) to probe (a pretrain stage, folder or hub id)")
        for name in self.backbones:
            if name in earlier:
                from lmssl.objectives import OBJECTIVES

                if OBJECTIVES[earlier[name].objective].modality != "image":
                    raise RecipeError(f"{where}.model_from: stage {name!r} pretrains a text model; the probe "
                                      "stage takes ViT backbones")
        if len(set(self.backbones)) != len(self.backbones):
            raise RecipeError(f"{where}.model_from: a backbone is named twice: {self.backbones!r}")
        if self.data.label_column is None:
            raise RecipeError(f"{where}.data.label_column: a probe needs labels; name the label column")
        self.views.check(f"{where}.views")
        self.data.check(f"{where}.data")

    @property
    def backbones(self) -> list[str]:
        """model_from as a list."""
        if self.model_from is None:
            return []
        return [self.model_from] if isinstance(self.model_from, str) else list(self.model_from)


def _settings(cfg: Config) -> Config:
    """The config with every unset hyperparameter taken from the fine-tuning defaults."""
    return dataclasses.replace(cfg, **{k: getattr(cfg, k) if getattr(cfg, k) is not None else v
                                       for k, v in FINETUNE_DEFAULTS.items()}, eval_every=None)


def _load_backbone(source: str, where: str):
    """A ViTModel from a folder or hub id."""
    from transformers import ViTModel

    try:
        return ViTModel.from_pretrained(str(source), add_pooling_layer=False)
    except (OSError, ValueError) as err:
        raise LmsslError(f"{where}.model_from: cannot load a ViT backbone from {str(source)!r}: "
                         f"{' '.join(str(err).split())[:300]}") from None


def _labeled_splits(cfg: Config, size: int, ctx, where: str):
    """The probe's images at `size`, labeled rows only: (splits, how many unlabeled rows were dropped)."""
    from lmssl.data.images import labeled, load_image_splits

    with ctx.main_process_first():
        splits = load_image_splits(cfg.data, size, ctx.seed, where)
    if splits.label_names is None:
        raise LmsslError(f"{where}.data.label_column: the images have no labels "
                         f"({cfg.data.label_column!r} not found); a probe needs classes")
    if splits.eval is None or len(splits.eval) == 0:
        raise LmsslError(f"{where}.data.eval_split: no held-out images to score the probe on; name a test "
                         "split or set eval_fraction")
    splits.train, dropped_train = labeled(splits.train)
    splits.eval, dropped_eval = labeled(splits.eval)
    if len(splits.train) == 0 or len(splits.eval) == 0:
        raise LmsslError(f"{where}.data: no labeled {'training' if len(splits.train) == 0 else 'held-out'} "
                         "images (every label is missing, -1)")
    return splits, dropped_train + dropped_eval


def _scratch(backbone, seed: int):
    """The same architecture, randomly initialized from `seed`."""
    from transformers import ViTModel

    from lmssl.rng import seed_all

    seed_all(seed)
    return ViTModel(backbone.config, add_pooling_layer=False)


def _classifier(backbone, label_names: list[str], weight=None, bias=None):
    """A ViTForImageClassification holding `backbone` (and the given head, if any)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(**{k: v for k, v in backbone.config.to_dict().items() if k not in ("architectures",)})
    config.num_labels = len(label_names)
    config.id2label = dict(enumerate(label_names))
    config.label2id = {n: i for i, n in enumerate(label_names)}
    model = ViTForImageClassification(config)
    model.vit.load_state_dict(backbone.state_dict())
    if weight is not None:
        with torch.no_grad():
            model.classifier.weight.copy_(weight)
            model.classifier.bias.copy_(bias)
    return model


def _probe_once(cfg: Config, ctx, backbone, processor_stats, splits, run_dir: Path, desc: str) -> tuple[dict, object]:
    """Probe one backbone: (result row, the ViTForImageClassification it gives)."""
    import torch

    from lmssl.evaluation import extract_features, knn_accuracy, linear_probe, predict
    from lmssl.objectives.image_classification import BackboneFeatures, ImageClassification
    from lmssl.rng import seed_all
    from lmssl.training import train

    size, mean, std = processor_stats
    accelerator = ctx.accelerator
    backbone = backbone.to(accelerator.device)
    reader = BackboneFeatures(mean, std)
    batch = 2 * cfg.batch_size
    with ctx.phase("eval"):  # fp32 features even under mixed precision: the saved classifier sees fp32 too
        train_f, train_y = extract_features(reader, backbone, splits.train, batch, accelerator, autocast=False)
        test_f, test_y = extract_features(reader, backbone, splits.eval, batch, accelerator, autocast=False)
        classes = len(splits.label_names)
        knn = knn_accuracy(train_f, train_y, test_f, test_y, cfg.knn_k, cfg.knn_temperature, classes)
    extra = {}
    if cfg.mode == "linear":
        with ctx.phase("train"):
            weight, bias, extra["l2"] = linear_probe(train_f, train_y, classes, cfg.l2, ctx.seed)
        predicted = (test_f @ weight.T + bias).argmax(1)
        model = _classifier(backbone.cpu(), splits.label_names, weight, bias)
    else:
        seed_all(ctx.seed)
        model = _classifier(backbone.cpu(), splits.label_names)
        objective = ImageClassification(size, mean, std, cfg.views)
        result = train(objective, model, splits.train, splits.eval, cfg, accelerator, run_dir, run_dir / "checkpoints",
                       ctx.seed, ctx.gradient_accumulation_steps, desc=desc, report_to=ctx.report_to)
        ctx.add_phases(result.seconds)
        model = accelerator.unwrap_model(model)
        with ctx.phase("eval"):
            predicted = torch.tensor(predict(objective, model, splits.eval, cfg.batch_size, accelerator))
        model = model.cpu()
    top1 = float((predicted == test_y).double().mean())
    return {"knn_top1": knn, "top1": top1, "train_images": len(splits.train), "test_images": len(splits.eval),
            **extra}, model


def _labels(backbones: list[str], stages) -> dict[str, str]:
    """A short, distinct row name (and folder name) per backbone: the stage name, else the folder's
    name, else as much of its path as tells it apart; always a plain folder name (check_path_name)."""
    import re

    from lmssl.recipe import MAX_NAME, STAGE_DIR_FILES

    def plain(text: str) -> str:
        text = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).lstrip("-._")[:MAX_NAME] or "backbone"
        return text + "-backbone" if text.lower() in {r.lower() for r in STAGE_DIR_FILES} else text

    labels: dict[str, str] = {}
    for name in backbones:
        parts = [p for p in Path(str(name)).parts if p not in ("/", "..", ".")]
        depth, label = 1, plain(name if name in stages else "-".join(parts[-1:]))
        while label in labels.values() and depth < len(parts):
            depth += 1
            label = plain("-".join(parts[-depth:]))
        while label in labels.values():
            label = plain(label + "-2")
        labels[name] = label
    return labels


def _table(rows: list[dict], mode: str) -> list[str]:
    label = "linear probe" if mode == "linear" else "fine-tuned"
    table = [f"| backbone | init | kNN top-1 | {label} top-1 |", "|---|---|---|---|"]
    for row in rows:
        table.append(f"| {row['backbone']} | {row['init']} | {100 * row['knn_top1']:.1f} | {100 * row['top1']:.1f} |")
    return table


def run(cfg: Config, ctx):
    from lmssl.data.images import channel_stats
    from lmssl.hub import write_json
    from lmssl.objectives.vision import image_processor, processor_stats
    from lmssl.stages.base import StageResult

    where = f"stages.{cfg.name}"
    settings = _settings(cfg)
    rows, metrics, scratch_done = [], {}, {}
    decoded: dict[int, tuple] = {}
    labels = _labels(cfg.backbones, ctx.outputs)
    for name in cfg.backbones:
        with ctx.phase("prepare"):
            backbone = _load_backbone(ctx.resolve(name), where)
            size = backbone.config.image_size
            if size not in decoded:
                decoded[size] = _labeled_splits(cfg, size, ctx, where)
            splits, unlabeled = decoded[size]
            mean, std = processor_stats(ctx.resolve(name)) or channel_stats(splits.train)
        if unlabeled:
            metrics["data/skipped_unlabeled"] = float(unlabeled)
        candidates = [(labels[name], "pretrained", backbone)]
        arch = json.dumps({k: getattr(backbone.config, k, None) for k in VIT_SHAPE}, default=str)
        if cfg.scratch_baseline and arch not in scratch_done:
            scratch_done[arch] = f"scratch{'' if not scratch_done else '-' + labels[name]}"
            candidates.append((scratch_done[arch], "scratch", _scratch(backbone, ctx.seed)))
        for row_name, init, model in candidates:
            run_dir = ctx.out_dir / "runs" / f"{row_name}-{cfg.mode}"
            done = run_dir / "result.json"
            if done.exists():  # finished before an interruption
                row = json.loads(done.read_text(encoding="utf-8"))
            else:
                result, classifier = _probe_once(settings, ctx, model, (size, mean, std), splits, run_dir,
                                                 f"{row_name}/{cfg.mode}")
                row = {"backbone": row_name, "init": init, "mode": cfg.mode, **result}
                if init == "pretrained":
                    with ctx.phase("save"):
                        _save_probe(ctx, cfg, name, row, classifier, image_processor(size, mean, std), splits)
                if ctx.is_main:
                    run_dir.mkdir(parents=True, exist_ok=True)
                    write_json(done, row)
                ctx.accelerator.wait_for_everyone()
            rows.append(row)
            metrics[f"{row_name}/top1"] = row["top1"]
            metrics[f"{row_name}/knn_top1"] = row["knn_top1"]
    table = _table(rows, cfg.mode)
    if ctx.is_main:
        with ctx.phase("save"):
            write_json(ctx.out_dir / "results.json", {"results": rows, "metrics": metrics})
            (ctx.out_dir / "results.md").write_text("\n".join(table) + "\n", encoding="utf-8")
            from lmssl.plots import plot_results, probe_bars
            plot_results(probe_bars(rows), ctx.out_dir / "results.png", f"{cfg.name}: top-1 on held-out images")
    test_images = rows[0]["test_images"] if rows else 0
    report = (f"## {cfg.name}: {cfg.mode} probe, top-1 on {test_images} held-out images of {cfg.data.path} (x100)\n\n"
              + "\n".join(table) + "\n")
    return StageResult(ctx.out_dir, metrics, headline=dict(metrics), report=report)


def _save_probe(ctx, cfg: Config, source: str, row: dict, classifier, processor, splits) -> None:
    """The probe's ViTForImageClassification with its image processor (at the model's own size) and a card."""
    from lmssl.hub import base_model_of, dataset_ref, eval_result, is_hub_id, save_model, write_model_card

    folder = ctx.out_dir / row["backbone"]
    save_model(ctx.accelerator, classifier, folder, processor)
    if ctx.is_main:
        head = ("a linear classifier on its frozen CLS features" if cfg.mode == "linear"
                else "its whole network fine-tuned with a new head")
        write_model_card(
            folder, title=f"{row['backbone']}: {cfg.mode} probe on {cfg.data.path}",
            summary=(f"A ViTForImageClassification made by lmssl stage `{cfg.name}`: the backbone `{source}` with "
                     f"{head}, {len(splits.label_names)} classes; top-1 {100 * row['top1']:.1f} on "
                     f"{row['test_images']} held-out images."),
            recipe_raw=ctx.recipe_raw, stage_name=cfg.name, metrics={"top1": row["top1"], "knn_top1": row["knn_top1"]},
            pipeline_tag="image-classification", tags=("image-classification", cfg.mode), license_id=ctx.license,
            base_model=base_model_of(row["backbone"], ctx.recipe_raw) or base_model_of(str(source), ctx.recipe_raw),
            datasets=(cfg.data.path,) if is_hub_id(cfg.data.path) else (),
            eval_results=(
                eval_result("image-classification", *dataset_ref(cfg.data), "accuracy", row["top1"],
                            dataset_split=cfg.data.eval_split or "held-out", metric_name=f"{cfg.mode} probe top-1"),
                eval_result("image-classification", *dataset_ref(cfg.data), "accuracy", row["knn_top1"],
                            dataset_split=cfg.data.eval_split or "held-out", metric_name="kNN top-1"),
            ))
