"""RotNet: learning features by predicting which of four rotations an image was turned by (Gidaris et
al. 2018, "Unsupervised Representation Learning by Predicting Image Rotations", arXiv:1803.07728).

Each image of a batch (a random resized crop, flipped half the time) goes in four times, turned by
0, 90, 180 and 270 degrees (the paper found feeding all four rotated copies in one batch better than
one at random); a linear head (or a small MLP) on the ViT's CLS token classifies the rotation, with a
cross-entropy loss. Recognizing an object's orientation asks the encoder what and where the object
is. Views are drawn in `collate` from the loop's batch seed and made on the training device in
`loss`; evaluation scores the images as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F

from lmssl.data.views import ViewOptions, apply_views
from lmssl.schema import Range, check_ranges
from lmssl.objectives.vision import (ImageObjective, batch_generator, flatten_views,
                                    stack_images, views_of)

HEAD_FILE = "rotation_head.safetensors"
ROTATIONS = 4  # 0, 90, 180, 270 degrees: the paper's best set of rotations


@dataclass
class RotationViews(ViewOptions):
    """The crop each image is rotated from: mild crops and flips, no color changes (the task needs no
    invariance to color, and color cues do not give a rotation away)."""

    crop_scale: list[Annotated[float, Range(0, 1, low_open=True)]] = field(default_factory=lambda: [0.5, 1.0])
    jitter: Annotated[float, Range(0, 1)] = 0.0
    grayscale: Annotated[float, Range(0, 1)] = 0.0
    blur: Annotated[float, Range(0, 1)] = 0.0


@dataclass
class Options:
    """Options of the rotation objective (objective_args in a recipe)."""

    head_hidden: Annotated[int, Range(0, 65536)] = 0
    """Hidden width of the rotation classifier; 0: a linear layer on the CLS token (the task's signal then
    has to be linear in the features a probe reads)."""
    views: RotationViews = field(default_factory=RotationViews)
    """How each image is cropped before it is rotated."""

    def check(self, where: str) -> None:
        check_ranges(self, where)
        self.views.check(f"{where}.views")


def rotate_four(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, C, S, S) square images -> (4n, C, S, S) and labels (4n,): rotation-major, rows k*n .. k*n + n-1
    turned counter-clockwise by k * 90 degrees (torch.rot90 from the height axis towards the width axis)
    and labelled k."""
    n = images.shape[0]
    turned = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(ROTATIONS)])
    return turned, torch.arange(ROTATIONS, device=images.device).repeat_interleave(n)


class RotationClassifier(torch.nn.Module):
    """ViTModel -> CLS token -> rotation logits (batch, 4): the module RotNet trains."""

    def __init__(self, backbone, hidden: int):
        super().__init__()
        self.backbone = backbone
        width = backbone.config.hidden_size
        self.head = (torch.nn.Linear(width, ROTATIONS) if hidden == 0 else
                     torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.ReLU(),
                                         torch.nn.Linear(hidden, ROTATIONS)))

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixel_values=pixel_values).last_hidden_state[:, 0]   # (batch, width)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(pixel_values))                              # (batch, 4)


def unwrapped(module):
    """The module inside a DDP or DeepSpeed wrapper (FSDP2 shards in place and wraps nothing)."""
    return getattr(module, "module", module)


class Rotation(ImageObjective):
    name = "rotation"
    stat_names = ("loss", "rotation_accuracy")
    headline = ("loss", "rotation_accuracy", "knn_top1")
    Options = Options

    def training_module(self, model):
        """The backbone with its rotation head (continued from an lmssl rotation folder's head when
        build_model warm-started from one). Kept, so `save` writes the head beside the backbone."""
        module = RotationClassifier(model, self.options.head_hidden).to(model.device)
        self.trained = module
        self.continue_head(module.head, HEAD_FILE, "rotation head")
        return module

    def collate(self, examples):
        images = stack_images(examples)                                    # (n, 3, S, S) uint8
        views = self.draw(len(examples), self.options.views, batch_generator())
        return {"images": images, **flatten_views(views, "views")}

    def loss(self, module, batch):
        images = batch["images"]
        if unwrapped(module).training:   # crops and flips; evaluation turns the images as they are
            pixels = apply_views(images, views_of(batch, "views"), self.size, self.mean, self.std)
        else:
            pixels = self.pixels(images)
        turned, labels = rotate_four(pixels)                                # (4n, 3, S, S), (4n,)
        logits = module(turned)                                             # (4n, 4)
        with torch.autocast(logits.device.type, enabled=False):
            loss = F.cross_entropy(logits.float(), labels)
        hits = (logits.detach().argmax(1) == labels).sum()
        count = float(labels.shape[0])
        return loss, {"loss": (loss.detach() * count, count), "rotation_accuracy": (hits, count)}

    def encode(self, module, pixel_values):
        inner = unwrapped(module)
        backbone = inner.backbone if isinstance(inner, RotationClassifier) else inner
        return backbone(pixel_values=pixel_values).last_hidden_state[:, 0]

    def backbone(self, model):
        return model.backbone if isinstance(model, RotationClassifier) else model

    def save_pretraining(self, model, folder: Path) -> None:
        trained = getattr(self, "trained", None)
        if trained is not None:
            self.save_head(trained.head, HEAD_FILE, folder)
