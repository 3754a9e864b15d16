"""What the two-view methods without a negatives bank share (BYOL, SimSiam, MoCo v3): a ViT online
encoder with projector and predictor, an optional momentum target living inside the one trained
module, two views per image drawn from the batch seed, and the heads saved beside the backbone.
Each method's own file holds its Options, its heads' shapes and its loss; nothing method-specific here.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import ClassVar, Optional

import torch

from lmssl.data.views import apply_views
from lmssl.objectives.teacher import cosine_momentum, ema_update, embedding_std, frozen_copy
from lmssl.objectives.vision import PRETRAINING_FOLDER, ImageObjective, views_of

HEADS_FILE = "heads.safetensors"  # under pretraining/: projector, predictor, target (every weight but the backbone)
HEAD_GROUPS = ("online.projector.", "predictor.", "target.")


def per_view(head: torch.nn.Module, x: torch.Tensor, views: int) -> torch.Tensor:
    """`head` applied to each view's rows on its own, rows [view 1; view 2; ...]: its batch norm
    sees one view at a time, as in the BYOL, SimSiam and MoCo v3 code."""
    return torch.cat([head(chunk) for chunk in x.chunk(views)]) if views > 1 else head(x)


class Encoder(torch.nn.Module):
    """ViTModel -> CLS token -> projector."""

    def __init__(self, backbone, projector: torch.nn.Module):
        super().__init__()
        self.backbone, self.projector = backbone, projector

    def forward(self, pixels: torch.Tensor, views: int = 1) -> torch.Tensor:
        cls = self.backbone(pixel_values=pixels).last_hidden_state[:, 0]        # (rows, width)
        return per_view(self.projector, cls, views)                            # (rows, projection_dim)


class Siamese(torch.nn.Module):
    """The module these methods train: the online encoder, its predictor and, for BYOL and MoCo v3, a
    frozen target copy of the online encoder that follows it by EMA (requires_grad off, so no optimizer
    holds it; a state_dict and every checkpoint do)."""

    def __init__(self, backbone, projector: torch.nn.Module, predictor: torch.nn.Module, target: bool):
        super().__init__()
        self.online = Encoder(backbone, projector)
        self.predictor = predictor
        self.target = frozen_copy(self.online) if target else None

    def forward(self, pixels: torch.Tensor, views: int = 2):
        """(online projections z, predictions p, target projections or None), each (rows, dim). One call,
        so DDP, FSDP2 and DeepSpeed see the whole computation."""
        z = self.online(pixels, views)
        p = per_view(self.predictor, z, views)
        if self.target is None:
            return z, p, None
        with torch.no_grad():
            return z, p, self.target(pixels, views)


class SiameseObjective(ImageObjective):
    """Two views of each image through a Siamese module; subclasses give the heads and the loss."""

    stat_names: ClassVar[tuple[str, ...]] = ("loss", "embedding_std")
    headline: ClassVar[tuple[str, ...]] = ("loss", "embedding_std", "knn_top1")
    uses_target: ClassVar[bool] = False
    """Whether the module holds a momentum target (then `options.base_momentum` is its EMA's start)."""

    def heads(self, width: int) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(projector from the backbone's width, predictor on the projections)."""
        raise NotImplementedError

    def objective(self, z: torch.Tensor, p: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
        """The loss of one batch's rows [view 1 of images 0..n-1; view 2 of the same]."""
        raise NotImplementedError

    def training_module(self, model):
        """The backbone with its heads and target; the heads continue from a warm start's
        pretraining/heads.safetensors where their shapes match. Kept, so `save` writes them."""
        module = Siamese(model, *self.heads(model.config.hidden_size), target=self.uses_target)
        init_from = getattr(self, "init_from", None)                     # set by build_model
        saved = Path(init_from) / PRETRAINING_FOLDER / HEADS_FILE if init_from else None
        if saved is not None and saved.is_file():
            load_heads(module, saved)
        self.trained = module
        return module

    def collate(self, examples):
        return self.two_view_batch(examples)

    def loss(self, module, batch):
        images = batch["images"]
        pixels = apply_views(images.repeat(2, 1, 1, 1), views_of(batch, "views"), self.size, self.mean, self.std)
        z, p, target = module(pixels)                                      # each (2n, dim)
        loss = self.objective(z, p, target)
        count = float(z.shape[0])
        return loss, {"loss": (loss.detach() * count, count), "embedding_std": (embedding_std(z) * count, count)}

    def after_step(self, module, step: int, total_steps: int) -> None:
        if module.target is not None:
            ema_update(module.target, module.online, cosine_momentum(step, total_steps, self.options.base_momentum))

    def encode(self, module, pixel_values):
        return self.backbone(getattr(module, "module", module))(pixel_values=pixel_values).last_hidden_state[:, 0]

    def backbone(self, model):
        return model.online.backbone if isinstance(model, Siamese) else model

    def save_pretraining(self, model, folder: Path) -> None:
        trained = getattr(self, "trained", None)
        if trained is not None:
            from safetensors.torch import save_file

            folder.mkdir(parents=True, exist_ok=True)
            heads = {k: v.detach().cpu().contiguous() for k, v in trained.state_dict().items()
                     if k.startswith(HEAD_GROUPS)}
            save_file(heads, str(folder / HEADS_FILE))


def load_heads(module: Siamese, path: Path) -> None:
    """Each of projector, predictor and target from `path` where the file has exactly its weights with
    their shapes (a warning where it has other ones); a target the file lacks starts as a copy of the
    online encoder as loaded."""
    from safetensors.torch import load_file

    saved = load_file(str(path))
    own = module.state_dict()
    loaded_target = False
    for group in HEAD_GROUPS:
        mine = {k: v for k, v in own.items() if k.startswith(group)}
        theirs = {k: v for k, v in saved.items() if k.startswith(group)}
        if not mine or not theirs:
            continue
        if theirs.keys() == mine.keys() and all(mine[k].shape == v.shape for k, v in theirs.items()):
            module.load_state_dict(theirs, strict=False)
            loaded_target = loaded_target or group == "target."
        else:
            warnings.warn(f"{path}: its {group.rstrip('.')} weights have other names or shapes than this "
                          "objective's options ask for; training a fresh one", stacklevel=3)
    if module.target is not None and not loaded_target:
        module.target.load_state_dict(module.online.state_dict())
