"""MoCo v3: queries from an online encoder and predictor, keys from a momentum encoder, InfoNCE over
the keys of every process (Chen, Xie & He 2021, "An Empirical Study of Training Self-Supervised Vision
Transformers", arXiv:2104.02057).

Online: HF `ViTModel` -> CLS token -> projector (3 layers, last batch norm without affine) ->
predictor (2 layers, the same). Momentum encoder: a frozen copy of backbone and projector inside
the trained module, moved by an EMA whose momentum rises from `base_momentum` (0.99) to 1 along a
cosine. Loss: ctr(q1, k2) + ctr(q2, k1), ctr the cross-entropy of each query against the keys of
every image of the global batch (its own image's the positive), scaled by 2 tau (alg. 1). Keys carry
no gradient, so they cross processes by a plain all-gather.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import torch
import torch.nn.functional as F

from lmssl.collectives import gather_with_grad
from lmssl.data.views import ViewOptions
from lmssl.objectives.siamese import SiameseObjective
from lmssl.objectives.teacher import mlp
from lmssl.schema import Range, check_ranges


@dataclass
class Options:
    """Options of the moco_v3 objective (objective_args in a recipe)."""

    temperature: Annotated[float, Range(0.01, 10)] = 0.2
    """InfoNCE temperature tau (the paper's 0.2 for ViT; the loss is scaled by 2 tau)."""
    projection_dim: Annotated[int, Range(1, 65536)] = 256
    """Output width of projector and predictor (the paper's 256)."""
    projection_hidden: Annotated[int, Range(1, 65536)] = 4096
    """Width of the projector's two hidden layers (the paper's 4096)."""
    predictor_hidden: Annotated[int, Range(1, 65536)] = 4096
    """Hidden width of the predictor (the paper's 4096)."""
    base_momentum: Annotated[float, Range(0, 1)] = 0.99
    """Momentum encoder EMA momentum at step 0, rising to 1 by the last step (the paper's 0.99 for ViT)."""
    views: ViewOptions = field(default_factory=ViewOptions)
    """How each of the two views is made (one recipe for both; the paper's asymmetric blur and solarize
    are not split by view here)."""

    def check(self, where: str) -> None:
        check_ranges(self, where)
        self.views.check(f"{where}.views")


def contrast(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """ctr(q, k) of alg. 1: (n, d) normalized queries against the (n, d) keys of this process and, while
    training (gradients on), the keys of every process; query i's positive is key i of this process.
    Times 2 tau. In evaluation (batches sharded over processes) a batch's own keys only, so the figure
    does not depend on the number of processes."""
    keys, offset = gather_with_grad(k.detach()) if torch.is_grad_enabled() else (k, 0)   # (n * world, d)
    logits = q @ keys.T / temperature                                                   # (n, n * world)
    labels = offset + torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(logits, labels) * (2 * temperature)


def moco_v3_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """ctr(q1, k2) + ctr(q2, k1); rows [view 1; view 2] of the predictor's queries q and the momentum
    encoder's keys k. In fp32 (fp64 stays fp64), outside autocast."""
    with torch.autocast(q.device.type, enabled=False):
        q = F.normalize(q if q.dtype == torch.float64 else q.float(), dim=1)        # (2n, d)
        k = F.normalize(k.detach().to(q.dtype), dim=1)                              # (2n, d)
        q1, q2 = q.chunk(2)
        k1, k2 = k.chunk(2)
        return contrast(q1, k2, temperature) + contrast(q2, k1, temperature)


class MoCoV3(SiameseObjective):
    name = "moco_v3"
    Options = Options
    uses_target = True

    def heads(self, width: int):
        o = self.options
        projector = mlp([width, o.projection_hidden, o.projection_hidden, o.projection_dim],
                        last_batch_norm=True, affine_last=False)
        predictor = mlp([o.projection_dim, o.predictor_hidden, o.projection_dim],
                        last_batch_norm=True, affine_last=False)
        return projector, predictor

    def objective(self, z, p, target):
        return moco_v3_loss(p, target, self.options.temperature)
