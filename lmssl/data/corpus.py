"""One pass over a text corpus for the tokenizer stage: batches of non-blank texts (bounded by
`max_bytes`, sampled over the whole corpus or taken from its head) and a held-out sample for the
report card.

Local plain-text files (`path: text`, .txt / .txt.xz / .txt.gz) are read directly in blocks, cut
into lines exactly as `datasets`' text loader cuts them: a tokenizer needs one sequential pass,
so building an Arrow copy of the corpus first would only cost time and disk. Everything else
(JSON, CSV, parquet, hub datasets, folders, loader options) goes through `datasets`, streamed
or not."""

from __future__ import annotations

import glob
import gzip
import lzma
import os
import random
from pathlib import Path
from typing import Any, Iterator, Optional

from lmssl.errors import LmsslError
from lmssl.recipe import DataConfig

HELDOUT_BYTES = 1_000_000  # held-out text for the report card: 1 MB gives stable rates in seconds
BATCH = 10_000  # texts per batch handed to the trainer
READ_BLOCK = 8 << 20  # characters read at a time from local text files
SPREAD_SLACK = 1.1  # spread sampling keeps 10% more rows than max_bytes needs; the byte cap trims the rest


def local_files(data: DataConfig) -> list[Path]:
    """The local files a DataConfig names (for the binary sniff); hub ids and folders give none."""
    files = data.files
    patterns = [files] if isinstance(files, str) else list(files or []) if not isinstance(files, dict) else [
        p for v in files.values() for p in ([v] if isinstance(v, str) else v)]
    return [Path(p) for pattern in patterns if "://" not in pattern
            for p in sorted(glob.glob(os.path.expanduser(pattern))) if Path(p).is_file()]


def _opener(name: str):
    """open, or lzma.open / gzip.open for .xz / .gz files."""
    return lzma.open if name.endswith(".xz") else gzip.open if name.endswith(".gz") else open


def _open_bytes(path: Path):
    return _opener(str(path))(path, "rb")


def looks_binary(path: Path) -> bool:
    """True when the first 8 KB (decompressed for .xz/.gz) hold a NUL byte, which text never does."""
    if path.suffix in (".parquet", ".arrow"):
        return False
    try:
        with _open_bytes(path) as handle:
            return b"\x00" in handle.read(8192)
    except (OSError, lzma.LZMAError, EOFError):
        return True


def is_empty(path: Path) -> bool:
    """True for a file with no content (after decompression for .xz/.gz)."""
    try:
        with _open_bytes(path) as handle:
            return not handle.read(1)
    except (OSError, lzma.LZMAError, EOFError):
        return False  # unreadable files are reported by looks_binary


def _batches(blocks: Iterator[list[Any]], max_bytes: Optional[int]) -> Iterator[list[str]]:
    """Non-blank texts from lists of rows, in batches of BATCH, stopping once max_bytes are handed out."""
    seen = 0
    for block in blocks:
        texts = [t for t in block if isinstance(t, str) and t and not t.isspace()]
        if max_bytes is not None:
            kept = []
            for text in texts:
                size = len(text.encode("utf-8"))
                if seen + size > max_bytes:
                    if kept:
                        yield kept
                    return
                seen += size
                kept.append(text)
            texts = kept
        for start in range(0, len(texts), BATCH):
            yield texts[start:start + BATCH]


def _hold_out(blocks: Iterator[list[Any]], every: int, heldout: list[str], limit: Optional[int],
              keep: Optional[float], seed: int) -> Iterator[list[Any]]:
    """Rows minus every `every`-th one (kept in `heldout` up to HELDOUT_BYTES), at most `limit` rows,
    each row kept with probability `keep` (a seeded spread sample) when given."""
    index, held = 0, 0
    draw = random.Random(seed).random
    for block in blocks:
        if limit is not None:
            block = block[:max(0, limit - index)]
            if not block:
                return
        start, index = index, index + len(block)
        if every:
            phase = (every - 1 - start) % every  # rows whose corpus index is every-1 modulo every
            for text in block[phase::every]:
                if text and held < HELDOUT_BYTES:
                    heldout.append(text)
                    held += len(text)
            block = [t for i, t in enumerate(block) if i % every != phase]
        yield [t for t in block if draw() < keep] if keep is not None else block


def plain_text_files(cfg: DataConfig) -> Optional[list[str]]:
    """The local files of a plain `text` source that read_lines reads as `datasets` would, or None."""
    if cfg.path != "text" or cfg.options or cfg.data_dir or cfg.config or cfg.eval_split or cfg.split != "train":
        return None
    patterns = [cfg.files] if isinstance(cfg.files, str) else cfg.files
    if not isinstance(patterns, list) or not patterns:
        return None
    files: list[str] = []
    for pattern in patterns:
        found = sorted(glob.glob(os.path.expanduser(pattern)))
        if "://" in pattern or not found or not all(os.path.isfile(f) for f in found):
            return None
        files += found
    return files if all(f.endswith((".txt", ".txt.xz", ".txt.gz")) for f in files) else None


def read_lines(files: list[str], encoding: Optional[str]) -> Iterator[list[str]]:
    """Lists of lines, cut as `datasets`' text loader cuts them (universal newlines, then "\\n";
    invalid bytes replaced), read in blocks: one pass, memory bounded by the block size."""
    for name in files:
        try:
            with _opener(name)(name, "rt", encoding=encoding or "utf-8", errors="replace") as handle:
                while True:
                    block = handle.read(READ_BLOCK)
                    if not block:
                        break
                    block += handle.readline()  # finish the last line
                    lines = block.split("\n")
                    if lines[-1] == "":
                        lines.pop()
                    yield lines
        except (lzma.LZMAError, EOFError, gzip.BadGzipFile) as err:
            raise LmsslError(f"could not read {name}: {err}") from None


def _stream_blocks(stream, column: str, where: str) -> Iterator[list[Any]]:
    block: list[Any] = []
    for row in stream:
        if column not in row:
            raise LmsslError(f"{where}.data.column: the data has no column {column!r}; columns: {', '.join(row)}")
        block.append(row[column])
        if len(block) == BATCH:
            yield block
            block = []
    if block:
        yield block


def _column(dataset, column: str) -> Iterator[list[Any]]:
    for start in range(0, len(dataset), BATCH):
        yield dataset[start:start + BATCH][column]


def _spread(dataset, max_bytes: int, seed: int):
    """A seeded random subset of rows sized to about max_bytes, in corpus order."""
    total = max(1, dataset.data.nbytes)
    if total <= max_bytes:
        return dataset
    keep = min(len(dataset), int(len(dataset) * max_bytes / total * SPREAD_SLACK) + 1)
    return dataset.select(sorted(random.Random(seed).sample(range(len(dataset)), keep)))


def corpus(cfg, seed: int, where: str) -> tuple[Iterator[list[str]], list[str]]:
    """(training batches, held-out texts) for a tokenizer stage config (data, max_bytes, sample).

    One-pass sources (streams, local text files) hold out every 50th row (for eval_fraction 0.02)
    as they are read; datasets loaded whole hold out a seeded random eval_fraction."""
    from datasets.exceptions import DatasetGenerationError

    from lmssl.data.text import _load, load_splits

    data = cfg.data
    every = max(2, round(1 / data.eval_fraction)) if data.eval_fraction > 0 else 0
    files = None if data.streaming else plain_text_files(data)
    keep = None
    if files is not None and cfg.max_bytes is not None and cfg.sample == "spread":
        if any(f.endswith((".xz", ".gz")) for f in files):
            files = None  # a spread sample needs the corpus size up front: let datasets measure it
        else:
            total = sum(os.path.getsize(f) for f in files) * (1 - (1 / every if every else 0))
            keep = min(1.0, cfg.max_bytes / max(1.0, total) * SPREAD_SLACK) if total > cfg.max_bytes else None
    if data.streaming or files is not None:
        heldout: list[str] = []
        blocks = read_lines(files, data.encoding) if files is not None else _stream_blocks(
            _load(data, data.split), data.column, where)
        return _batches(_hold_out(blocks, every, heldout, data.max_samples, keep, seed), cfg.max_bytes), heldout
    try:
        train, evaluation = load_splits(data, seed, where)
    except UnicodeDecodeError as err:
        raise LmsslError(f"{where}.data: the corpus is not valid {data.encoding or 'UTF-8'} text ({err}); "
                         "set data.encoding (e.g. latin-1) or check the files") from None
    except DatasetGenerationError as err:
        cause = err.__cause__ or err
        raise LmsslError(f"{where}.data: could not read the corpus {data.files or data.path!r}: {cause} "
                         f"(is a file empty, or not in the {data.path} format?)") from None
    if cfg.max_bytes is not None and cfg.sample == "spread":
        train = _spread(train, cfg.max_bytes, seed)
    held, size = [], 0
    for block in _column(evaluation, data.column) if evaluation is not None else []:
        for text in block:
            if text and size < HELDOUT_BYTES:
                held.append(text)
                size += len(text)
    return _batches(_column(train, data.column), cfg.max_bytes), held
