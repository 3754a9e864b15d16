"""Collectives that carry gradients, for losses that compare examples across processes (contrastive
negatives). With objectives/dino.py (whose center is an all_reduce'd batch mean) the only code besides
Accelerate's own that talks to torch.distributed.

accelerate's `gather` (like torch's all_gather) returns tensors without a gradient path to the
other processes: a contrastive loss built on it would miss every gradient that flows through the
negatives another process contributed. `gather_with_grad` gives each process the whole batch and,
on the way back, sums every process's gradient with respect to the whole batch before keeping the
slice this process produced. With gradients averaged over processes afterwards (DDP), a loss
averaged over each process's own rows then has exactly the gradient of the same loss over the
concatenated batch on one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(number of processes, this process's rank); (1, 0) when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        size, rank = world()
        ctx.rank, ctx.rows = rank, tensor.shape[0]
        pieces = [torch.empty_like(tensor) for _ in range(size)]
        dist.all_gather(pieces, tensor.contiguous())
        return torch.cat(pieces, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)           # every process's loss reaches every row
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(rows of every process concatenated in rank order, offset of this process's rows in it).
    Every process must pass the same number of rows. On one process: (tensor, 0)."""
    size, rank = world()
    if size == 1:
        return tensor, 0
    rows = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.empty_like(rows) for _ in range(size)]
    dist.all_gather(counts, rows)
    if len({int(c) for c in counts}) != 1:
        raise RuntimeError(f"gather_with_grad: processes passed {[int(c) for c in counts]} rows; every process "
                           "must pass the same number (full batches)")
    return _GatherWithGrad.apply(tensor), rank * tensor.shape[0]
