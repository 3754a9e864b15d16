"""BYOL: an online network predicts a slowly moving target network's projection of another view of
the same image, with no negatives (Grill et al. 2020, "Bootstrap your own latent: A new approach to
self-supervised learning", arXiv:2006.07733).

Online: HF `ViTModel` -> CLS token -> projector -> predictor. Target: a frozen copy of backbone and
projector inside the trained module, moved after every optimizer step by an EMA whose momentum rises
from `base_momentum` to 1 along a cosine (sec. 3.2). Loss: 2 - 2 cos(prediction, target projection),
symmetrized over the two views (eq. 2 plus its swapped twin).
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
    """Options of the byol objective (objective_args in a recipe)."""

    projection_dim: Annotated[int, Range(1, 65536)] = 256
    """Output width of projector and predictor (the paper's 256)."""
    projection_hidden: Annotated[int, Range(1, 65536)] = 4096
    """Hidden width of the projector's one hidden layer (the paper's 4096)."""
    predictor_hidden: Annotated[int, Range(1, 65536)] = 4096
    """Hidden width of the predictor's one hidden layer (the paper's 4096, the projector's shape)."""
    base_momentum: Annotated[float, Range(0, 1)] = 0.996
    """Target EMA momentum at step 0, rising to 1 by the last step (the paper's 0.996 for 1000 epochs;
    0.99 suits runs of a few thousand steps, where 0.996 leaves the target too far behind)."""
    views: ViewOptions = field(default_factory=ViewOptions)
    """How each of the two views is made (one recipe for both; the paper's asymmetric blur and solarize
    are not split by view here)."""

    def check(self, where: str) -> None:
        check_ranges(self, where)
        self.views.check(f"{where}.views")


def byol_loss(p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over images of (2 - 2 cos(p1, t2)) + (2 - 2 cos(p2, t1)), rows [view 1; view 2] of the
    online predictions p and target projections t (no gradient reaches t). In fp32 outside autocast."""
    with torch.autocast(p.device.type, enabled=False):
        p = F.normalize(p if p.dtype == torch.float64 else p.float(), dim=1)           # (2n, d)
        t = F.normalize(target.detach().to(p.dtype), dim=1)                            # (2n, d)
        n = p.shape[0] // 2
        other = torch.cat([t[n:], t[:n]])                                              # the other view's target
        per_row = 2 - 2 * (p * other).sum(1)                                           # (2n,)
        return per_row.view(2, n).sum(0).mean()                                        # both directions per image


class BYOL(SiameseObjective):
    name = "byol"
    Options = Options
    uses_target = True

    def heads(self, width: int):
        o = self.options
        return (mlp([width, o.projection_hidden, o.projection_dim]),              # Linear-BN-ReLU-Linear
                mlp([o.projection_dim, o.predictor_hidden, o.projection_dim]))

    def objective(self, z, p, target):
        return byol_loss(p, target)
