"""SimSiam: one encoder, a predictor on one branch and a stop-gradient on the other, no negatives and
no momentum encoder (Chen & He 2021, "Exploring Simple Siamese Representation Learning",
arXiv:2011.10566).

HF `ViTModel` -> CLS token -> projector (3 layers, batch norm on the output) -> predictor (a 2-layer
bottleneck). Loss: 1/2 D(p1, sg(z2)) + 1/2 D(p2, sg(z1)) with D the negative cosine (eq. 4): -1 is
perfect agreement. The stop-gradient is what keeps it from collapsing (sec. 4.1; fig. 2 is the
`embedding_std` monitor logged here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import torch
import torch.nn.functional as F

from lmssl.data.views import ViewOptions
from lmssl.objectives.siamese import SiameseObjective
from lmssl.objectives.teacher import mlp
from lmssl.schema import Range, check_ranges


@dataclass
class Options:
    """Options of the simsiam objective (objective_args in a recipe)."""

    projection_dim: Annotated[int, Range(1, 65536)] = 2048
    """Output width of projector and predictor (the paper's 2048)."""
    projection_hidden: Annotated[int, Range(1, 65536)] = 2048
    """Width of the projector's two hidden layers (the paper's 2048)."""
    predictor_hidden: Annotated[int, Range(1, 65536)] = 512
    """Bottleneck width of the predictor (the paper's 512, a quarter of the output: sec. 3, table 1)."""
    views: ViewOptions = field(default_factory=ViewOptions)
    """How each of the two views is made (defaults: the SimCLR/MoCo v2 ImageNet augmentations)."""

    def check(self, where: str) -> None:
        check_ranges(self, where)
        self.views.check(f"{where}.views")


def simsiam_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """1/2 D(p1, sg(z2)) + 1/2 D(p2, sg(z1)), D(p, z) = -cos(p, z) averaged over images; rows [view 1;
    view 2] of predictions p and projections z. In fp32 outside autocast."""
    with torch.autocast(p.device.type, enabled=False):
        p = F.normalize(p if p.dtype == torch.float64 else p.float(), dim=1)       # (2n, d)
        z = F.normalize(z.detach().to(p.dtype), dim=1)                             # (2n, d), stop-gradient
        n = p.shape[0] // 2
        other = torch.cat([z[n:], z[:n]])                                          # the other view's projection
        return -(p * other).sum(1).mean()                                          # mean of the two halves


class SimSiam(SiameseObjective):
    name = "simsiam"
    Options = Options
    uses_target = False

    def heads(self, width: int):
        o = self.options
        projector = mlp([width, o.projection_hidden, o.projection_hidden, o.projection_dim],
                        last_batch_norm=True, affine_last=False)
        return projector, mlp([o.projection_dim, o.predictor_hidden, o.projection_dim])

    def objective(self, z, p, target):
        return simsiam_loss(p, z)
