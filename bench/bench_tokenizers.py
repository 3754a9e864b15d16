"""Tokenizer training and encoding on CPU: lmssl's tokenizer stage (its native trainers, and the same
stage with `engine: tokenizers`, i.e. the tokenizers library's trainers) next to the sentencepiece
library training the equivalent model.

One command runs everything on the same ~25 MB of text (WikiText-2 + 15 Gutenberg books, decompressed
to UTF-8 in a temporary folder). Each trainer and each encoder runs in its own subprocess, so peak
memory (ru_maxrss) belongs to that trainer alone; every training run is repeated (--repeats) and the
fastest kept; the table is printed as Markdown.

    nice python bench/bench_tokenizers.py [--vocab 8000] [--threads 2] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENCODE_BYTES = 4_000_000  # text encoded for the throughput figures

# (label, trainer, lmssl spec or sentencepiece model type, sentencepiece options making it the equivalent model);
# trainer "lmssl" is the stage with its native trainers, "tokenizers" the same stage with engine: tokenizers.
TRAINERS = [
    ("BPE, byte fallback", "lmssl", "llama-bpe", {}),
    ("BPE, byte fallback", "tokenizers", "llama-bpe", {}),
    ("BPE, byte fallback", "sentencepiece", "bpe", {"byte_fallback": True, "normalization_rule_name": "identity",
                                                     "add_dummy_prefix": False, "character_coverage": 0.9995}),
    ("byte-level BPE", "lmssl", "gpt2-bytebpe", {}),
    ("byte-level BPE", "tokenizers", "gpt2-bytebpe", {}),
    ("WordPiece", "lmssl", "bert-wordpiece", {}),
    ("WordPiece", "tokenizers", "bert-wordpiece", {}),
    ("Unigram", "lmssl", "unigram", {}),
    ("Unigram", "tokenizers", "unigram", {}),
    ("Unigram", "sentencepiece", "unigram", {"normalization_rule_name": "nfkc", "add_dummy_prefix": True,
                                             "character_coverage": 1.0}),
]


def rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# --------------------------------------------------------------------------- workers (one per subprocess)

def train_lmssl(job: dict) -> dict:
    # Libraries are imported before the clock starts, as `import sentencepiece` is for the baseline
    # (PreTrainedTokenizerFast pulls in torch: over a second that no trainer spends training).
    import datasets  # noqa: F401
    import tokenizers.models  # noqa: F401
    import tokenizers.trainers  # noqa: F401
    from transformers import PreTrainedTokenizerFast  # noqa: F401

    from lmssl import tokenizer_training
    from lmssl.recipe import DataConfig
    from lmssl.stages import tokenizer as stage

    tokenizer_training.native_trainers()  # imports the compiled modules

    base = rss_now()
    cfg = stage.Config(name="tok", kind="tokenizer", spec=job["spec"], vocab_size=job["vocab"],
                       max_bytes=job.get("max_bytes"), engine=job.get("engine", "auto"),
                       data=DataConfig(path="text", files=job["files"], eval_fraction=0.0,
                                       streaming=job.get("streaming", False)))
    start = time.perf_counter()
    batches, _ = stage.corpus(cfg, seed=0, where="bench")
    loaded = time.perf_counter()
    tokenizer, fed = stage.build(stage.load_spec(cfg.spec), cfg, batches)
    seconds = time.perf_counter() - start
    tokenizer.save_pretrained(job["out"])
    return {"seconds": seconds, "load_seconds": loaded - start, "peak": peak_rss(), "base": base,
            "fed_bytes": fed.bytes, "vocab": len(tokenizer)}


def train_sentencepiece(job: dict) -> dict:
    import sentencepiece as spm

    base = rss_now()
    start = time.perf_counter()
    spm.SentencePieceTrainer.train(
        input=",".join(job["files"]), model_prefix=str(Path(job["out"]) / "spm"), model_type=job["spec"],
        vocab_size=job["vocab"], num_threads=job["threads"], input_sentence_size=0, remove_extra_whitespaces=False,
        minloglevel=2, **job["options"])
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "load_seconds": 0.0, "peak": peak_rss(), "base": base,
            "fed_bytes": sum(Path(f).stat().st_size for f in job["files"]), "vocab": job["vocab"]}


def encode(job: dict) -> dict:
    lines = [line for line in Path(job["text"]).read_text(encoding="utf-8").splitlines() if line.strip()]
    size = sum(len(line.encode("utf-8")) for line in lines)
    if job["trainer"] != "sentencepiece":
        from transformers import AutoTokenizer

        backend = AutoTokenizer.from_pretrained(job["out"]).backend_tokenizer
        # ids as Python lists, like sentencepiece's encode (the AutoTokenizer call adds dict/list overhead)
        run = lambda: [e.ids for e in backend.encode_batch_fast(lines, add_special_tokens=False)]  # noqa: E731
    else:
        import sentencepiece as spm

        processor = spm.SentencePieceProcessor(model_file=str(Path(job["out"]) / "spm.model"))
        run = lambda: processor.encode(lines, num_threads=job["threads"])  # noqa: E731
    tokens = sum(len(ids) for ids in run())  # warm up, and count tokens for the compression figure
    start = time.perf_counter()
    run()
    return {"mb_per_s": size / 1e6 / (time.perf_counter() - start), "bytes_per_token": size / max(1, tokens)}


WORKERS = {"lmssl": train_lmssl, "tokenizers": train_lmssl, "sentencepiece": train_sentencepiece, "encode": encode}


def subprocess_job(job: dict, threads: int) -> dict:
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="true",
               OMP_NUM_THREADS=str(threads), HF_DATASETS_CACHE=str(Path(job["out"]) / "hf-cache"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"worker failed: {job}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the run

def prepare(data: Path, folder: Path) -> list[str]:
    """WikiText-2 (train, valid, test) and the Gutenberg books as UTF-8 text files."""
    sources = [(p, "utf-8") for p in sorted((data / "wikitext-2").glob("*.txt.xz"))]
    sources += [(p, "latin-1") for p in sorted((data / "gutenberg_nltk").glob("*.txt.xz"))]
    files = []
    for path, encoding in sources:
        target = folder / f"{path.parent.name}-{path.name.removesuffix('.xz')}"
        with lzma.open(path, "rt", encoding=encoding) as src:
            target.write_text(src.read(), encoding="utf-8")
        files.append(str(target))
    return files


def encode_sample(files: list[str], target: Path) -> str:
    text, size = [], 0
    for name in files:
        for line in Path(name).read_text(encoding="utf-8").splitlines(keepends=True):
            text.append(line)
            size += len(line.encode("utf-8"))
            if size >= ENCODE_BYTES:
                target.write_text("".join(text), encoding="utf-8")
                return str(target)
    target.write_text("".join(text), encoding="utf-8")
    return str(target)


def bench(data: Path, vocab: int, threads: int, repeats: int) -> str:
    rows, bounded = [], []
    with tempfile.TemporaryDirectory(prefix="lmssl-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "corpus").mkdir()
        files = prepare(data, tmp / "corpus")
        corpus_bytes = sum(Path(f).stat().st_size for f in files)
        sample = encode_sample(files, tmp / "encode.txt")
        for index, (label, trainer, spec, options) in enumerate(TRAINERS):
            out = tmp / f"out-{index}"
            out.mkdir()
            job = {"trainer": trainer, "spec": spec, "options": options, "files": files, "vocab": vocab,
                   "threads": threads, "out": str(out), "engine": "tokenizers" if trainer == "tokenizers" else "lmssl"}
            runs = [subprocess_job(dict(job, kind=trainer), threads) for _ in range(repeats)]
            result = min(runs, key=lambda r: r["seconds"])
            encoded = [subprocess_job(dict(job, kind="encode", text=sample, threads=n), n) for n in (1, 2)]
            result["bytes_per_token"] = encoded[0]["bytes_per_token"]
            speeds = [e["mb_per_s"] for e in encoded]
            rows.append((label, trainer, spec, result, speeds))
            print(f"{label} / {trainer}: {result} {speeds}", file=sys.stderr, flush=True)

        bound = corpus_bytes // 4  # the corpus is 4x larger than the bound
        quarter = tmp / "corpus-quarter.txt"
        quarter.write_bytes(b"".join(Path(f).read_bytes() for f in files)[:bound].rsplit(b"\n", 1)[0] + b"\n")
        runs = (("a quarter of the corpus, no bound", [str(quarter)], None, False),
                ("whole corpus, no bound", files, None, False),
                (f"whole corpus, max_bytes={bound / 1e6:.1f} MB (spread sample)", files, bound, False),
                (f"whole corpus streamed, max_bytes={bound / 1e6:.1f} MB", files, bound, True))
        for name, job_files, max_bytes, streaming in runs:
            out = tmp / f"bound-{len(bounded)}"
            out.mkdir()
            job = {"trainer": "lmssl", "spec": "llama-bpe", "files": job_files, "vocab": vocab, "out": str(out),
                   "max_bytes": max_bytes, "streaming": streaming, "kind": "lmssl"}
            bounded.append((name, subprocess_job(job, threads)))
            print(f"bounded {name}: {bounded[-1][1]}", file=sys.stderr, flush=True)
    return table(rows, bounded, corpus_bytes, vocab, threads)


def table(rows, bounded, corpus_bytes: int, vocab: int, threads: int) -> str:
    mb = lambda n: f"{n / 2**20:,.0f} MiB"  # noqa: E731
    baseline = {label: result["seconds"] for label, trainer, _, result, _ in rows if trainer == "sentencepiece"}
    lines = [f"Corpus: {corpus_bytes / 1e6:.1f} MB (WikiText-2 train/valid/test + 15 Gutenberg books), "
             f"vocab_size {vocab}, {threads} training threads. Train time is the whole job from the files to a "
             "trained tokenizer (reading included; lmssl reads local text files in one pass, sentencepiece reads "
             "them itself), the fastest of the repeats. Peak RSS is the trainer's whole process (after-import "
             "baseline in brackets). Encoding: ids of ~4 MB of the corpus as Python lists; bytes per token on "
             "that text says how much the vocabulary compresses it (higher is better).", "",
             "| model | trainer | spec / type | train time | speed vs sentencepiece | peak RSS (baseline) "
             "| bytes/token | encode MB/s, 1 thread | 2 threads |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for label, trainer, spec, result, (one, two) in rows:
        ratio = f"{baseline[label] / result['seconds']:.2f}x" if label in baseline else "n/a"
        name = {"lmssl": "lmssl (native)", "tokenizers": "lmssl, engine: tokenizers"}.get(trainer, trainer)
        lines.append(f"| {label} | {name} | {spec} | {result['seconds']:.2f} s | {ratio} | {mb(result['peak'])} "
                     f"({mb(result['base'])}) | {result['bytes_per_token']:.2f} | {one:.2f} | {two:.2f} |")
    lines += ["", "Bounded memory (llama-bpe, lmssl; the corpus is 4x the bound):", "",
              "| run | bytes fed to the trainer | train time | peak RSS | over baseline |", "|---|---:|---:|---:|---:|"]
    for name, result in bounded:
        lines.append(f"| {name} | {result['fed_bytes'] / 1e6:.1f} MB | {result['seconds']:.1f} s | {mb(result['peak'])} "
                     f"| {mb(result['peak'] - result['base'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, default=8000, help="vocabulary size for every trainer (equal sizes)")
    parser.add_argument("--threads", type=int, default=2, help="training threads for both libraries")
    parser.add_argument("--repeats", type=int, default=3, help="training runs per trainer; the fastest is reported")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="the shared data folder")
    args = parser.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(WORKERS[job["kind"]](job)))
        return
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = bench(Path(args.data), args.vocab, args.threads, args.repeats)
    import sentencepiece
    import tokenizers

    print(f"Measured {started} on {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
          f"(tokenizers {tokenizers.__version__}, sentencepiece {sentencepiece.__version__}); "
          f"command: python bench/bench_tokenizers.py --vocab {args.vocab} --threads {args.threads} "
          f"--repeats {args.repeats}\n")
    print(text)


if __name__ == "__main__":
    main()
