"""MLM pretraining throughput: lmssl's training loop and `mlm` objective against a plain
PyTorch loop over `BertForMaskedLM` with `DataCollatorForLanguageModeling`, same model, data,
batch and optimizer, in one process. Prints a Markdown table with the ratio.

    python bench/bench_training.py [--size mini] [--steps 60] [--batch 32] [--length 128]
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
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def data_file() -> Path:
    root = Path(os.environ.get("LMSSL_DATA_DIR", REPO.parent / "shared" / "data"))
    path = root / "wikitext-2" / "train.txt.xz"
    if not path.exists():
        sys.exit(f"{path} is absent: set LMSSL_DATA_DIR to the shared data folder")
    return path


def build_tokenizer(lines: list[str], folder: Path):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(lines, trainers.WordPieceTrainer(
        vocab_size=8000, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(folder)
    return fast


def lmssl_run(tokenizer, blocks, args, out: Path) -> float:
    """tokens/s between the first logged step after warm-up and the last (log times, every 5 steps)."""
    from accelerate import Accelerator

    from lmssl.models import ModelConfig
    from lmssl.objectives.mlm import MaskedLM, Options
    from lmssl.recipe import TrainingConfig
    from lmssl.training import train

    objective = MaskedLM(Options(), tokenizer, args.length)
    model = objective.build_model(ModelConfig(family="bert", size=args.size))
    cfg = TrainingConfig(name="bench", kind="pretrain", batch_size=args.batch, max_steps=args.steps, log_every=5,
                         save_every=None, learning_rate=5e-4)
    train(objective, model, blocks, None, cfg, Accelerator(), out, None, seed=0, accumulation=1, desc="lmssl")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["step"], r["time"]) for r in records if "train/loss" in r and r["step"] >= args.warmup]
    (first_step, first_time), (last_step, last_time) = logged[0], logged[-1]
    return (last_step - first_step) * args.batch * args.length / (last_time - first_time)  # full blocks only


def plain_run(tokenizer, blocks, args) -> float:
    """tokens/s of a plain loop: full-vocabulary MLM head, the HF collator, AdamW."""
    import torch
    from transformers import AutoModelForMaskedLM, DataCollatorForLanguageModeling

    from lmssl.models import ModelConfig, build_config

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForMaskedLM.from_config(build_config(ModelConfig(family="bert", size=args.size), tokenizer,
                                                          args.length)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    model.train()
    times, tokens = [], []
    for step in range(args.steps):
        start = time.perf_counter()  # collation counts, as it does in lmssl's loop
        rows = blocks[step * args.batch:(step + 1) * args.batch]["input_ids"]
        batch = {k: v.to(device) for k, v in collator([{"input_ids": r} for r in rows]).items()}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            tokens.append(int(batch["attention_mask"].sum()))
    return sum(tokens) / sum(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="mini")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args()

    import datasets
    import torch

    datasets.disable_progress_bars()
    from lmssl.objectives.mlm import MaskedLM, Options

    lines = [line for line in datasets.load_dataset("text", data_files=str(data_file()), split="train")["text"]
             if line.strip()][:20000]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(lines, Path(tmp) / "tok")
        blocks = MaskedLM(Options(), tokenizer, args.length).prepare(datasets.Dataset.from_dict({"text": lines}))
        blocks = blocks.filter(lambda r: len(r["input_ids"]) == args.length)
        ours = lmssl_run(tokenizer, blocks, args, Path(tmp) / "lmssl")
        plain = plain_run(tokenizer, blocks, args)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {device}, torch {torch.__version__}; "
          f"command: python bench/bench_training.py --size {args.size} --steps {args.steps} --batch {args.batch} "
          f"--length {args.length}\n")
    print("| loop | MLM head | tokens/s after warm-up |\n|---|---|---:|")
    print(f"| plain PyTorch, BertForMaskedLM + DataCollatorForLanguageModeling | every token | {plain:,.0f} |")
    print(f"| lmssl train() + mlm objective | masked tokens only | {ours:,.0f} |")
    print(f"\nratio lmssl / plain: {ours / plain:.2f}x")


if __name__ == "__main__":
    main()
