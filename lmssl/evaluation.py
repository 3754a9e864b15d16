"""Evaluation without keeping logits: objectives report (sum, count) pairs per batch, which are
summed over batches and processes, so memory stays flat however large the eval set is.
Downstream metrics (GLUE) and the kNN classifier of self-supervised vision live here too.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch

from lmssl.rng import seed_all


def _rows(data, start: int, stop: int) -> list[dict]:
    """Rows start..stop of a Dataset (or anything sliced into a dict of columns) as a list of examples."""
    rows = data[start:stop]
    return [{c: rows[c][j] for c in rows} for j in range(len(next(iter(rows.values()))))]


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
    sums: dict[str, list] = {}       # name -> [sum, count]: device tensors (or floats), read once at the end
    for i in range(rank, n_batches, world):
        seed_all(seed * 31 + i + 99991)
        examples = _rows(data, i * batch_size, (i + 1) * batch_size)
        batch = objective.collate(examples)
        batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with accelerator.autocast():
            _, stats = objective.loss(module, batch)
        for key, value in stats.items():
            total, count = value if isinstance(value, tuple) else (value, 1.0)
            acc = sums.setdefault(key, [0.0, 0.0])
            acc[0] = acc[0] + (total.double() if torch.is_tensor(total) else total)
            acc[1] = acc[1] + (count.double() if torch.is_tensor(count) else count)
    keys = sorted(objective.stat_names) if hasattr(objective, "stat_names") else sorted(sums)
    vector = torch.stack([torch.as_tensor(sums.get(k, [0.0, 0.0])[j], dtype=torch.float64, device=accelerator.device)
                          for k in keys for j in (0, 1)]) if keys else torch.zeros(0, dtype=torch.float64)
    if world > 1:
        vector = accelerator.reduce(vector, "sum")
    module.train(was_training)
    result = {}
    values = vector.tolist()                                  # the one read of the device
    for idx, key in enumerate(keys):
        total, count = values[2 * idx], values[2 * idx + 1]
        if count > 0:
            result[key] = total / count
    if "loss" in result and getattr(objective, "reports_perplexity", False):
        result["perplexity"] = float(torch.exp(torch.tensor(min(result["loss"], 50.0))))
    return result


# --------------------------------------------------------------------------- GLUE metrics
# Plain Python, no network: the official GLUE scores (Wang et al., 2018) on lists of predictions.
# The evaluate modules under lmssl/metrics/ wrap these for `evaluate.load(<local folder>)`.

def _pairs(predictions, references) -> tuple[list, list]:
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("a metric of an empty set")
    return predictions, references


def accuracy(predictions, references) -> float:
    predictions, references = _pairs(predictions, references)
    return sum(int(p == r) for p, r in zip(predictions, references)) / len(references)


def f1(predictions, references, positive: int = 1) -> float:
    """Binary F1 of the `positive` class (MRPC, QQP); 0.0 when there is no true positive."""
    predictions, references = _pairs(predictions, references)
    tp = sum(1 for p, r in zip(predictions, references) if p == positive and r == positive)
    fp = sum(1 for p, r in zip(predictions, references) if p == positive and r != positive)
    fn = sum(1 for p, r in zip(predictions, references) if p != positive and r == positive)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews_correlation(predictions, references) -> float:
    """Matthews correlation for any number of classes (Gorodkin's R_K); 0.0 when undefined (CoLA)."""
    predictions, references = _pairs(predictions, references)
    classes = sorted(set(predictions) | set(references))
    n = len(references)
    correct = sum(int(p == r) for p, r in zip(predictions, references))
    predicted = [sum(1 for p in predictions if p == k) for k in classes]
    true = [sum(1 for r in references if r == k) for k in classes]
    cov_pt = correct * n - sum(p * t for p, t in zip(predicted, true))
    cov_pp = n * n - sum(p * p for p in predicted)
    cov_tt = n * n - sum(t * t for t in true)
    if cov_pp == 0 or cov_tt == 0:
        return 0.0
    return cov_pt / math.sqrt(cov_pp * cov_tt)


def pearson(predictions, references) -> float:
    x, y = _pairs([float(v) for v in predictions], [float(v) for v in references])
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else 0.0


def _ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank (as scipy.stats.rankdata)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(predictions, references) -> float:
    x, y = _pairs([float(v) for v in predictions], [float(v) for v in references])
    return pearson(_ranks(x), _ranks(y))


# Which scores each GLUE task reports (the leaderboard's columns); the first one picks the best seed
# when a task has a single score, and their mean (the GLUE "score") when it has two.
GLUE_METRICS = {
    "cola": ("matthews_correlation",),
    "sst2": ("accuracy",),
    "mrpc": ("f1", "accuracy"),
    "qqp": ("f1", "accuracy"),
    "stsb": ("pearson", "spearmanr"),
    "mnli": ("accuracy",),
    "mnli_matched": ("accuracy",),
    "mnli_mismatched": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
    "ax": ("matthews_correlation",),
}
METRIC_FUNCTIONS = {
    "accuracy": accuracy, "f1": f1, "matthews_correlation": matthews_correlation,
    "pearson": pearson, "spearmanr": spearman,
}


def glue_metrics(task: str, predictions, references) -> dict[str, float]:
    """The official scores of GLUE task `task` (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli, ax)."""
    if task not in GLUE_METRICS:
        raise KeyError(f"unknown GLUE task {task!r}; known: {', '.join(GLUE_METRICS)}")
    return {name: float(METRIC_FUNCTIONS[name](predictions, references)) for name in GLUE_METRICS[task]}


def task_score(scores: dict[str, float]) -> float:
    """A task's one number for choosing the best epoch or seed: the mean of its metrics (GLUE convention)."""
    return sum(scores.values()) / len(scores)


@torch.no_grad()
def predict(objective, module, data, batch_size: int, accelerator) -> list:
    """The objective's prediction for every row of `data`, in order (class ids or regression values)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    n_batches = (len(data) + batch_size - 1) // batch_size
    was_training = module.training
    module.eval()
    mine: list[tuple[int, list]] = []
    for i in range(rank, n_batches, world):
        examples = _rows(data, i * batch_size, (i + 1) * batch_size)
        batch = objective.collate(examples)
        batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with accelerator.autocast():
            out = objective.predict(module, batch)
        mine.append((i, (out.float() if out.is_floating_point() else out).cpu().tolist()))
    module.train(was_training)
    if world > 1:
        from accelerate.utils import gather_object

        mine = gather_object(mine)
    return [value for _, values in sorted(mine) for value in values]


def metric_module(name: str, config_name: Optional[str] = None):
    """A metric shipped with lmssl as a local `evaluate` module (glue, matthews_correlation,
    pearson_spearman, f1_accuracy), loaded from the package folder with no network."""
    from pathlib import Path

    import evaluate

    folder = Path(__file__).resolve().parent / "metrics" / name
    if not (folder / f"{name}.py").is_file():
        known = sorted(p.name for p in folder.parent.iterdir() if (p / f"{p.name}.py").is_file())
        raise KeyError(f"no metric module {name!r} in lmssl; known: {', '.join(known)}")
    return evaluate.load(str(folder), config_name)


# --------------------------------------------------------------------------- features and kNN

@torch.no_grad()
def extract_features(objective, module, data, batch_size: int, accelerator,
                     autocast: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (n, dim) float32 on the CPU, labels (n,)) of every row of `data`, in order: the
    objective's `features` of each collated batch, batches sharded over processes. autocast=False
    keeps fp32 under a mixed-precision run (a probe's features must be what the saved model sees)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    n_batches = (len(data) + batch_size - 1) // batch_size
    was_training = module.training
    module.eval()
    mine: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for i in range(rank, n_batches, world):
        examples = _rows(data, i * batch_size, (i + 1) * batch_size)
        batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in objective.collate(examples).items()}
        with accelerator.autocast() if autocast else contextlib.nullcontext():
            out = objective.features(module, batch)
        mine.append((i, out.float().cpu(), torch.tensor([int(e["label"]) for e in examples])))
    module.train(was_training)
    if world > 1:
        from accelerate.utils import gather_object

        mine = gather_object(mine)
    mine.sort(key=lambda item: item[0])
    return torch.cat([f for _, f, _ in mine]), torch.cat([y for _, _, y in mine])


def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, k: int = 20,
                temperature: float = 0.07, num_classes: Optional[int] = None, chunk: int = 1024) -> torch.Tensor:
    """Class of each query by its k most cosine-similar bank features, each voting with weight
    exp(similarity / temperature) (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric
    Instance Discrimination", the kNN monitor of DINO, solo-learn and lightly). Ties go to the
    smaller class id. Memory: one (chunk, bank) similarity block at a time."""
    num_classes = num_classes or int(bank_labels.max()) + 1
    bank = torch.nn.functional.normalize(bank.float(), dim=1)
    k = min(k, bank.shape[0])
    predictions = []
    for start in range(0, queries.shape[0], chunk):
        q = torch.nn.functional.normalize(queries[start:start + chunk].float(), dim=1)
        top = (q @ bank.T).topk(k, dim=1)                                   # values, indices: (chunk, k)
        weights = (top.values / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, bank_labels[top.indices].long(), weights)    # (chunk, classes)
        predictions.append(votes.argmax(1))
    return torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)


def knn_accuracy(bank, bank_labels, queries, query_labels, k: int = 20, temperature: float = 0.07,
                 num_classes: Optional[int] = None) -> float:
    """Top-1 accuracy of knn_predict on labeled queries."""
    predicted = knn_predict(bank, bank_labels, queries, k, temperature, num_classes)
    return float((predicted == query_labels.long()).double().mean())


L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # penalties tried on held-out training features ("auto")


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float, max_iter: int) -> torch.Tensor:
    """(dim + 1, classes) weights of multinomial logistic regression on standardized x, mean
    cross-entropy + l2/2 * |W|^2 (bias not penalized), solved with L-BFGS from zero: deterministic."""
    theta = torch.zeros(x.shape[1] + 1, classes, dtype=torch.float64, requires_grad=True)
    x = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
    optimizer = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ theta, y) + 0.5 * l2 * theta[:-1].pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return theta.detach()


def linear_probe(features: torch.Tensor, labels: torch.Tensor, classes: int, l2: Optional[float] = None,
                 seed: int = 0, max_iter: int = 1000) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A linear classifier on frozen features: multinomial logistic regression on features
    standardized per dimension, fit to convergence with L-BFGS. With l2=None the penalty is picked
    from L2_GRID by accuracy on a seeded tenth of the training features, then refit on all of them
    (SimCLR's linear evaluation chooses its regularization on a validation split the same way).
    Returns (weight (classes, dim), bias (classes,), l2) of one linear layer on the raw features:
    the standardization is folded in, so `features @ weight.T + bias` are the probe's logits."""
    labels = labels.long()
    mean, std = features.double().mean(0), features.double().std(0).clamp_min(1e-6)
    x = (features.double() - mean) / std
    if l2 is None:
        order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
        held, kept = order[: max(1, x.shape[0] // 10)], order[max(1, x.shape[0] // 10):]
        scores = []
        for penalty in L2_GRID:
            theta = _fit_logistic(x[kept], labels[kept], classes, penalty, max_iter // 4)
            logits = torch.cat([x[held], torch.ones(len(held), 1, dtype=torch.float64)], 1) @ theta
            scores.append(float((logits.argmax(1) == labels[held]).double().mean()))
        l2 = L2_GRID[max(range(len(L2_GRID)), key=lambda i: (scores[i], L2_GRID[i]))]  # ties: more penalty
    theta = _fit_logistic(x, labels, classes, l2, max_iter)
    weight = (theta[:-1] / std[:, None]).T                                 # (classes, dim) on raw features
    bias = theta[-1] - weight @ mean
    return weight.float(), bias.float(), float(l2)
