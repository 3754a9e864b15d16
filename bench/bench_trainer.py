"""lmssl's pretraining against the HF `Trainer`, in one process, same model, data, batch, optimizer settings
and steps: MLM (BertForMaskedLM + DataCollatorForLanguageModeling, as run_mlm) and causal LM
(GPT2LMHeadModel on run_clm's `map(tokenize)` + `map(group_texts)` blocks). Prints a Markdown table.

    python bench/bench_trainer.py [--objective mlm|causal|both] [--size mini] [--steps 40] [--warmup 10]
                                  [--batch 32] [--length 128] [--compile]

Throughput is tokens/s between the end of step `warmup` and the end of the last step, timed the same way on
both sides (a callback on the Trainer; lmssl's metrics.jsonl times with log_every 1). The Trainer runs with
its defaults but for the fields set to lmssl's (learning rate, betas, eps, weight decay, warmup, clipping,
no evaluation, no saving, no reporting). --compile adds Trainer(torch_compile=True) and lmssl compile: true.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from bench_training import build_tokenizer, data_file  # noqa: E402

LR, BETAS, EPS, WD, WARMUP_STEPS = 5e-4, (0.9, 0.98), 1e-6, 0.01, 4


def byte_bpe(lines: list[str], folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=8000, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


def run_clm_blocks(lines: list[str], tokenizer, length: int):
    """run_clm.py's data path: tokenize every row, then concatenate and cut into blocks of `length`."""
    from itertools import chain

    import datasets

    raw = datasets.Dataset.from_dict({"text": lines})
    tokenized = raw.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"])

    def group_texts(examples):
        joined = {k: list(chain(*examples[k])) for k in examples.keys()}
        total = (len(joined[list(examples.keys())[0]]) // length) * length
        result = {k: [t[i:i + length] for i in range(0, total, length)] for k, t in joined.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    return tokenized.map(group_texts, batched=True)


def trainer_run(kind: str, model, blocks, tokenizer, args, out: Path, compiled: bool) -> float:
    from transformers import (DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments,
                              default_data_collator)

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(time.perf_counter())

    training_args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=LR,
        adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS, weight_decay=WD, warmup_steps=WARMUP_STEPS,
        max_grad_norm=1.0, lr_scheduler_type="cosine", logging_steps=10_000, save_strategy="no", eval_strategy="no",
        report_to=[], dataloader_num_workers=0, seed=0, torch_compile=compiled, disable_tqdm=True,
        use_cpu=not __import__("torch").cuda.is_available())
    collator = (DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15) if kind == "mlm"
                else default_data_collator)
    Trainer(model=model, args=training_args, train_dataset=blocks, data_collator=collator,
            callbacks=[Clock()]).train()
    return (len(stamps) - 1 - args.warmup) * args.batch * args.length / (stamps[-1] - stamps[args.warmup])


def lmssl_run(objective, model, blocks, args, out: Path, compiled: bool) -> float:
    from accelerate import Accelerator

    from lmssl.recipe import TrainingConfig
    from lmssl.training import train

    cfg = TrainingConfig(name="bench", kind="pretrain", batch_size=args.batch, max_steps=args.steps, log_every=1,
                         save_every=None, learning_rate=LR, adam_betas=list(BETAS), adam_eps=EPS, weight_decay=WD,
                         warmup_steps=WARMUP_STEPS, schedule="cosine", compile=compiled)
    train(objective, model, blocks, None, cfg, Accelerator(), out, None, seed=0, accumulation=1, desc="lmssl")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = {r["step"]: r["time"] for r in records if "train/loss" in r}
    steps = sorted(times)
    return (steps[-1] - (args.warmup + 1)) * args.batch * args.length / (times[steps[-1]] - times[args.warmup + 1])


def bench(kind: str, lines: list[str], args, tmp: Path) -> list[tuple[str, float]]:
    import torch

    from lmssl.models import ModelConfig, build_config

    family = "bert" if kind == "mlm" else "gpt2"
    if kind == "mlm":
        import datasets

        from lmssl.objectives.mlm import MaskedLM, Options

        tokenizer = build_tokenizer(lines, tmp / f"tok-{kind}")
        objective = MaskedLM(Options(mask_rate=0.15), tokenizer, args.length)
        blocks = objective.prepare(datasets.Dataset.from_dict({"text": lines})).filter(
            lambda r: len(r["input_ids"]) == args.length)
        trainer_blocks = blocks
    else:
        from lmssl.objectives.causal_lm import CausalLM, Options

        tokenizer = byte_bpe(lines, tmp / f"tok-{kind}")
        trainer_blocks = run_clm_blocks(lines, tokenizer, args.length)
        blocks = trainer_blocks.remove_columns([c for c in trainer_blocks.column_names if c != "input_ids"])
        objective = CausalLM(Options(), tokenizer, args.length)
    config = build_config(ModelConfig(family=family, size=args.size), tokenizer, args.length)
    # the Trainer's model as its example script makes it: run_clm's GPT2Config (`--model_type gpt2
    # --config_overrides`) has GPT-2's defaults, so its GELU is gelu_new; lmssl's preset is the same shape
    # with the same GELU computed by one fused kernel (gelu_pytorch_tanh). MLM: one config for both.
    trainer_config = config
    if kind == "causal":
        import transformers

        trainer_config = transformers.GPT2Config(**{k: v for k, v in config.to_dict().items()
                                                    if k not in ("activation_function", "transformers_version")})

    def fresh(trainer: bool = False):
        from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

        torch.manual_seed(0)
        return (AutoModelForMaskedLM if kind == "mlm" else AutoModelForCausalLM).from_config(
            trainer_config if trainer else config)

    rows = []
    for compiled in ([False, True] if args.compile else [False]):
        tag = " + compile" if compiled else ""
        rows.append((f"HF Trainer{tag}", trainer_run(kind, fresh(trainer=True), trainer_blocks, tokenizer, args,
                                                      tmp / f"trainer-{kind}-{compiled}", compiled)))
        rows.append((f"lmssl{tag}", lmssl_run(objective, fresh(), blocks, args, tmp / f"lmssl-{kind}-{compiled}",
                                              compiled)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--objective", choices=["mlm", "causal", "both"], default="both")
    parser.add_argument("--size", default="mini")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()

    import datasets
    import torch
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    lines = [line for line in datasets.load_dataset("text", data_files=str(data_file()), split="train")["text"]
             if line.strip()][:20000]
    kinds = ["mlm", "causal"] if args.objective == "both" else [args.objective]
    with tempfile.TemporaryDirectory() as tmp:
        results = {kind: bench(kind, lines, args, Path(tmp)) for kind in kinds}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {device}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; command: python bench/bench_trainer.py " + " ".join(sys.argv[1:]))
    print(f"\n{args.size} models, batch {args.batch} x {args.length} tokens, {args.steps} steps, tokens/s after "
          f"step {args.warmup}\n")
    print("| objective | loop | tokens/s | vs HF Trainer (eager) |\n|---|---|---:|---:|")
    for kind, rows in results.items():
        base = rows[0][1]
        for name, rate in rows:
            print(f"| {kind} | {name} | {rate:,.0f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
