"""Evaluation without keeping logits: objectives report (sum, count) pairs per batch, which are
summed over batches and processes, so memory stays flat however large the eval set is.
Downstream metrics (GLUE) and probes live here too.
"""

from __future__ import annotations

from typing import Optional

import torch


def _seed(key: int) -> None:
    from lmssl.training import seed_all

    seed_all(key)


@torch.no_grad()
def evaluate_objective(objective, module, data, batch_size: int, accelerator, seed: int,
                       max_batches: Optional[int] = None) -> dict[str, float]:
    """Mean of every statistic the objective reports, over `data`, sharded across processes.

    Batch i goes to process i % world, so no example is counted twice; the masks and any other
    randomness of batch i depend on (seed, i) only, so the figure is the same on 1 or N processes.
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    n_batches = (len(data) + batch_size - 1) // batch_size
    if max_batches is not None:
        n_batches = min(n_batches, max_batches * world)
    was_training = module.training
    module.eval()
    sums: dict[str, list[float]] = {}
    for i in range(rank, n_batches, world):
        _seed(seed * 31 + i + 99991)
        rows = data[i * batch_size:(i + 1) * batch_size]
        examples = [{c: rows[c][j] for c in rows} for j in range(len(next(iter(rows.values()))))]
        batch = objective.collate(examples)
        batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with accelerator.autocast():
            _, stats = objective.loss(module, batch)
        for key, value in stats.items():
            total, count = value if isinstance(value, tuple) else (value, 1.0)
            acc = sums.setdefault(key, [0.0, 0.0])
            acc[0] += float(total)
            acc[1] += float(count)
    keys = sorted(objective.stat_names) if hasattr(objective, "stat_names") else sorted(sums)
    vector = torch.tensor([sums.get(k, [0.0, 0.0])[j] for k in keys for j in (0, 1)], dtype=torch.float64,
                          device=accelerator.device)
    if world > 1:
        vector = accelerator.reduce(vector, "sum")
    module.train(was_training)
    result = {}
    for idx, key in enumerate(keys):
        total, count = vector[2 * idx].item(), vector[2 * idx + 1].item()
        if count > 0:
            result[key] = total / count
    if "loss" in result and getattr(objective, "reports_perplexity", False):
        result["perplexity"] = float(torch.exp(torch.tensor(min(result["loss"], 50.0))))
    return result


def accuracy(predictions, references) -> float:
    predictions, references = list(predictions), list(references)
    if not references:
        raise ValueError("accuracy of an empty set")
    return sum(int(p == r) for p, r in zip(predictions, references)) / len(references)
