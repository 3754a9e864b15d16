"""The one training loop, for every objective. Read it top to bottom.

Data order is a pure function of (seed, epoch): micro-batch g of the run is slice g of a seeded
permutation, so a resumed run starts at batch g without replaying anything. Every micro-batch
also reseeds the RNGs from (seed, g, rank) before collating (dynamic masking, crops) and before
the forward pass (dropout), which makes a resumed run bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import itertools
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader

from lmssl import checkpoint
from lmssl.errors import LmsslError
from lmssl.evaluation import evaluate_objective
from lmssl.flops import device_peak, flops_per_unit
from lmssl.rng import batch_key, seed_all
from lmssl.tracking import Tracker, count_units


class Interrupted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint was written and the stage can be resumed."""


class KeyedDataset(torch.utils.data.Dataset):
    """Serves (key, example) pairs so collation can be seeded by the batch's key, in workers too."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, keyed: list[tuple[int, int]]) -> list[tuple[int, dict]]:
        rows = self.dataset[[i for _, i in keyed]]
        columns = list(rows)
        return [(k, {c: rows[c][j] for c in columns}) for j, (k, _) in enumerate(keyed)]

    def __getitem__(self, keyed: tuple[int, int]):
        return keyed[0], self.dataset[keyed[1]]


class ResumableBatches(torch.utils.data.Sampler):
    """Micro-batches [start, stop) of the run for one process: seeded per-epoch permutations,
    global micro-batch g holding slice g*world+rank of size batch_size."""

    def __init__(self, n: int, batch_size: int, world: int, rank: int, seed: int, start: int, stop: int,
                 shuffle: bool = True):
        self.n, self.bs, self.world, self.rank, self.seed = n, batch_size, world, rank, seed
        self.start, self.stop, self.shuffle = start, stop, shuffle
        self.per_epoch = n // (batch_size * world)

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, perm = -1, None
        for g in range(self.start, self.stop):
            if g // self.per_epoch != epoch:
                epoch = g // self.per_epoch
                if self.shuffle:
                    perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7 + epoch))
                    perm = perm.tolist()                 # a host tensor, read once per epoch
                else:
                    perm = list(range(self.n))
            begin = ((g % self.per_epoch) * self.world + self.rank) * self.bs
            key = batch_key(self.seed, g, self.rank)
            yield [(key, i) for i in perm[begin:begin + self.bs]]


def make_collate(collate):
    def keyed_collate(pairs):
        seed_all(pairs[0][0])
        batch = collate([example for _, example in pairs])
        batch["_key"] = pairs[0][0]
        return batch

    return keyed_collate


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases and norm weights (every 1-d tensor) are left alone."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress * (1.0 - min_ratio)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@dataclass
class TrainResult:
    steps: int
    metrics: dict[str, float]
    history: list[dict[str, float]]
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time split into train, eval and save (checkpoints): this call's, plus after a resume the earlier
    calls' up to the checkpoint it resumed from (work after that checkpoint was lost and is not counted)."""


class _StopFlag:
    """SIGTERM/SIGINT set a flag the loop checks after every optimizer step; a second SIGINT exits at once."""

    def __init__(self):
        self.raised = False
        self.previous = {}

    def __enter__(self):
        def handler(signum, frame):
            if self.raised and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.raised = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self.previous.items():
            signal.signal(sig, old)


def _where_finite(finite: torch.Tensor, value) -> torch.Tensor:
    """`value` (a device tensor or a host number) where the loss was finite, else 0: on the device, no copy."""
    if torch.is_tensor(value):
        return torch.where(finite, value.detach().float(), 0.0)
    return finite.float() * float(value)           # the number travels as a kernel argument, not a copy


def train(objective, model: torch.nn.Module, train_data, eval_data, cfg, accelerator, out_dir: Path,
          ckpt_dir: Optional[Path], seed: int, accumulation: int, desc: str = "train",
          on_eval: Optional[Callable[[int], dict[str, float]]] = None, report_to: tuple[str, ...] = ("tensorboard",),
          on_save: Optional[Callable[[int, torch.nn.Module], None]] = None) -> TrainResult:
    """Train `model` with `objective` for cfg.max_steps (or cfg.epochs); resume from ckpt_dir if it holds one.

    `on_eval(step)`, when given, runs on every process after each evaluation (a stage scoring its
    task metric and keeping the best weights, say); the metrics it returns are logged too.
    `on_save(step, model)` runs on every process after each checkpoint is written (not on interruption).
    `report_to` names the Accelerate trackers the metrics go to, beside metrics.jsonl."""
    started = time.perf_counter()
    clock = {"eval": 0.0, "save": 0.0}  # the rest of this call's wall time is training
    world, rank = accelerator.num_processes, accelerator.process_index
    streaming = getattr(train_data, "streaming", False)   # a data.streaming.TextStream: no length, max_steps
    per_epoch = 1 if streaming else len(train_data) // (cfg.batch_size * world)
    if per_epoch == 0:
        raise LmsslError(
            f"{desc}: the training data has {len(train_data)} examples, fewer than one batch of "
            f"{cfg.batch_size} x {world} process(es); lower batch_size or add data"
        )
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch / accumulation))
    total_micro = total_steps * accumulation
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)

    accelerator.gradient_accumulation_steps = accumulation
    seed_all(seed)
    module = objective.training_module(model)
    if getattr(module, "_no_split_modules", None) is None and getattr(model, "_no_split_modules", None):
        module._no_split_modules = list(model._no_split_modules)   # FSDP wraps these blocks; a head wrapper has none
    # fused: one kernel per step on CUDA and CPU, and the only AdamW that skips a non-finite step on the
    # device (found_inf) instead of reading a flag back to the host
    optimizer = torch.optim.AdamW(param_groups(module, cfg.weight_decay), lr=cfg.learning_rate,
                                  betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule, warmup, total_steps,
                                                                       cfg.min_lr_ratio))
    module, optimizer = accelerator.prepare(module, optimizer)
    # compiled: the training steps only; evaluation, clipping and checkpoints use the eager module (same weights)
    stepper = torch.compile(module, dynamic=None) if getattr(cfg, "compile", False) else module

    step, micro, nonfinite_run, nonfinite_total, history = 0, 0, 0, 0, []
    prior = {"train": 0.0, "eval": 0.0, "save": 0.0}
    latest = checkpoint.latest_valid(ckpt_dir, log=accelerator.print) if ckpt_dir else None
    if latest is not None:
        state = checkpoint.load(accelerator, latest, module, optimizer, scheduler)
        step, micro = state["step"], state["micro"]
        nonfinite_run, nonfinite_total = state["nonfinite_run"], state["nonfinite_total"]
        history = state.get("history", [])
        prior = state.get("seconds", prior)     # time spent before the interruption, up to that checkpoint
        where = f"micro-batch {micro}" + ("" if streaming else f", epoch {micro // per_epoch}")
        accelerator.print(f"{desc}: resuming from {latest.name} (step {step}/{total_steps}, {where})")
    accelerator.step = micro % accumulation

    pin = accelerator.device.type == "cuda"
    stream_state: Optional[dict] = None  # streaming: each DataLoader worker's state after its last batch used here
    if streaming:
        saved = state.get("data") if latest is not None else None
        batches, workers = train_data.loader(cfg.batch_size, rank, world, seed, micro, cfg.num_workers, saved, pin,
                                             f"stages.{desc}")
        loader = itertools.islice(batches, total_micro - micro)
        stream_state = saved or {"workers": workers, "streams": [None] * max(1, workers)}
    else:
        loader = DataLoader(
            KeyedDataset(train_data),
            batch_sampler=ResumableBatches(len(train_data), cfg.batch_size, world, rank, seed, micro, total_micro),
            collate_fn=make_collate(objective.collate), num_workers=cfg.num_workers, pin_memory=pin,
        )
    tracker = Tracker(out_dir, accelerator.is_main_process, total_steps, step, desc, report_to)

    def loop_state() -> dict[str, Any]:
        return {"micro": micro, "nonfinite_run": nonfinite_run, "nonfinite_total": nonfinite_total,
                "history": history, "seconds": {"train": prior["train"] + train_seconds(),
                                                "eval": prior["eval"] + clock["eval"], "save": prior["save"] + clock["save"]}}

    def train_seconds() -> float:
        return time.perf_counter() - started - clock["eval"] - clock["save"]

    def run_eval() -> dict[str, float]:
        begun = time.perf_counter()
        try:
            return evaluate_all()
        finally:
            clock["eval"] += time.perf_counter() - begun

    def evaluate_all() -> dict[str, float]:
        metrics: dict[str, float] = {}
        if eval_data is not None and len(eval_data) > 0:
            result = evaluate_objective(objective, module, eval_data, cfg.batch_size, accelerator, seed,
                                        max_batches=cfg.eval_batches)
            metrics = {f"eval/{k}": v for k, v in result.items()}
        if on_eval is not None:
            metrics.update(on_eval(step) or {})
        module.train()
        return metrics

    module.train()
    after_step = getattr(objective, "after_step", None)  # optional: fine-tuning objectives have none
    device = accelerator.device
    # No host sync in the step: the loss, the statistics and the non-finite flags stay device tensors, added up
    # there and read once per log_every; a non-finite step is skipped on the device by the fused AdamW
    # (found_inf), counted, and the run stops within log_every steps of max_nonfinite_steps in a row.
    zero = lambda: torch.zeros((), device=device)  # noqa: E731
    sums: dict[str, list] = {}                      # statistic -> [sum, count] since the last log
    step_bad = zero()                               # 1 when a micro-batch of this optimizer step was not finite
    bad_total = torch.full((), float(nonfinite_total), device=device)
    bad_run = torch.full((), float(nonfinite_run), device=device)
    bad_longest = bad_run.clone()                   # the longest run of skipped steps since the last check
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper steps this one
    last_loss, flops_known = float("nan"), False
    last_eval: dict[str, float] = {}

    def read_counters() -> None:
        nonlocal nonfinite_total, nonfinite_run
        nonfinite_total, nonfinite_run = int(bad_total.item()), int(bad_run.item())

    with _StopFlag() as stop:
        for batch in loader:
            key = batch.pop("_key")
            if stream_state is not None:             # where to resume after this batch: its worker's state
                made = batch.pop("_state")
                stream_state["streams"][made["worker"]] = made
            n_units, unit = count_units(batch)        # on the host's collated batch: no device read
            if not flops_known:
                flops_known = True                    # once: the unit is known from the first batch
                peak = device_peak(device, accelerator.mixed_precision)
                tracker.set_flops(flops_per_unit(model, unit, getattr(cfg, "max_length", None)),
                                  peak * world if peak else None)
            tracker.add_units(n_units * world, unit)
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            seed_all(key + 1)  # dropout and any in-model sampling
            with accelerator.accumulate(module):
                loss, stats = objective.loss(stepper, batch)
                finite = torch.isfinite(loss.detach())
                step_bad = torch.maximum(step_bad, (~finite).float())
                accelerator.backward(loss)            # a non-finite step's gradients are never applied
                for name, value in {"loss": (loss.detach().float(), 1.0), **stats}.items():
                    total, count = value if isinstance(value, tuple) else (value, 1.0)
                    acc = sums.setdefault(name, [zero(), zero()])
                    acc[0] += _where_finite(finite, total)
                    acc[1] += _where_finite(finite, count)
                if accelerator.sync_gradients:
                    if world > 1:                     # every process skips the same steps
                        step_bad = (accelerator.reduce(step_bad, "sum") > 0).float()
                    if cfg.max_grad_norm is not None:
                        accelerator.clip_grad_norm_(module.parameters(), cfg.max_grad_norm)
                    inner.found_inf = step_bad        # the fused AdamW leaves the weights and its state alone
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    bad_total += step_bad
                    bad_run = (bad_run + step_bad) * step_bad
                    bad_longest = torch.maximum(bad_longest, bad_run)
                    step_bad = zero()
            micro += 1
            if not accelerator.sync_gradients:
                continue

            step += 1
            scheduler.step()
            if after_step is not None:  # momentum teachers and targets follow the online weights
                after_step(accelerator.unwrap_model(module), step, total_steps)
            lr = scheduler.get_last_lr()[0]
            tracker.step(step, last_loss, lr)
            if step % cfg.log_every == 0 or step == total_steps:
                names = list(sums)
                values = torch.stack([t for n in names for t in sums[n]] + [bad_longest, bad_total]).tolist()
                longest, total_bad = int(values[-2]), int(values[-1])   # the one read of the device per log
                means = {n: values[2 * i] / values[2 * i + 1] for i, n in enumerate(names) if values[2 * i + 1] > 0}
                if longest >= cfg.max_nonfinite_steps:
                    raise LmsslError(
                        f"{desc}: the loss was not finite for {longest} steps in a row (by step {step}); "
                        "lower the learning rate or use bf16 instead of fp16. The last good checkpoint is kept."
                    )
                bad_longest = bad_run.clone()
                last_loss = means.get("loss", float("nan"))
                rate = tracker.units / max(train_seconds(), 1e-9)                 # throughput: the average so far
                record = {"train/loss": last_loss, "train/lr": lr,
                          **{f"train/{n}": v for n, v in means.items() if n != "loss"},
                          f"train/{tracker.unit_name}_per_s": rate, **tracker.flops_metrics(rate),
                          "train/nonfinite_steps": total_bad}
                tracker.log(step, record)
                history.append({"step": step, **record})
                sums = {}
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                last_eval = run_eval()
                tracker.log(step, last_eval)
                tracker.write(f"{desc} step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in last_eval.items()))
                history.append({"step": step, **last_eval})
            # the stop flag: read as is on one process; several agree on it every log_every steps only
            if world == 1:
                stop_now = stop.raised
            elif step % cfg.log_every == 0 or step == total_steps:
                stop_now = bool(accelerator.reduce(torch.tensor(float(stop.raised), device=device), "sum").item() > 0)
            else:
                stop_now = False
            if ckpt_dir and ((cfg.save_every and step % cfg.save_every == 0 and step < total_steps) or stop_now):
                begun = time.perf_counter()
                read_counters()
                checkpoint.save(accelerator, ckpt_dir, step, module, optimizer, scheduler, loop_state(),
                                cfg.keep_checkpoints, data_state=stream_state,
                                checkpoint_format=getattr(cfg, "checkpoint_format", "auto"))
                if on_save is not None and not stop_now:
                    on_save(step, model)
                clock["save"] += time.perf_counter() - begun
            if stop_now:
                tracker.close()
                raise Interrupted(f"{desc}: interrupted at step {step}; checkpoint written, run again to resume")

    read_counters()
    trained = train_seconds()  # the loop is over: what follows is evaluating and writing
    last_eval = run_eval()
    tracker.log(step, last_eval)
    history.append({"step": step, **last_eval})
    begun = time.perf_counter()
    tracker.close()            # metrics files and the loss plot
    accelerator.free_memory()  # the Accelerator forgets this model and optimizer: stages train several in turn
    clock["save"] += time.perf_counter() - begun
    logged = [h for h in history if "train/loss" in h]
    metrics = dict(last_eval)
    if logged:                                    # the last logged training statistics (loss, accuracy, ...)
        metrics.update({k: v for k, v in logged[-1].items() if k.startswith("train/") and k != "train/lr"
                        and not k.endswith("_per_s") and k != "train/mfu"})
    metrics["train/nonfinite_steps"] = float(nonfinite_total)
    metrics[f"train/{tracker.unit_name}"] = float(tracker.units)
    metrics[f"train/{tracker.unit_name}_per_s"] = tracker.units / max(trained, 1e-9)  # this call's training only
    metrics.update(tracker.flops_metrics(metrics[f"train/{tracker.unit_name}_per_s"]))
    # the stage's time: this call's and, after a resume, the earlier calls' up to their last checkpoint
    seconds = {"train": prior["train"] + trained, **{k: prior[k] + v for k, v in clock.items()}}
    return TrainResult(steps=step, metrics=metrics, history=history, seconds=seconds)
