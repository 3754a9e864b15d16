"""DINO: self-distillation with no labels (Caron et al. 2021, "Emerging Properties in Self-Supervised
Vision Transformers", arXiv:2104.14294).

A student ViT with a projection head (MLP -> L2-normalized bottleneck -> weight-normalized layer of K
prototypes) learns to match, on every view of an image, the softmax a momentum teacher gives the
other global views. The teacher is an EMA of the student (momentum 0.996 -> 1 along a cosine) that
receives no gradient; its outputs are centered (an EMA of their batch mean) and sharpened (a low,
warmed-up temperature), which together keep the two from collapsing. Multi-crop: two global views
at the image size and several local views at a smaller size, made one batch per resolution; the
teacher sees the global views only.

The teacher, its center and its temperature live inside the one module the loop trains and
checkpoints (as buffers and frozen parameters), so a resumed run repeats the uninterrupted one
exactly. The saved backbone is the *teacher's*, the network DINO evaluates (the paper's study of the
teacher: it beats the student throughout training); its head and center go under pretraining/.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lmssl.collectives import world
from lmssl.data.views import ViewOptions, apply_crop_sets, draw_crop_sets
from lmssl.errors import LmsslError
from lmssl.schema import Range, check_ranges
from lmssl.objectives.teacher import cosine_momentum, ema_update, embedding_std, frozen_copy
from lmssl.objectives.vision import (PRETRAINING_FOLDER, ImageObjective, batch_generator, flatten_views,
                                    stack_images, views_of)

HEAD_FILE = "dino_head.safetensors"  # the teacher's head ("head.*") and its center ("center")
VIEW_SETS = ("global1", "global2", "local")  # batch-key prefixes of the three kinds of views


# The paper's augmentations (its appendix, after BYOL): color jitter 0.4/0.4/0.2/0.1 (strength 0.5 gives
# 0.4/0.4/0.4/0.1), grayscale 0.2; the first global view always blurred, the second rarely and sometimes
# solarized. Subclasses so that a recipe writing one key keeps the others' DINO values.
@dataclass
class GlobalViews(ViewOptions):
    """The first global view (DINO: crops of 40-100% of the image, always blurred)."""

    crop_scale: list[Annotated[float, Range(0, 1, low_open=True)]] = field(default_factory=lambda: [0.4, 1.0])
    strength: Annotated[float, Range(0, 4)] = 0.5
    blur: Annotated[float, Range(0, 1)] = 1.0


@dataclass
class SecondGlobalViews(GlobalViews):
    """The second global view (DINO: blurred one time in ten, solarized one in five)."""

    blur: Annotated[float, Range(0, 1)] = 0.1
    solarize: Annotated[float, Range(0, 1)] = 0.2


@dataclass
class LocalViews(ViewOptions):
    """The local views (DINO: crops of 5-40% of the image, blurred half the time)."""

    crop_scale: list[Annotated[float, Range(0, 1, low_open=True)]] = field(default_factory=lambda: [0.05, 0.4])
    strength: Annotated[float, Range(0, 4)] = 0.5


@dataclass
class Options:
    """Options of the dino objective (objective_args in a recipe)."""

    prototypes: Annotated[int, Range(1, 1 << 20)] = 4096
    """K, the width of the head's output (the paper's 65,536; 4,096 trains on a CPU and still far exceeds the classes)."""
    head_hidden: Annotated[int, Range(1, 65536)] = 2048
    """Width of the head MLP's two hidden layers (the paper's 2,048)."""
    bottleneck: Annotated[int, Range(1, 65536)] = 256
    """Width of the L2-normalized bottleneck before the prototypes (the paper's 256)."""
    student_temp: Annotated[float, Range(0, 10, low_open=True)] = 0.1
    """Temperature of the student's softmax (the paper's 0.1)."""
    teacher_temp: Annotated[float, Range(0, 10, low_open=True)] = 0.07
    """Teacher temperature after the warmup (the paper's ViT-S/16 runs: 0.07; lower sharpens more)."""
    warmup_teacher_temp: Annotated[float, Range(0, 10, low_open=True)] = 0.04
    """Teacher temperature at step 0, raised linearly to teacher_temp (the paper's 0.04: above 0.07 early, training collapses)."""
    teacher_temp_warmup_ratio: Annotated[float, Range(0, 1)] = 0.1
    """Share of the run's steps the temperature warmup lasts (the paper's 30 epochs of 300)."""
    teacher_temp_warmup_steps: Optional[Annotated[int, Range(0)]] = None
    """The warmup's length in optimizer steps; overrides teacher_temp_warmup_ratio when given."""
    teacher_momentum: Annotated[float, Range(0, 1)] = 0.996
    """EMA momentum of the teacher at step 0, raised to 1 along a cosine (the paper's 0.996 at batch 1024; a
    run of a few hundred steps wants ~0.99 or lower, or the teacher keeps much of its random start)."""
    center_momentum: Annotated[float, Range(0, 1)] = 0.9
    """EMA rate of the center, the running mean of the teacher's outputs (the paper's 0.9)."""
    local_crops: Annotated[int, Range(0, 64)] = 8
    """Local views per image (the reference code's default 8; 0 trains on the two global views alone)."""
    local_size: Annotated[int, Range(0, 4096)] = 0
    """Side of the local views in pixels, a multiple of the patch size; 0: image_size * 96/224 rounded to the
    patch size (the paper's 96 pixels beside 224)."""
    global_views: GlobalViews = field(default_factory=GlobalViews)
    """How the first global view is made (CIFAR: blur 0)."""
    second_global_views: SecondGlobalViews = field(default_factory=SecondGlobalViews)
    """How the second global view is made (CIFAR: blur 0)."""
    local_views: LocalViews = field(default_factory=LocalViews)
    """How each local view is made (CIFAR: blur 0)."""

    def check(self, where: str) -> None:
        check_ranges(self, where)
        for name in ("global_views", "second_global_views", "local_views"):
            getattr(self, name).check(f"{where}.{name}")


def teacher_temperature(step: int, total_steps: int, start: float, final: float, warmup_ratio: float,
                        warmup_steps: Optional[int] = None) -> float:
    """The teacher temperature after `step` optimizer steps: linear from `start` to `final` over the
    warmup (warmup_steps, else warmup_ratio of total_steps), `final` after it. At step 0 it is `start`
    whenever there is a warmup at all, whatever total_steps is."""
    length = warmup_steps if warmup_steps is not None else warmup_ratio * total_steps
    if step >= length:
        return final
    return start + (final - start) * step / length


def default_local_size(image_size: int, patch_size: int) -> int:
    """The paper's 96 pixels beside 224, at this image size, rounded to whole patches (one at least)."""
    return max(1, round(image_size * 96 / 224 / patch_size)) * patch_size


def fp32(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or as it is when it is float64."""
    return x if x.dtype == torch.float64 else x.float()


@torch.no_grad()
def teacher_probabilities(teacher_logits: torch.Tensor, center: torch.Tensor, temperature) -> torch.Tensor:
    """The teacher's targets: softmax((logits - center) / temperature), centered and sharpened, in fp32
    (fp64 stays fp64)."""
    logits = fp32(teacher_logits)
    return F.softmax((logits - center.to(logits.dtype)) / temperature, dim=-1)


def dino_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, center: torch.Tensor,
              student_temp: float, teacher_temp, global_views: int = 2) -> torch.Tensor:
    """The DINO loss of V views of n images: the mean, over every (teacher global view g, student view
    v != g) pair, of the cross-entropy between the teacher's targets and the student's softmax,
    averaged over the n images. Rows are view-major: student_logits (V * n, K) with the global views
    first, in the teacher's order; teacher_logits (global_views * n, K). No gradient reaches the
    teacher. Computed in fp32 (fp64 stays fp64), outside autocast."""
    with torch.autocast(student_logits.device.type, enabled=False):
        n = teacher_logits.shape[0] // global_views
        views = student_logits.shape[0] // n
        targets = teacher_probabilities(teacher_logits, center, teacher_temp)        # (G * n, K)
        targets = targets.view(global_views, n, -1)                                 # (G, n, K)
        log_p = F.log_softmax(fp32(student_logits) / student_temp, dim=-1).view(views, n, -1)  # (V, n, K)
        cross = -torch.einsum("gnk,vnk->gv", targets, log_p) / n                    # (G, V) mean over images
        same = torch.eye(global_views, views, dtype=torch.bool, device=cross.device)  # a view never meets itself
        # masked out rather than selected (cross[~same] would read the mask's size back from the device)
        return cross.masked_fill(same, 0.0).sum() / (global_views * views - min(global_views, views))


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float) -> None:
    """center <- momentum * center + (1 - momentum) * the mean of this batch's teacher logits over the
    rows of every process (an all_reduce when torch.distributed is initialized)."""
    size, _ = world()
    batch_sum = teacher_logits.float().sum(0, keepdim=True)                       # (1, K)
    if size > 1:
        dist.all_reduce(batch_sum)
    center.mul_(momentum).add_(batch_sum / (teacher_logits.shape[0] * size), alpha=1.0 - momentum)


class DINOHead(torch.nn.Module):
    """MLP (Linear, GELU, Linear, GELU, Linear) -> L2 normalization -> a weight-normalized linear layer
    to K prototypes with its norm fixed at 1 (the paper's norm_last_layer): logits are cosines."""

    def __init__(self, width: int, hidden: int, bottleneck: int, prototypes: int):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.GELU(),
                                       torch.nn.Linear(hidden, hidden), torch.nn.GELU(),
                                       torch.nn.Linear(hidden, bottleneck))
        for layer in self.mlp:
            if isinstance(layer, torch.nn.Linear):   # as the reference code: truncated normal, std 0.02
                torch.nn.init.trunc_normal_(layer.weight, std=0.02)
                torch.nn.init.zeros_(layer.bias)
        self.prototypes = torch.nn.Linear(bottleneck, prototypes, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(features), dim=-1)                                 # (batch, bottleneck)
        return F.linear(z, F.normalize(self.prototypes.weight, dim=1))              # (batch, K) in [-1, 1]


class Branch(torch.nn.Module):
    """ViTModel -> CLS token -> DINO head: one network, student or teacher."""

    def __init__(self, backbone, head: DINOHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLS features (batch, width), logits (batch, K)); any multiple of the patch size goes in."""
        other_size = pixel_values.shape[-1] != self.backbone.config.image_size
        cls = self.backbone(pixel_values=pixel_values, interpolate_pos_encoding=other_size).last_hidden_state[:, 0]
        return cls, self.head(cls)


class DINOModule(torch.nn.Module):
    """What the loop trains and checkpoints: the student, its frozen EMA teacher, the teacher's center
    and the teacher temperature of the coming step (buffers: a resumed run reads them back)."""

    def __init__(self, backbone, head: DINOHead, teacher_temp: float):
        super().__init__()
        self.student = Branch(backbone, head)
        self.teacher = frozen_copy(self.student)
        self.register_buffer("center", torch.zeros(1, head.prototypes.out_features))
        self.register_buffer("teacher_temp", torch.tensor(teacher_temp, dtype=torch.float32))

    def forward(self, global_pixels: torch.Tensor, local_pixels: Optional[torch.Tensor] = None):
        """(student logits of every view (V * n, K), globals first; teacher logits of the globals (2n, K);
        the teacher's CLS features of the globals (2n, width)). One student pass per resolution."""
        _, student = self.student(global_pixels)
        if local_pixels is not None:
            student = torch.cat([student, self.student(local_pixels)[1]])
        with torch.no_grad():
            cls, teacher = self.teacher(global_pixels)
        return student, teacher, cls


def patch_of(backbone) -> int:
    """A ViT's patch side in pixels."""
    patch = backbone.config.patch_size
    return int(patch[0] if isinstance(patch, (list, tuple)) else patch)


def unwrapped(module):
    """The module inside a DDP or DeepSpeed wrapper (FSDP2 shards in place and wraps nothing)."""
    return getattr(module, "module", module)


class DINO(ImageObjective):
    name = "dino"
    stat_names = ("loss", "embedding_std", "teacher_entropy")
    headline = ("loss", "embedding_std", "knn_top1")
    Options = Options

    def check_model(self, model, where: str) -> None:
        super().check_model(model, where)
        local, patch = self.local_side(model), patch_of(model)
        if local % patch or local > self.size:
            raise LmsslError(f"{where}.objective_args.local_size: {local} pixels is not a multiple of the "
                             f"{patch}-pixel patches up to the {self.size}-pixel image; use "
                             f"{default_local_size(self.size, patch)}, or 0 for that")

    def local_side(self, backbone) -> int:
        """The local views' side in pixels: local_size, or the paper's share of the image size."""
        return self.options.local_size or default_local_size(self.size, patch_of(backbone))

    def options_temperature(self, step: int, total_steps: int) -> float:
        o = self.options
        return teacher_temperature(step, total_steps, o.warmup_teacher_temp, o.teacher_temp,
                                   o.teacher_temp_warmup_ratio, o.teacher_temp_warmup_steps)

    def training_module(self, model):
        """Student = the backbone with a fresh head (or the head and center of an lmssl dino folder this
        run warm-started from), teacher = a frozen copy. Kept, so `save` writes the teacher."""
        import warnings

        o = self.options
        head = DINOHead(model.config.hidden_size, o.head_hidden, o.bottleneck, o.prototypes)
        init_from = getattr(self, "init_from", None)                     # set by build_model
        saved = Path(init_from) / PRETRAINING_FOLDER / HEAD_FILE if init_from else None
        center = None
        if saved is not None and saved.is_file():
            from safetensors.torch import load_file

            state = load_file(str(saved))
            heads = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
            own = head.state_dict()
            if heads.keys() == own.keys() and all(own[k].shape == v.shape for k, v in heads.items()):
                head.load_state_dict(heads)
                center = state.get("center")
            else:
                warnings.warn(f"{saved}: the DINO head there has other shapes than head_hidden/bottleneck/"
                              "prototypes ask for; training a fresh head", stacklevel=2)
        # at step 0 the schedule is its start for any run length, so 1 stands in for the unknown total
        module = DINOModule(model, head.to(model.device), self.options_temperature(0, 1)).to(model.device)
        if center is not None:
            module.center.copy_(center)
        self.trained = module
        return module

    def collate(self, examples):
        o = self.options
        images = stack_images(examples)                                    # (n, 3, S, S) uint8
        sets = [(1, o.global_views), (1, o.second_global_views)] + ([(o.local_crops, o.local_views)]
                                                                     if o.local_crops else [])
        drawn = draw_crop_sets(len(examples), self.size, self.size, sets, batch_generator())
        batch = {"images": images}
        for prefix, views in zip(VIEW_SETS, drawn):
            batch.update(flatten_views(views, prefix))
        return batch

    def loss(self, module, batch):
        inner = unwrapped(module)
        images = batch["images"]
        n = images.shape[0]
        local = self.local_side(inner.student.backbone)
        prefixes = VIEW_SETS if f"{VIEW_SETS[2]}.crop" in batch else VIEW_SETS[:2]
        sizes = [self.size, self.size, local][:len(prefixes)]
        made = apply_crop_sets(images, [views_of(batch, p) for p in prefixes], sizes, self.mean, self.std)
        globals_ = torch.cat(made[:2])                                    # (2n, 3, S, S)
        locals_ = made[2] if len(made) > 2 else None                      # (local_crops * n, 3, s, s)
        student, teacher, cls = module(globals_, locals_)
        loss = dino_loss(student, teacher, inner.center, self.options.student_temp, inner.teacher_temp)
        with torch.no_grad():
            q = teacher_probabilities(teacher, inner.center, inner.teacher_temp)
            entropy = -(q * torch.log(q.clamp_min(1e-12))).sum(1).mean() / math.log(q.shape[1])  # 1: uniform
        if torch.is_grad_enabled() and inner.training:                    # after the loss, from this batch
            update_center(inner.center, teacher, self.options.center_momentum)
        count = float(n)
        return loss, {"loss": (loss.detach() * count, count),
                      "embedding_std": (embedding_std(cls) * count, count),
                      "teacher_entropy": (entropy * count, count)}

    def after_step(self, module, step: int, total_steps: int) -> None:
        """The teacher follows the student with the cosine momentum of this step; the temperature of the
        next step goes into the module, where a checkpoint keeps it."""
        inner = unwrapped(module)
        ema_update(inner.teacher, inner.student, cosine_momentum(step, total_steps, self.options.teacher_momentum))
        inner.teacher_temp.fill_(self.options_temperature(step, total_steps))

    def encode(self, module, pixel_values):
        inner = unwrapped(module)
        if isinstance(inner, DINOModule):
            return inner.teacher(pixel_values)[0]
        return inner(pixel_values=pixel_values).last_hidden_state[:, 0]

    def backbone(self, model):
        """The teacher's backbone when `model` is the student this objective trains (what DINO evaluates)."""
        trained = getattr(self, "trained", None)
        if isinstance(model, DINOModule):
            return model.teacher.backbone
        if trained is not None and model is trained.student.backbone:
            return trained.teacher.backbone
        return model

    def save_pretraining(self, model, folder: Path) -> None:
        trained = getattr(self, "trained", None)
        if trained is not None:
            from safetensors.torch import save_file

            folder.mkdir(parents=True, exist_ok=True)
            state = {f"head.{k}": v for k, v in trained.teacher.head.state_dict().items()}
            state["center"] = trained.center
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / HEAD_FILE))
