"""What the momentum-teacher and non-contrastive methods share: the EMA that makes a target network
follow the online one, its cosine momentum schedule, projection/prediction MLPs, and the collapse
monitor. The target lives inside the one module the loop trains (FSDP2 and DeepSpeed prepare one
model), with requires_grad off, so checkpoints hold it and a resumed run continues it exactly.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """The EMA momentum after `step` of `total_steps` optimizer steps: base at the start, rising to
    `final` along half a cosine (BYOL, Grill et al. 2020, sec. 3.2; MoCo v3 and DINO use the same)."""
    progress = min(max(step, 0), total_steps) / max(total_steps, 1)
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


def frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` that receives no gradient: a target network or teacher."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: torch.nn.Module, online: torch.nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, parameter by parameter (floating buffers
    such as batch-norm statistics are copied from the online network, as BYOL and MoCo do)."""
    for t, o in zip(target.parameters(), online.parameters()):
        t.mul_(momentum).add_(o.detach().to(t.dtype), alpha=1.0 - momentum)
    for t, o in zip(target.buffers(), online.buffers()):
        if t.dtype.is_floating_point:
            t.copy_(o)


def mlp(dims: list[int], batch_norm: bool = True, last_batch_norm: bool = False,
        affine_last: bool = True) -> torch.nn.Sequential:
    """Linear layers of widths dims[0] -> ... -> dims[-1] with BatchNorm + ReLU between them (the
    projectors and predictors of BYOL, SimSiam and MoCo v3); `last_batch_norm` adds a BatchNorm after
    the last layer (MoCo v3's projector, without affine parameters when not `affine_last`)."""
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(torch.nn.Linear(a, b, bias=not (batch_norm and (not last or last_batch_norm))))
        if not last:
            if batch_norm:
                layers.append(torch.nn.BatchNorm1d(b))
            layers.append(torch.nn.ReLU(inplace=True))
        elif last_batch_norm:
            layers.append(torch.nn.BatchNorm1d(b, affine=affine_last))
    return torch.nn.Sequential(*layers)


@torch.no_grad()
def embedding_std(z: torch.Tensor, dims: Optional[int] = None) -> torch.Tensor:
    """The collapse monitor: the standard deviation over the batch of the L2-normalized embeddings,
    averaged over dimensions. Collapsed (every input the same vector): ~0; healthy: ~1/sqrt(d)
    (SimSiam, Chen & He 2021, fig. 2). Reported as a multiple of 1/sqrt(d), so 1.0 is healthy."""
    z = F.normalize(z.float(), dim=1)
    d = dims or z.shape[1]
    return z.std(dim=0).mean() * math.sqrt(d) if z.shape[0] > 1 else z.new_zeros(())  # a tensor: no host sync
