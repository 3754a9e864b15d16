"""Text sources into `datasets` (train and eval splits, streamed ones kept on disk), documents (rows, or
lines between blank lines) and sentences split by punctuation rules, without downloads."""

from __future__ import annotations

import os
import re
from typing import Optional

from lmssl.errors import LmsslError
from lmssl.recipe import DataConfig

DOCUMENT_MODES = ("rows", "blank_lines")
# Lines grouped per map batch when documents are runs of lines: a document that straddles two
# batches is cut in two there (about one document in 10,000 lines), never lost.
LINES_PER_BATCH = 10_000
# Streamed corpora are tokenized in this many rows at a time into an on-disk Arrow table.
STREAM_CHUNK = 10_000


def _revision(cfg: DataConfig) -> dict:
    """load_dataset's revision argument, for a hub dataset pinned to a branch, tag or commit."""
    return {"revision": cfg.revision} if cfg.revision else {}


def _split_files(cfg: DataConfig):
    """data.files as {split: patterns} (a bare pattern or list is the train split's), or None."""
    return {"train": cfg.files} if isinstance(cfg.files, (str, list)) else cfg.files


def _load(cfg: DataConfig, split: str):
    import datasets

    kwargs = dict(cfg.options)
    if cfg.path.startswith("builtin:"):
        from lmssl.data.builtin import builtin_file

        return datasets.load_dataset("json", data_files={"train": str(builtin_file(cfg.path.split(":", 1)[1]))},
                                     split="train")
    files = _split_files(cfg)
    if cfg.path == "text" and not cfg.streaming and files and split in files and not cfg.options:
        local = _local_files(files[split])
        if local is not None:
            return _read_text_files(local, cfg.encoding or "utf-8")
    if cfg.encoding:
        kwargs["encoding"] = cfg.encoding
    if cfg.path in ("text", "json", "csv"):  # invalid bytes become U+FFFD; those rows are then skipped and counted
        kwargs.setdefault("encoding_errors", "replace")
    try:
        return datasets.load_dataset(cfg.path, name=cfg.config, data_files=files, data_dir=cfg.data_dir,
                                     split=split, streaming=cfg.streaming, **_revision(cfg), **kwargs)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetGenerationError) as err:
        cause = err.__cause__ or err  # generation errors wrap the parser's own error
        raise LmsslError(f"could not load {cfg.path!r} split {split!r} from {cfg.files or cfg.data_dir or cfg.path}: "
                         f"{type(cause).__name__}: {' '.join(str(cause).split())[:300]}") from None


def _local_files(patterns) -> Optional[list[str]]:
    """The files a split's local patterns name, in the order given (each glob sorted); None when one is remote."""
    import glob
    import os

    names = []
    for pattern in [patterns] if isinstance(patterns, str) else list(patterns):
        if "://" in pattern:
            return None
        names += sorted(glob.glob(os.path.expanduser(pattern)))
    return names or None


def _text_lines(names: list[str], encoding: str, stamps: list[str]):
    """Lines of local text files (.xz/.gz/.bz2 decompressed here), undecodable bytes as U+FFFD. `stamps`
    (name, size, mtime) only keys the datasets cache, so an edited file is read again."""
    import bz2
    import gzip
    import lzma

    openers = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}
    for name in names:
        opener = openers.get(os.path.splitext(name)[1], open)
        with opener(name, "rt", encoding=encoding, errors="replace") as handle:
            for line in handle:
                yield {"text": line.rstrip("\r\n")}


def _read_text_files(names: list[str], encoding: str):
    """Local text files as a Dataset of lines, like load_dataset("text"), but with encoding errors replaced in
    compressed files too (datasets 5 drops `encoding_errors` for them and raises UnicodeDecodeError)."""
    import datasets

    stamps = [f"{n}:{os.stat(n).st_size}:{os.stat(n).st_mtime_ns}" for n in names]
    features = datasets.Features({"text": datasets.Value("string")})
    return datasets.Dataset.from_generator(_text_lines, features=features, writer_batch_size=STREAM_CHUNK,
                                           gen_kwargs={"names": names, "encoding": encoding, "stamps": stamps})


def stream_split(cfg: DataConfig, split: str):
    """One split as a `datasets.IterableDataset` that reads as it goes: local text files through _text_lines
    (one shard per file), a builtin set as one shard, anything else through load_dataset(streaming=True)."""
    import datasets

    files = _split_files(cfg)
    if cfg.path == "text" and files and split in files and not cfg.options:
        local = _local_files(files[split])
        if local is not None:
            features = datasets.Features({"text": datasets.Value("string")})
            return datasets.IterableDataset.from_generator(
                _text_lines, features=features,
                gen_kwargs={"names": local, "encoding": cfg.encoding or "utf-8", "stamps": [""] * len(local)})
    if cfg.path.startswith("builtin:"):
        return _load(cfg, split).to_iterable_dataset(num_shards=1)
    return _load(cfg, split)


def _materialize(stream, column: str, limit: Optional[int], where: str):
    """A streamed split as an on-disk (memory-mapped) Dataset of its text column: the corpus is
    read chunk by chunk and never held in memory; `limit` rows at most."""
    import datasets

    def rows():
        for i, row in enumerate(stream):
            if limit is not None and i >= limit:
                return
            if column not in row:
                raise LmsslError(f"{where}.data.column: the streamed data has no column {column!r}; columns: {', '.join(row)}")
            yield {column: row[column]}

    features = datasets.Features({column: datasets.Value("string")})
    try:
        return datasets.Dataset.from_generator(rows, features=features, writer_batch_size=STREAM_CHUNK)
    except datasets.exceptions.DatasetGenerationError as err:
        if isinstance(err.__cause__, LmsslError):
            raise err.__cause__ from None
        raise


def load_splits(cfg: DataConfig, seed: int, where: str, hold_out: bool = True):
    """(train, eval) datasets for a DataConfig; eval is held out of train when no eval_split is named
    (unless hold_out=False: a caller that groups rows into documents holds out whole documents itself)."""
    data = _load(cfg, cfg.split)
    columns = data.column_names
    if columns is not None and cfg.column not in columns:
        raise LmsslError(f"{where}.data.column: the data has no column {cfg.column!r}; "
                         f"columns: {', '.join(columns)}")
    eval_data: Optional[object] = None
    if cfg.eval_split:
        eval_data = _load(cfg, cfg.eval_split)
    if cfg.streaming:
        data = _materialize(data, cfg.column, cfg.max_samples, where)
        eval_data = _materialize(eval_data, cfg.column, None, where) if eval_data is not None else None
    elif cfg.max_samples is not None:
        data = data.select(range(min(cfg.max_samples, len(data))))
    if hold_out and eval_data is None:
        data, eval_data = hold_out_rows(data, cfg.eval_fraction, seed)
    if len(data) == 0:
        raise LmsslError(f"{where}.data: the training split is empty")
    return data, eval_data


def hold_out_rows(data, fraction: float, seed: int):
    """(kept rows, eval_fraction of the rows drawn with the seed), or (data, None) when there is no
    fraction or fewer than 20 rows to draw from."""
    if fraction <= 0 or len(data) < 20:
        return data, None
    parts = data.train_test_split(test_size=fraction, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


# --------------------------------------------------------------------------- documents and sentences

def group_lines(lines: list[Optional[str]]) -> list[str]:
    """Runs of non-blank lines joined with newlines: one document per run (blank = whitespace only)."""
    documents, current = [], []
    for line in lines:
        if line is None or not line.strip():
            if current:
                documents.append("\n".join(current))
                current = []
        else:
            current.append(line.strip())
    if current:
        documents.append("\n".join(current))
    return documents


def to_documents(dataset, column: str, mode: str):
    """A Dataset with one `text` row per document. `rows`: each non-empty row is a document;
    `blank_lines`: rows are lines and blank rows end a document (plain text files, WikiText)."""
    if mode not in DOCUMENT_MODES:
        raise LmsslError(f"documents: unknown mode {mode!r}; known: {', '.join(DOCUMENT_MODES)}")
    if mode == "rows":
        def keep(batch):
            return {"text": [t.strip() for t in batch[column] if t and t.strip()]}

        return dataset.map(keep, batched=True, remove_columns=dataset.column_names, desc="documents")

    def group(batch):
        return {"text": group_lines(batch[column])}

    return dataset.map(group, batched=True, batch_size=LINES_PER_BATCH, remove_columns=dataset.column_names,
                       desc="documents")


# Abbreviations after which a period does not end a sentence (lowercased, without the period).
ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e cf fig no vol al approx inc ltd co corp gen col lt sgt capt "
    "rev jan feb mar apr jun jul aug sep sept oct nov dec u.s u.k".split()
)
_BOUNDARY = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+(?=[\"'“‘(\[]?[A-Z0-9])|\n+")


def split_sentences(text: str) -> list[str]:
    """Sentences of `text` by punctuation rules (no model, no download): a break after . ! ?
    (and closing quotes) before a capital or digit, and at newlines; abbreviations and initials
    ("Dr.", "J.") do not end a sentence."""
    pieces, start = [], 0
    for match in _BOUNDARY.finditer(text):
        candidate = text[start:match.start()].strip()
        last_word = candidate.rsplit(None, 1)[-1] if candidate else ""
        stem = last_word.rstrip(".").lower()
        if match.group().strip() == "" and match.group().count("\n") == 0 and last_word.endswith(".") and (
                stem in ABBREVIATIONS or (len(stem) == 1 and stem.isalpha())):
            continue
        if candidate:
            pieces.append(candidate)
        start = match.end()
    tail = text[start:].strip()
    if tail:
        pieces.append(tail)
    return pieces
