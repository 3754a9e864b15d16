"""What every image method shares: decoded images from stage.data, an image processor with the
dataset's normalization, uint8 batches that become views on the training device, CLS-token
features for the kNN monitor, and a saved `ViTModel` backbone folder that `ViTModel`,
`ViTForImageClassification` and `AutoImageProcessor` load (no torchvision needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Optional

import numpy as np
import torch

from lmssl.data.views import draw_views, plan_views, to_pixels
from lmssl.errors import LmsslError, RecipeError
from lmssl.models import IMAGE_FAMILIES, vit_input
from lmssl.objectives.base import BaseObjective, Splits

PRETRAINING_FOLDER = "pretraining"  # beside the backbone: what continued pretraining needs (decoder, head)


VIT_TYPES = ("vit", "vit_mae")  # configs whose encoder is a ViTModel


def side(value) -> int:
    """An image_size that may be a number or a (height, width) pair, as a side in pixels."""
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def warm_start_config(model_cfg, where: str = "model"):
    """The warm start's config; an error naming model.init_from unless it is a ViT or ViT-MAE."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_cfg.init_from, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise LmsslError(f"{where}.init_from: cannot read a config from {model_cfg.init_from!r}: "
                         f"{' '.join(str(err).split())[:300]}") from None
    if config.model_type not in VIT_TYPES:
        raise LmsslError(f"{where}.init_from: {model_cfg.init_from!r} holds a {config.model_type} model; image "
                         f"objectives continue {' or '.join(VIT_TYPES)} models")
    return config


def image_size_of(model_cfg) -> int:
    """The side in pixels images are decoded to: the warm start's config, else the recipe's vit size."""
    if model_cfg.init_from:
        return side(warm_start_config(model_cfg).image_size)
    return vit_input(model_cfg)[0]


def processor_stats(source, trust_remote_code: bool = False) -> Optional[tuple[list[float], list[float]]]:
    """(mean, std) of the image processor saved with a model folder or hub id, or None when it has none."""
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    return (list(mean), list(std)) if mean is not None and std is not None else None


def image_processor(size: int, mean, std):
    """The processor saved beside every vision model: resize to size x size (bilinear), scale to [0, 1],
    normalize. PIL-based, so it loads and runs without torchvision."""
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(do_resize=True, size={"height": size, "width": size}, resample=2, do_rescale=True,
                                rescale_factor=1 / 255, do_normalize=True, image_mean=list(mean),
                                image_std=list(std))


def stack_images(examples: list[dict]) -> torch.Tensor:
    """uint8 (batch, 3, size, size) from decoded examples' pixels."""
    return torch.from_numpy(np.stack([e["pixels"] for e in examples]))


def flatten_views(views: dict, prefix: str) -> dict:
    """draw_views' choices, and the plan apply_views follows (plan_views: read here, on the host, so that the
    training device never waits to be read), as flat batch entries `<prefix>.<name>` (the loop moves
    tensors, not dicts; the plan's Python values stay as they are)."""
    return {f"{prefix}.{k}": v for k, v in {**views, **plan_views(views)}.items()}


def views_of(batch: dict, prefix: str) -> dict[str, torch.Tensor]:
    """The inverse of flatten_views."""
    start = len(prefix) + 1
    return {k[start:]: v for k, v in batch.items() if k.startswith(prefix + ".")}


def batch_generator() -> torch.Generator:
    """A CPU generator for one batch's views and masks, seeded from the RNG the loop seeded for this batch."""
    return torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))


class ImageObjective(BaseObjective):
    """Image methods on the vit family. Subclasses define training_module, collate, loss,
    `encode(module, pixel_values) -> (batch, dim)` and `backbone(model) -> ViTModel`; build_model is a
    ViTModel backbone (from config, or the warm start's) unless they need another model (MAE)."""

    modality: ClassVar[str] = "image"
    families: ClassVar[tuple[str, ...]] = IMAGE_FAMILIES
    pipeline_tag: ClassVar[str] = "image-feature-extraction"
    unused_fields: ClassVar[tuple[str, ...]] = ("tokenizer_from", "documents", "max_length", "data.column",
                                                "data.max_chars", "data.encoding")

    def __init__(self, options, preprocessor, max_length: Optional[int] = None, seed: int = 0):
        super().__init__(options, preprocessor, max_length, seed)
        self.processor = preprocessor
        self.size = int(preprocessor.size["height"])
        self.mean, self.std = list(preprocessor.image_mean), list(preprocessor.image_std)

    def build_model(self, model_cfg):
        """A ViTModel without pooler (the CLS token is the feature), built from the config or loaded
        from model.init_from; remembers init_from, where training_module finds saved heads."""
        from transformers import ViTConfig, ViTModel

        from lmssl.models import build_vit_config, warm_start_overrides

        self.init_from = model_cfg.init_from
        if model_cfg.init_from:
            return ViTModel.from_pretrained(model_cfg.init_from, add_pooling_layer=False,
                                            **warm_start_overrides(model_cfg))
        return ViTModel(build_vit_config(model_cfg, ViTConfig), add_pooling_layer=False)

    def two_view_batch(self, examples) -> dict:
        """A batch of two-view methods (SimCLR, BYOL, SimSiam, MoCo v3): the images once, and the choices of
        2n views (rows i and n+i are the two views of image i)."""
        images = stack_images(examples)                                    # (n, 3, S, S) uint8
        views = self.draw(2 * len(examples), self.options.views, batch_generator())
        return {"images": images, **flatten_views(views, "views")}

    @staticmethod
    def save_head(head: torch.nn.Module, filename: str, folder: Path) -> None:
        """continue_head's counterpart: `head`'s weights as folder/filename (safetensors)."""
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(folder / filename))

    def continue_head(self, head: torch.nn.Module, filename: str, what: str) -> None:
        """Load `head` from the warm start's PRETRAINING_FOLDER/filename when build_model warm-started from
        an lmssl folder holding one of the same shapes; warn and keep the fresh head when the shapes differ."""
        init_from = getattr(self, "init_from", None)
        saved = Path(init_from) / PRETRAINING_FOLDER / filename if init_from else None
        if saved is None or not saved.is_file():
            return
        import warnings

        from safetensors.torch import load_file

        heads = load_file(str(saved))
        own = head.state_dict()
        if heads.keys() == own.keys() and all(own[k].shape == v.shape for k, v in heads.items()):
            head.load_state_dict(heads)
        else:
            warnings.warn(f"{saved}: the {what} there has other shapes than the options ask for; training a "
                          "fresh head", stacklevel=3)

    @classmethod
    def check(cls, options, stage, where: str) -> None:
        super().check(options, stage, where)
        if stage.model.init_from:
            for key in ("image_size", "patch_size"):
                if getattr(stage.model, key) is not None:
                    raise RecipeError(f"{where}.model.{key}: a warm start keeps the {key} of model.init_from; "
                                      "drop the key")
            if Path(stage.model.init_from).expanduser().is_dir():  # local folders are checked before anything runs
                try:
                    warm_start_config(stage.model, f"{where}.model")
                except LmsslError as err:
                    raise RecipeError(str(err)) from None
        for key in ("image_mean", "image_std"):
            value = getattr(stage, key)
            if value is not None and (len(value) != 3 or (key == "image_std" and min(value) <= 0)):
                raise RecipeError(f"{where}.{key}: three per-channel numbers (R, G, B){', each > 0' if key == 'image_std' else ''}, "
                                  f"got {value!r}")

    @classmethod
    def read(cls, stage, seed: int, where: str) -> Splits:
        from lmssl.data.images import load_image_splits

        splits = load_image_splits(stage.data, image_size_of(stage.model), seed, where)
        held = splits.eval
        if held is not None:  # folders list images class by class: any prefix (eval_batches) should be a sample
            held = held.shuffle(seed=seed)
        return Splits(splits.train, held, splits.metrics, splits.label_names)

    @classmethod
    def load_preprocessor(cls, stage, train, resolve, where: str):
        from lmssl.data.images import channel_stats

        mean, std = stage.image_mean, stage.image_std
        if (mean is None or std is None) and stage.model.init_from:  # a warm start keeps its normalization
            inherited = processor_stats(stage.model.init_from, stage.model.trust_remote_code)
            if inherited is not None:
                mean, std = mean or inherited[0], std or inherited[1]
        if mean is None or std is None:
            measured = channel_stats(train)
            mean, std = mean or measured[0], std or measured[1]
        return image_processor(image_size_of(stage.model), mean, std)

    def prepare(self, dataset):
        return dataset

    def check_model(self, model, where: str) -> None:
        pixels = side(getattr(model.config, "image_size", self.size))
        if pixels != self.size:
            raise LmsslError(f"{where}.model: the model takes {pixels}-pixel images, the data was decoded at {self.size}")

    def draw(self, n: int, options, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The random choices of n views of this data's images."""
        return draw_views(n, self.size, self.size, options, generator)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """The evaluation view: normalized floats of the images as they are."""
        return to_pixels(images, self.mean, self.std)

    @torch.no_grad()
    def features(self, module, batch) -> torch.Tensor:
        return self.encode(module, self.pixels(batch["images"]))

    def save(self, accelerator, model, folder) -> None:
        """The backbone as a ViTModel folder with this data's image processor; what continued pretraining
        needs (decoder, projection head) under pretraining/."""
        from lmssl.hub import save_model

        save_model(accelerator, self.backbone(model), folder, self.processor,
                   extra=lambda out: self.save_pretraining(model, Path(out) / PRETRAINING_FOLDER))

    def save_pretraining(self, model, folder: Path) -> None:
        """Extra state for continued pretraining; none by default."""
        return None
