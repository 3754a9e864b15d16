"""One pass over a text corpus for the tokenizer stage: batches of non-blank texts (bounded by
`max_bytes`, sampled over the whole corpus or taken from its head; rows over `data.max_chars`
skipped and counted) and a held-out sample for the report card.

Local plain-text files (`path: text`, .txt / .txt.xz / .txt.gz) are read directly in blocks, cut
into lines exactly as `datasets`' text loader cuts them: a tokenizer needs one sequential pass,
so building an Arrow copy of the corpus first would only cost time and disk. Everything else
(JSON, CSV, parquet, hub datasets, folders, loader options) goes through `datasets`, streamed
or not."""

from __future__ import annotations

import collections
import glob
import gzip
import lzma
import os
import random
import stat
import zlib
from pathlib import Path
from typing import Any, Iterator, Optional

from lmssl.errors import LmsslError
from lmssl.recipe import DataConfig

HELDOUT_BYTES = 1_000_000  # held-out text for the report card: 1 MB gives stable rates in seconds
BATCH = 10_000  # texts per batch handed to the trainer
READ_BLOCK = 8 << 20  # characters read at a time from local text files
SPREAD_SLACK = 1.1  # spread sampling keeps 10% more rows than max_bytes needs; the byte cap trims the rest


def local_files(data: DataConfig) -> list[Path]:
    """The local paths a DataConfig's files name, for the checks of `unusable`: every regular file a
    pattern matches, and what a pattern names that is no regular file (a folder, a pipe, a device) where it
    names nothing else. Hub ids and URLs give none."""
    files = data.files
    patterns = [files] if isinstance(files, str) else list(files or []) if not isinstance(files, dict) else [
        p for v in files.values() for p in ([v] if isinstance(v, str) else v)]
    found: list[Path] = []
    for pattern in patterns:
        if "://" in pattern:
            continue
        matches = [Path(p) for p in sorted(glob.glob(os.path.expanduser(pattern)))]
        regular = [p for p in matches if p.is_file()]
        found += regular or matches  # a glob over a folder's files and subfolders reads only the files
    return found


def _not_a_file(path: Path) -> Optional[str]:
    """What a path is when it is not a regular file (datasets says only "Unable to find" for these)."""
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return (f"is a directory, not a file; name the files in it (e.g. {str(path / '*.txt')!r}), or give the "
                "folder as data.path")
    if stat.S_ISFIFO(mode):
        return ("is a named pipe (FIFO), not a regular file; the tokenizer stage opens its files more than once: "
                "save the text to a file")
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a regular file; point data.files at text files"
    return "is not a regular file (a socket?); point data.files at text files"


def _opener(name: str):
    """open, or lzma.open / gzip.open for .xz / .gz files."""
    return lzma.open if name.endswith(".xz") else gzip.open if name.endswith(".gz") else open


def _compression(name: str) -> Optional[str]:
    return "xz" if name.endswith(".xz") else "gzip" if name.endswith(".gz") else None


# what lzma and gzip raise on data that is not (or no longer) valid xz / gzip
BAD_COMPRESSED = (lzma.LZMAError, gzip.BadGzipFile, EOFError, zlib.error)


def unusable(path: Path) -> Optional[str]:
    """Why a local data file cannot be a text corpus (no regular file, not valid xz/gzip, empty, binary:
    NUL bytes in its first 8 KB, decompressed), as the rest of a sentence naming it; None when it can."""
    why = _not_a_file(path)
    if why or path.suffix in (".parquet", ".arrow"):
        return why or ("is empty; the tokenizer needs text to learn from" if not path.stat().st_size else None)
    try:
        with _opener(str(path))(path, "rb") as handle:
            head = handle.read(8192)
    except BAD_COMPRESSED as err:
        return (f"is not a valid {_compression(str(path))} file ({err}); recompress it, or drop the "
                f"{path.suffix} suffix if it is plain text")
    except OSError as err:
        return f"cannot be read: {err.strerror or err}"
    if not head:
        return "is empty; the tokenizer needs text to learn from"
    if b"\x00" in head:
        return ("looks binary (NUL bytes near its start); the tokenizer stage trains on text files (.txt, .json, "
                ".csv, optionally .xz/.gz)")
    return None


class Batches:
    """Batches of at most BATCH non-blank texts, an iterator, each row kept with probability `keep` (a
    seeded spread sample) when given, until max_bytes are handed out. It tells what it left out on the way:
    rows skipped as bad (`skipped`: {reason: rows}, as every stage's data/skipped_* metrics: too_long over
    max_chars, missing, not_text) and whether max_bytes left any text out (`capped`; `sampled` says the
    blocks are already a subset drawn for max_bytes)."""

    def __init__(self, blocks: Iterator[list[Any]], max_bytes: Optional[int], max_chars: int,
                 keep: Optional[float] = None, seed: int = 0, sampled: bool = False):
        self.skipped: collections.Counter = collections.Counter()
        self.capped = sampled
        self._batches = self._generate(blocks, max_bytes, max_chars, keep, random.Random(seed).random)

    def __iter__(self) -> "Batches":
        return self

    def __next__(self) -> list[str]:
        return next(self._batches)

    def _usable(self, row: Any, max_chars: int) -> bool:
        if isinstance(row, str):
            if len(row) <= max_chars:
                return bool(row) and not row.isspace()
            self.skipped["too_long"] += 1
        else:
            self.skipped["missing" if row is None else "not_text"] += 1
        return False

    def _generate(self, blocks: Iterator[list[Any]], max_bytes: Optional[int], max_chars: int,
                  keep: Optional[float], draw) -> Iterator[list[str]]:
        seen, full = 0, False
        for block in blocks:
            texts = []
            for row in block:
                if keep is not None and draw() >= keep:
                    self.capped = self.capped or (isinstance(row, str) and bool(row.strip()))
                    continue
                if not self._usable(row, max_chars):
                    continue
                if max_bytes is not None:
                    seen += len(row.encode("utf-8"))
                    if seen > max_bytes:
                        self.capped = full = True
                        break
                texts.append(row)
            for start in range(0, len(texts), BATCH):
                yield texts[start:start + BATCH]
            if full:
                return


def _held_out_text(text: Any, max_chars: int) -> bool:
    """A held-out row the report card can use (bad rows are left out there too, uncounted)."""
    return isinstance(text, str) and bool(text) and len(text) <= max_chars


def _hold_out(blocks: Iterator[list[Any]], every: int, heldout: list[str], limit: Optional[int],
              max_chars: int) -> Iterator[list[Any]]:
    """Rows minus every `every`-th one (kept in `heldout` up to HELDOUT_BYTES), at most `limit` rows."""
    index, held = 0, 0
    for block in blocks:
        if limit is not None:
            block = block[:max(0, limit - index)]
            if not block:
                return
        start, index = index, index + len(block)
        if every:
            phase = (every - 1 - start) % every  # rows whose corpus index is every-1 modulo every
            for text in block[phase::every]:
                if _held_out_text(text, max_chars) and held < HELDOUT_BYTES:
                    heldout.append(text)
                    held += len(text)
            block = [t for i, t in enumerate(block) if i % every != phase]
        yield block


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
        except BAD_COMPRESSED as err:
            raise LmsslError(f"could not read {name}: it is not a valid {_compression(name)} file ({err}); "
                             "is it truncated? recompress it") from None


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


def corpus(cfg, seed: int, where: str) -> tuple[Batches, list[str]]:
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
        rest = _hold_out(blocks, every, heldout, data.max_samples, data.max_chars)
        return Batches(rest, cfg.max_bytes, data.max_chars, keep, seed), heldout
    try:
        train, evaluation = load_splits(data, seed, where)
    except UnicodeDecodeError as err:
        raise LmsslError(f"{where}.data: the corpus is not valid {data.encoding or 'UTF-8'} text ({err}); "
                         "set data.encoding (e.g. latin-1) or check the files") from None
    except DatasetGenerationError as err:
        cause = err.__cause__ or err
        if isinstance(cause, BAD_COMPRESSED):
            raise LmsslError(f"{where}.data: could not read the corpus {data.files or data.path!r}: a compressed "
                             f"file is not valid xz/gzip ({cause}); is it truncated? recompress it") from None
        raise LmsslError(f"{where}.data: could not read the corpus {data.files or data.path!r}: {cause} "
                         f"(is a file empty, or not in the {data.path} format?)") from None
    whole = len(train)
    if cfg.max_bytes is not None and cfg.sample == "spread":
        train = _spread(train, cfg.max_bytes, seed)
    held, size = [], 0
    for block in _column(evaluation, data.column) if evaluation is not None else []:
        for text in block:
            if _held_out_text(text, data.max_chars) and size < HELDOUT_BYTES:
                held.append(text)
                size += len(text)
    return Batches(_column(train, data.column), cfg.max_bytes, data.max_chars, sampled=len(train) < whole), held
