"""Data preparation for causal pretraining: lmssl's (tokenize into int32 ids, several processes for large
sources, then pack documents joined with EOS into blocks) against run_clm.py's (`map(tokenize)` then
`map(group_texts)`), on WikiText-2 train + the 15 Gutenberg books, the same tokenizer and block size.

    python bench/bench_data_prep.py [--block 512] [--repeats 2]

Each preparation runs in its own subprocess with an empty datasets cache (nothing is reused), from the same
memory-mapped Arrow table of lines; wall time covers the maps, and peak memory is the largest sum of the PSS
(proportional set size) of the subprocess and its workers, sampled every 20 ms. run_clm runs as the script does by default
(`--preprocessing_num_workers` unset: one process) and with num_proc set to the CPUs. "Above the imports" is the
peak less the PSS just before the clock (torch, transformers, datasets and the tokenizer loaded, the same on both
sides to within 2 MiB): the memory the preparation itself needs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def data_root() -> Path:
    return Path(os.environ.get("LMSSL_DATA_DIR", REPO.parent / "shared" / "data"))


def peak_rss(stop: threading.Event, out: list) -> None:
    import psutil

    me = psutil.Process()

    def used(process) -> int:  # PSS: pages shared with forked workers are split between them, not counted twice
        try:
            return process.memory_full_info().pss
        except (psutil.Error, AttributeError):
            return process.memory_info().rss

    while not stop.is_set():
        try:
            total = used(me) + sum(used(c) for c in me.children(recursive=True))
        except psutil.Error:
            total = 0
        out[0] = max(out[0], total)
        time.sleep(0.02)


def child(way: str, lines_dir: str, tok_dir: str, block: int) -> None:
    """One preparation, timed, in this (fresh) process; prints a JSON line."""
    import shutil

    import datasets
    import torch  # noqa: F401  (imported by both ways before the clock, as run_clm.py and lmssl import it to train)
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    own = Path(os.environ["HF_DATASETS_CACHE"]) / "lines"     # a private copy: map caches land beside it
    shutil.copytree(lines_dir, own)
    lines = datasets.load_from_disk(str(own))
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    if way == "lmssl":                                # code is imported before the clock on both sides
        from lmssl.data.text import to_documents
        from lmssl.objectives.causal_lm import CausalLM, Options
    import psutil

    imported = psutil.Process().memory_full_info().pss    # the libraries and the mapped lines, before the clock
    peak, stop = [0], threading.Event()
    sampler = threading.Thread(target=peak_rss, args=(stop, peak), daemon=True)
    sampler.start()
    started = time.perf_counter()
    if way == "lmssl":
        blocks = CausalLM(Options(), tokenizer, block).prepare(to_documents(lines, "text", "blank_lines"))
        tokens = None                                 # counted after the clock stops (reading them costs time)
    else:
        from itertools import chain

        num_proc = None if way == "run_clm" else len(os.sched_getaffinity(0))
        tokenized = lines.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"],
                              num_proc=num_proc)

        def group_texts(examples):                   # run_clm.py's, as written there
            joined = {k: list(chain(*examples[k])) for k in examples.keys()}
            total = (len(joined[list(examples.keys())[0]]) // block) * block
            result = {k: [t[i:i + block] for i in range(0, total, block)] for k, t in joined.items()}
            result["labels"] = result["input_ids"].copy()
            return result

        blocks = tokenized.map(group_texts, batched=True, num_proc=num_proc)
        tokens = len(blocks) * block
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    if tokens is None:
        import pyarrow.compute as pc

        tokens = int(pc.sum(pc.list_value_length(blocks.data.column("input_ids"))).as_py())
    print(json.dumps({"way": way, "seconds": seconds, "peak_mb": peak[0] / 2**20,
                      "above_mb": (peak[0] - imported) / 2**20, "blocks": len(blocks),
                      "tokens": tokens}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", nargs=4, metavar=("WAY", "LINES", "TOK", "BLOCK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.child[2], int(args.child[3]))

    import datasets

    sys.path.insert(0, str(REPO / "bench"))
    from bench_trainer import byte_bpe

    from lmssl.data.text import _load
    from lmssl.recipe import DataConfig

    datasets.disable_progress_bars()
    root = data_root()
    files = [str(root / "wikitext-2" / "train.txt.xz"), str(root / "gutenberg_nltk" / "*.txt.xz")]
    with tempfile.TemporaryDirectory() as tmp:
        lines = _load(DataConfig(path="text", files={"train": files}), "train")
        lines.save_to_disk(f"{tmp}/lines")
        byte_bpe([t for t in lines["text"][:50000] if t.strip()], Path(tmp) / "tok")
        runs: dict[str, list] = {}
        for _ in range(args.repeats):
            for way in ("run_clm", "run_clm_num_proc", "lmssl"):
                env = dict(os.environ, HF_DATASETS_CACHE=tempfile.mkdtemp(dir=tmp))   # nothing cached
                out = subprocess.run([sys.executable, __file__, "--child", way, f"{tmp}/lines", f"{tmp}/tok",
                                      str(args.block)], capture_output=True, text=True, env=env, check=True)
                runs.setdefault(way, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = {way: min(rows, key=lambda r: r["seconds"]) for way, rows in runs.items()}
    cpus = len(os.sched_getaffinity(0))
    print(f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpus} CPUs; command: python "
          f"bench/bench_data_prep.py --block {args.block} --repeats {args.repeats}\n")
    print(f"{len(lines):,} lines (WikiText-2 train + 15 Gutenberg books), byte-level BPE of 8,000, blocks of "
          f"{args.block}; the fastest of {args.repeats} runs each.\n")
    print("| preparation | wall time | peak memory (all processes) | peak above the imports | blocks | tokens | "
          "lmssl speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    names = {"run_clm": "run_clm: map(tokenize) + map(group_texts), 1 process (its default)",
             "run_clm_num_proc": f"run_clm with num_proc={cpus}", "lmssl": "lmssl CausalLM.prepare"}
    for way, row in best.items():
        print(f"| {names[way]} | {row['seconds']:.1f} s | {row['peak_mb']:,.0f} MiB | {row['above_mb']:,.0f} MiB | "
              f"{row['blocks']:,} | "
              f"{row['tokens']:,} | {row['seconds'] / best['lmssl']['seconds']:.2f}x |")
    ours, theirs = best["lmssl"], best["run_clm"]
    print(f"\nAgainst run_clm's default: {theirs['seconds'] / ours['seconds']:.2f}x the speed; peak "
          f"{theirs['peak_mb'] - ours['peak_mb']:,.0f} MiB lower in all, and {ours['above_mb']:,.0f} against "
          f"{theirs['above_mb']:,.0f} MiB above the imports ({ours['above_mb'] / theirs['above_mb']:.2f}x).")


if __name__ == "__main__":
    main()
