"""Pretraining throughput on one GPU, in one process, same model and batch in every column: GPT-2 124M (causal
LM, 1024 tokens), BERT-base MLM (128 tokens, 15%), ViT-B/16 MAE (224 pixels, mask 0.75), ViT-S/16 SimCLR.

- plain / plain_compiled: a hand-written loop over the transformers model (SimCLR: ViTModel + projection MLP +
  NT-Xent) on random device tensors, bf16 autocast, fused AdamW, clipping; eager / torch.compile(model).
- trainer: transformers.Trainer (bf16, adamw_torch_fused, 4 loader workers) on a datasets.Dataset of random
  blocks, DataCollatorForLanguageModeling (15%) for BERT, default_data_collator for GPT-2; n/a for vision.
- lmssl: lmssl's training.train() with its objective (causal_lm, mlm, mae, simclr) on random token blocks or
  uint8 images written with save_to_disk and read back with load_from_disk (--compile: lmssl's compile: true).
- lmssl_random: the same step on random tensors: one batch collated once by the objective and handed out again
  every step (no dataset reads, no collation), which prices lmssl's data path.

Tokens/s (images/s for MAE and SimCLR; a SimCLR image is two views) between the end of step --warmup and of step
--steps, CUDA synchronized before each clock read. MFU = rate x lmssl.flops.flops_per_unit / the measured bf16
matmul (lmssl.flops.measured_peak); MAE's is flops.py's upper bound (every patch through encoder and decoder);
CPUs show FLOP/s. Prints a Markdown table and the issue's targets (PASS / FAIL / NOT RUN); --out writes JSON.
CPU smoke run: `OMP_NUM_THREADS=1 python bench/pretrain_throughput.py --size tiny --steps 6 --warmup 2`.

On the lent GPU (../shared/GPU.md: torch, transformers, accelerate are there; datasets, dill and multiprocess
come as wheels in a carried .whl/; lmssl runs from the working tree, C extensions unbuilt):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
    python3 bench/pretrain_throughput.py --compile --out $OUT/pretrain_throughput.json

(--models gpt2,bert and --models mae,simclr split the run if one command would pass 10 minutes.)
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

LR, BETAS, EPS, WD = 5e-4, (0.9, 0.98), 1e-6, 0.01  # lmssl's defaults, set on every side
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
COLUMNS = ("plain", "plain_compiled", "trainer", "lmssl", "lmssl_random")
MODELS = ("gpt2", "bert", "mae", "simclr")
BASE_BATCH = {"gpt2": 16, "bert": 256, "mae": 128, "simclr": 256}
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


class NotApplicable(Exception):
    """A column this model has no version of (no Trainer for the vision methods)."""


def sync() -> float:
    if CUDA:
        torch.cuda.synchronize()
    return time.perf_counter()


# --------------------------------------------------------------------------- models and data

def in_memory_tokenizer(kind: str, vocab: int):
    """A WordPiece (BERT) or BPE (GPT-2) tokenizer of exactly `vocab` ids, built from a made-up vocabulary
    with the tokenizers library: the models need its size and special ids, never its text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = (dict(unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
                if kind == "bert" else dict.fromkeys(("eos_token", "bos_token", "unk_token"), "<|endoftext|>"))
    names = list(dict.fromkeys(specials.values()))             # ids 0.. are the special tokens
    words = {w: i for i, w in enumerate(names + [f"w{i}" for i in range(vocab - len(names))])}
    tok = Tokenizer(models.WordPiece(words, unk_token="[UNK]") if kind == "bert" else models.BPE(words, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def batch_of(name: str, args) -> int:
    return args.batch[name] or (8 if args.size == "tiny" else BASE_BATCH[name])


@dataclass
class Bench:
    """One model's setup, shared by its columns."""

    name: str
    unit: str                                   # "tokens" or "images"
    batch: int                                  # sequences or images per step
    units_per_step: int
    seq: Optional[int]                          # tokens per sequence (text)
    objective: object                           # the lmssl objective (builds the model for every column)
    model_cfg: object                           # lmssl.models.ModelConfig
    random_batch: Callable[[], dict]            # device tensors for the plain loops
    rows: object                                # datasets.Dataset read back from disk (the lmssl column)
    trainer_rows: object = None                 # what the Trainer reads; None: no Trainer column
    tokenizer: object = None
    flops_per_unit: Optional[float] = None


def text_bench(name: str, args, tmp: Path) -> Bench:
    import datasets

    from lmssl.models import ModelConfig
    from lmssl.objectives import OBJECTIVES

    tiny = args.size == "tiny"
    seq = 64 if tiny else (1024 if name == "gpt2" else 128)
    vocab = 1024 if tiny else (50257 if name == "gpt2" else 30522)
    batch = batch_of(name, args)
    tokenizer = in_memory_tokenizer(name, vocab)
    if name == "gpt2":
        objective = OBJECTIVES["causal_lm"](OBJECTIVES["causal_lm"].Options(), tokenizer, seq)
    else:
        objective = OBJECTIVES["mlm"](OBJECTIVES["mlm"].Options(mask_rate=0.15), tokenizer, seq)
    model_cfg = ModelConfig(family=name, size="tiny" if tiny else "base")

    generator = torch.Generator().manual_seed(0)
    low = len(tokenizer.all_special_ids)                       # no special ids inside a block
    ids = torch.randint(low, vocab, (batch * args.steps, seq), generator=generator)
    if name == "bert":                                         # [CLS] ... [SEP], as lmssl's packing makes them
        ids[:, 0], ids[:, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
    datasets.Dataset.from_dict({"input_ids": ids.tolist()}).save_to_disk(str(tmp / name))
    rows = datasets.load_from_disk(str(tmp / name))
    trainer_rows = rows.map(lambda b: {"labels": b["input_ids"]}, batched=True) if name == "gpt2" else rows

    def random_batch() -> dict:
        ids = torch.randint(low, vocab, (batch, seq), device=DEVICE)
        if name == "gpt2":
            return {"input_ids": ids, "labels": ids}
        labels = torch.where(torch.rand(ids.shape, device=DEVICE) < 0.15, ids, -100)  # full head all the same
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    return Bench(name, "tokens", batch, batch * seq, seq, objective, model_cfg, random_batch, rows, trainer_rows,
                 tokenizer)


def vision_bench(name: str, args, tmp: Path) -> Bench:
    import datasets

    from lmssl.models import ModelConfig, vit_input
    from lmssl.objectives import OBJECTIVES
    from lmssl.objectives.vision import image_processor

    tiny = args.size == "tiny"
    model_cfg = ModelConfig(family="vit", size="tiny" if tiny else ("vit-b" if name == "mae" else "vit-s"))
    size = vit_input(model_cfg)[0]
    batch = batch_of(name, args)
    cls = OBJECTIVES[name]
    options = cls.Options()                                    # SimCLR: the paper's views and head
    if name == "mae":  # ViTMAEConfig's own decoder (8 x 512, 16 heads) for base; a small one for tiny
        width, depth, heads = (64, 1, 2) if tiny else (512, 8, 16)
        options = cls.Options(mask_ratio=0.75, decoder_width=width, decoder_depth=depth, decoder_heads=heads)
    objective = cls(options, image_processor(size, MEAN, STD))

    pixels = torch.randint(0, 256, (batch * 2, 3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).numpy()
    features = datasets.Features({"pixels": datasets.Array3D(shape=(3, size, size), dtype="uint8")})
    datasets.Dataset.from_dict({"pixels": list(pixels)}, features=features).save_to_disk(str(tmp / name))
    rows = datasets.load_from_disk(str(tmp / name)).with_format("numpy", dtype=None)  # as lmssl's images are
    views = 2 if name == "simclr" else 1

    def random_batch() -> dict:
        return {"pixel_values": torch.randn(batch * views, 3, size, size, device=DEVICE)}

    return Bench(name, "images", batch, batch, None, objective, model_cfg, random_batch, rows)


class PlainSimCLR(torch.nn.Module):
    """ViTModel -> CLS -> Linear/ReLU/Linear -> NT-Xent over the 2n views (rows i and n+i are one image)."""

    def __init__(self, backbone, hidden: int = 2048, out: int = 128, temperature: float = 0.2):
        super().__init__()
        self.backbone, self.temperature = backbone, temperature
        width = backbone.config.hidden_size
        self.head = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, out))

    def forward(self, pixel_values):
        z = self.head(self.backbone(pixel_values=pixel_values).last_hidden_state[:, 0])
        z = torch.nn.functional.normalize(z.float(), dim=1)
        logits = (z @ z.T / self.temperature).float()
        n2 = z.shape[0]
        logits = logits.masked_fill(torch.eye(n2, dtype=torch.bool, device=z.device), float("-inf"))
        return torch.nn.functional.cross_entropy(logits, (torch.arange(n2, device=z.device) + n2 // 2) % n2)


def counted_flops(bench: Bench) -> Optional[float]:
    """Training FLOPs per token or image (lmssl.flops), from the model built on the meta device."""
    from lmssl.flops import flops_per_unit

    with torch.device("meta"):
        model = bench.objective.build_model(bench.model_cfg)
    per_unit = flops_per_unit(model, bench.unit, bench.seq)
    return per_unit * 2 if per_unit and bench.name == "simclr" else per_unit  # two views per image


# --------------------------------------------------------------------------- the columns

def run_plain(bench: Bench, args, compiled: bool) -> float:
    model = bench.objective.build_model(bench.model_cfg)
    module = (PlainSimCLR(model) if bench.name == "simclr" else model).to(DEVICE).train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=True)
    forward = torch.compile(module) if compiled else module
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if CUDA and args.precision == "bf16"
                else contextlib.nullcontext())
    batches = [bench.random_batch() for _ in range(2)]
    start = None
    for step in range(1, args.steps + 1):
        with autocast:
            out = forward(**batches[step % 2])
        loss = out if torch.is_tensor(out) else out.loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == args.warmup:
            start = sync()
    return (args.steps - args.warmup) * bench.units_per_step / (sync() - start)


def run_trainer(bench: Bench, args, out: Path) -> float:
    from transformers import (DataCollatorForLanguageModeling, PrinterCallback, Trainer, TrainerCallback,
                              TrainingArguments, default_data_collator)

    if bench.trainer_rows is None:
        raise NotApplicable
    stamps: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            if state.global_step in (args.warmup, args.steps):
                stamps[state.global_step] = sync()

    training_args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=bench.batch, max_steps=args.steps, learning_rate=LR,
        adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS, weight_decay=WD, max_grad_norm=1.0,
        optim="adamw_torch_fused", bf16=CUDA and args.precision == "bf16", use_cpu=not CUDA,
        dataloader_num_workers=args.workers, logging_strategy="no", save_strategy="no", eval_strategy="no",
        report_to=[], disable_tqdm=True, seed=0)
    collator = (DataCollatorForLanguageModeling(bench.tokenizer, mlm_probability=0.15) if bench.name == "bert"
                else default_data_collator)
    model = bench.objective.build_model(bench.model_cfg)
    trainer = Trainer(model=model, args=training_args, train_dataset=bench.trainer_rows, data_collator=collator,
                      callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)  # its end-of-training summary would land in the middle of the table
    trainer.train()
    return (args.steps - args.warmup) * bench.units_per_step / (stamps[args.steps] - stamps[args.warmup])


class Timed:
    """An lmssl objective as it is, with a clock on its after_step hook (step `warmup` and the last) and,
    with `fixed`, that one batch handed out by collate in place of collating the examples."""

    def __init__(self, inner, warmup: int, steps: int, fixed: Optional[dict] = None):
        self.inner, self.warmup, self.steps, self.fixed = inner, warmup, steps, fixed
        self.stamps: dict[int, float] = {}

    def __getattr__(self, name):
        inner = self.__dict__.get("inner")            # absent while unpickling in a loader worker
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def collate(self, examples):
        return dict(self.fixed) if self.fixed is not None else self.inner.collate(examples)

    def after_step(self, module, step: int, total_steps: int) -> None:
        self.inner.after_step(module, step, total_steps)
        if step in (self.warmup, self.steps):
            self.stamps[step] = sync()


class Indices:
    """A stand-in dataset of n rows for lmssl_random: the loop's sampler and loader run, nothing is read."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index):
        return {"i": list(index)}


def run_lmssl(bench: Bench, args, out: Path, random: bool) -> float:
    from accelerate import Accelerator

    from lmssl.recipe import TrainingConfig
    from lmssl.training import train

    model = bench.objective.build_model(bench.model_cfg)  # MAE: also fixes the patch grid its collate masks
    data, fixed = bench.rows, None
    if random:
        torch.manual_seed(0)
        first = bench.rows[:bench.batch]
        fixed = bench.objective.collate([{k: v[i] for k, v in first.items()} for i in range(bench.batch)])
        data = Indices(bench.batch * 2)
    objective = Timed(bench.objective, args.warmup, args.steps, fixed)
    cfg = TrainingConfig(name="bench", kind="pretrain", batch_size=bench.batch, max_steps=args.steps,
                         save_every=None, learning_rate=LR, adam_betas=list(BETAS), adam_eps=EPS, weight_decay=WD,
                         compile=args.compile, num_workers=args.workers)
    accelerator = Accelerator(mixed_precision="bf16" if CUDA and args.precision == "bf16" else "no")
    train(objective, model, data, None, cfg, accelerator, out, None, seed=0, accumulation=1,
          desc=f"lmssl {bench.name}", report_to=())
    stamps = objective.stamps
    return (args.steps - args.warmup) * bench.units_per_step / (stamps[args.steps] - stamps[args.warmup])


def free_memory() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    with contextlib.suppress(Exception):
        torch._dynamo.reset()  # compiled columns leave graphs and guards behind


# --------------------------------------------------------------------------- peak, targets, report

def matmul_peak(precision: str) -> Optional[float]:
    """The MFU denominator: a measured large matmul on CUDA (lmssl.flops.measured_peak); None on CPU."""
    if not CUDA:
        return None
    from lmssl.flops import measured_peak, precision_of

    return measured_peak(DEVICE, "bf16" if precision == "bf16" else precision_of("no"))


def target_checks(results: dict, bf16: bool, gate: Optional[str]) -> list[tuple[str, str, str]]:
    """The issue's targets; `gate` (a reason: CPU, tiny models) makes every verdict NOT RUN, figures kept."""
    def rate(model, column):
        return (results.get((model, column)) or {}).get("rate")

    def ratio(label, model, top, bottom, floor):
        a, b = rate(model, top), rate(model, bottom)
        if a is None or b is None:
            return (label, "-", "NOT RUN")
        return (label, f"{a / b:.2f}x", verdict(a / b >= floor))

    def verdict(passed: bool) -> str:
        return f"NOT RUN ({gate})" if gate else ("PASS" if passed else "FAIL")

    mfu = (results.get(("gpt2", "lmssl")) or {}).get("mfu")
    checks = [("GPT-2 124M lmssl MFU >= 45% (bf16)", f"{mfu:.1%}" if mfu is not None else "-",
               "NOT RUN" if mfu is None or not bf16 else verdict(mfu >= 0.45)),
              ratio("GPT-2 124M lmssl >= 1.3x plain compiled", "gpt2", "lmssl", "plain_compiled", 1.3),
              ratio("BERT-base MLM lmssl >= 2x HF Trainer (eager)", "bert", "lmssl", "trainer", 2.0)]
    for model in MODELS:
        checks.append(ratio(f"{model} lmssl from disk within 10% of lmssl on random tensors", model, "lmssl",
                            "lmssl_random", 0.9))
    return checks


def error_text(err: Exception) -> str:
    traceback.print_exc()
    return f"{type(err).__name__}: {' '.join(str(err).split())}"[:160]


def run_model(name: str, columns: list[str], args, tmp: Path, peak: Optional[float]) -> list[dict]:
    """Every asked column of one model; a column that fails (or a setup that does) becomes an error row."""
    rows = [{"model": name, "column": c, "batch": batch_of(name, args), "unit": "", "rate": None} for c in columns]
    try:
        bench = (text_bench if name in ("gpt2", "bert") else vision_bench)(name, args, tmp)
        bench.flops_per_unit = counted_flops(bench)
    except Exception as err:
        return [dict(row, error=f"setup: {error_text(err)}") for row in rows]
    for row in rows:
        column = row["column"]
        row.update(batch=bench.batch, unit=bench.unit)
        print(f"-- {name} / {column}", file=sys.stderr, flush=True)
        try:
            if column.startswith("plain"):
                row["rate"] = run_plain(bench, args, compiled=column == "plain_compiled")
            elif column == "trainer":
                row["rate"] = run_trainer(bench, args, tmp / f"trainer-{name}")
            else:
                row["rate"] = run_lmssl(bench, args, tmp / f"{column}-{name}", random=column == "lmssl_random")
        except NotApplicable:
            row["error"] = "n/a"
        except Exception as err:  # one column's failure is a table cell, not the end of the run
            row["error"] = error_text(err)
        if row["rate"] is not None and bench.flops_per_unit:
            row["flops_per_s"] = row["rate"] * bench.flops_per_unit
            row["mfu"] = row["flops_per_s"] / peak if peak else None
        free_memory()
    return rows


def print_table(results: dict) -> None:
    print("| model | column | batch | units/s | MFU | vs plain compiled | vs Trainer eager |\n"
          "|---|---|---:|---:|---:|---:|---:|")
    for (name, column), row in results.items():
        if row["rate"] is None:
            print(f"| {name} | {column} | {row['batch']} | {row['error']} | | | |")
            continue
        ratios = []
        for ref in ("plain_compiled", "trainer"):
            base = (results.get((name, ref)) or {}).get("rate")
            ratios.append(f"{row['rate'] / base:.2f}x" if base else "-")
        mfu = (f"{row['mfu']:.1%}" if row.get("mfu") is not None
               else f"{row['flops_per_s'] / 1e9:,.1f} GFLOP/s" if row.get("flops_per_s") else "-")
        print(f"| {name} | {column} | {row['batch']} | {row['rate']:,.0f} {row['unit']}/s | {mfu} | "
              f"{ratios[0]} | {ratios[1]} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--columns", default=",".join(COLUMNS))
    parser.add_argument("--steps", type=int, default=45)
    parser.add_argument("--warmup", type=int, default=15)
    for name in MODELS:
        parser.add_argument(f"--batch-{name}", type=int, default=None, help=f"default {BASE_BATCH[name]} (tiny: 8)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="CUDA only; CPU runs fp32")
    parser.add_argument("--compile", action="store_true", help="lmssl's compile: true in the lmssl columns")
    parser.add_argument("--size", choices=["base", "tiny"], default="base")
    parser.add_argument("--workers", type=int, default=None, help="loader workers of Trainer and lmssl (CUDA 4, CPU 0)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    models, columns = args.models.split(","), args.columns.split(",")
    unknown = sorted(set(models) - set(MODELS)) + sorted(set(columns) - set(COLUMNS))
    if unknown or not 1 <= args.warmup < args.steps:
        parser.error(f"unknown models or columns {unknown}" if unknown else "need 1 <= --warmup < --steps")
    args.batch = {name: getattr(args, f"batch_{name}") for name in MODELS}
    args.workers = args.workers if args.workers is not None else (4 if CUDA else 0)
    bf16 = CUDA and args.precision == "bf16"

    import importlib.util

    import datasets
    import transformers

    import lmssl.plots

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    if importlib.util.find_spec("matplotlib") is None:  # train() draws loss.png with it; the GPU machine lacks it
        lmssl.plots.plot_curves = lambda *a, **k: None

    peak = matmul_peak(args.precision)
    results: dict[tuple[str, str], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            for row in run_model(name, columns, args, Path(tmp), peak):
                results[(name, row["column"])] = row
            free_memory()

    device = torch.cuda.get_device_name() if CUDA else f"CPU ({os.cpu_count()} cores)"
    print(f"\nMeasured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {device}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; command: python bench/pretrain_throughput.py "
          + " ".join(sys.argv[1:]))
    print(f"{args.size} models, {'bf16 autocast' if bf16 else 'fp32'}, lmssl compile {args.compile}, "
          f"{args.workers} loader workers; rates between steps {args.warmup} and {args.steps}; MFU denominator: "
          + (f"measured matmul {peak / 1e12:,.0f} TFLOP/s" if peak else "none on CPU (FLOP/s shown)") + "\n")
    print_table(results)
    checks = target_checks(results, bf16, "CPU" if not CUDA else ("tiny models" if args.size == "tiny" else None))
    print("\n| target | measured | result |\n|---|---:|---|")
    for label, value, verdict in checks:
        print(f"| {label} | {value} | {verdict} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "device": device, "torch": torch.__version__, "transformers": transformers.__version__,
            "command": sys.argv, "peak_flops": peak, "precision": "bf16" if bf16 else "fp32",
            "rows": list(results.values()),
            "targets": [{"target": t, "measured": m, "result": r} for t, m, r in checks]}, indent=1))


if __name__ == "__main__":
    main()
