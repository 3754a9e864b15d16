"""SimCLR: contrastive learning of two augmented views of every image (Chen et al. 2020, "A Simple
Framework for Contrastive Learning of Visual Representations", arXiv:2002.05709).

An HF `ViTModel` encodes each view; its CLS token (what ViTForImageClassification classifies)
goes through a projection MLP; NT-Xent pulls the two views of an image together against every
other view in the batch, the views of every process included (negatives cross processes through
an all-gather that carries gradients). Views are drawn in `collate` from the loop's batch seed and
made on the training device in `loss`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F

from lmssl.collectives import gather_with_grad
from lmssl.data.views import ViewOptions, apply_views
from lmssl.schema import Range, check_ranges
from lmssl.objectives.vision import ImageObjective, views_of

HEAD_FILE = "projection_head.safetensors"


@dataclass
class Options:
    """Options of the simclr objective (objective_args in a recipe)."""

    temperature: Annotated[float, Range(0.01, 10)] = 0.2
    """NT-Xent temperature tau (the paper's table 5: 0.1 to 0.5 depending on batch size; 0.2 suits a few hundred pairs)."""
    projection_dim: Annotated[int, Range(1, 65536)] = 128
    """Output width of the projection head (the paper's 128)."""
    projection_hidden: Annotated[int, Range(1, 65536)] = 2048
    """Hidden width of the head's one hidden layer (the paper's: as wide as its ResNet-50 features, 2048)."""
    views: ViewOptions = field(default_factory=ViewOptions)
    """How each of the two views is made (defaults: the paper's ImageNet augmentations; CIFAR: strength 0.5, blur 0)."""

    def check(self, where: str) -> None:
        check_ranges(self, where)
        self.views.check(f"{where}.views")


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent of 2n projections on this process, rows [view 1 of images 0..n-1, view 2 of the same]:
    the mean over these 2n rows of -log softmax(similarity to its partner) over every other view.
    While training (gradients on), the other views of every process count too; in evaluation (no
    gradients, batches sharded over processes) a batch's own views, so the figure does not depend on
    the number of processes. Computed in fp32 (fp64 stays fp64), outside autocast."""
    with torch.autocast(z.device.type, enabled=False):
        z = F.normalize(z if z.dtype == torch.float64 else z.float(), dim=1)   # (2n, d)
        everyone, offset = gather_with_grad(z) if torch.is_grad_enabled() else (z, 0)   # (2n * world, d)
        n2 = z.shape[0]
        logits = z @ everyone.T / temperature                                  # (2n, 2n * world)
        rows = torch.arange(n2, device=z.device)
        logits[rows, offset + rows] = float("-inf")                            # a view is not its own negative
        partner = offset + (rows + n2 // 2) % n2                               # view 1 <-> view 2 of one image
        return F.cross_entropy(logits, partner)


class ProjectedEncoder(torch.nn.Module):
    """ViTModel -> CLS token -> projection MLP (Linear, ReLU, Linear): the module SimCLR trains."""

    def __init__(self, backbone, hidden: int, out: int):
        super().__init__()
        self.backbone = backbone
        width = backbone.config.hidden_size
        self.head = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, out))

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixel_values=pixel_values).last_hidden_state[:, 0]   # (batch, width)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(pixel_values))                              # (batch, out)


class SimCLR(ImageObjective):
    name = "simclr"
    stat_names = ("loss", "pair_accuracy")
    headline = ("loss", "pair_accuracy", "knn_top1")
    Options = Options

    def training_module(self, model):
        """The backbone with its projection head (continued from an lmssl simclr folder's head when
        build_model warm-started from one). Kept, so `save` writes the head beside the backbone."""
        module = ProjectedEncoder(model, self.options.projection_hidden, self.options.projection_dim)
        self.trained = module
        self.continue_head(module.head, HEAD_FILE, "projection head")
        return module

    def collate(self, examples):
        return self.two_view_batch(examples)

    def loss(self, module, batch):
        images = batch["images"]
        n = images.shape[0]
        pixels = apply_views(images.repeat(2, 1, 1, 1), views_of(batch, "views"), self.size, self.mean, self.std)
        z = module(pixels)                                                # (2n, projection_dim)
        loss = nt_xent(z, self.options.temperature)
        with torch.no_grad(), torch.autocast(z.device.type, enabled=False):  # is the partner the nearest view?
            zn = F.normalize(z.float(), dim=1)
            sim = zn @ zn.T
            sim.fill_diagonal_(float("-inf"))
            rows = torch.arange(2 * n, device=z.device)
            hits = (sim.argmax(1) == (rows + n) % (2 * n)).sum()
        count = float(2 * n)
        return loss, {"loss": (loss.detach() * count, count), "pair_accuracy": (hits, count)}

    def encode(self, module, pixel_values):
        backbone = module.backbone if isinstance(module, ProjectedEncoder) else module
        return backbone(pixel_values=pixel_values).last_hidden_state[:, 0]

    def backbone(self, model):
        return model.backbone if isinstance(model, ProjectedEncoder) else model

    def save_pretraining(self, model, folder: Path) -> None:
        trained = getattr(self, "trained", None)
        if trained is not None:
            self.save_head(trained.head, HEAD_FILE, folder)
