"""Tokenize documents and pack them into fixed-length blocks, so no compute goes to padding.

Documents are tokenized and joined with a separator in groups of DOCS_PER_GROUP; blocks are cut from
each group's tokens and its last, shorter block is kept, not dropped. `Packing` says how (per objective),
`BlockPacker` cuts, one document at a time, for the prepared (a cached `datasets.map`) and streamed paths.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from itertools import chain
from typing import Any, Optional

# Documents per packing group: the prepared path packs each map batch of this many documents on its own (its
# remainder kept as a shorter block), and the streaming packer flushes after as many, so both cut the same blocks.
DOCS_PER_GROUP = 1000


def word_starts_of(encoding, index: int) -> list[int]:
    """1 where a token begins a word (per the tokenizer's pre-tokenizer), else 0."""
    starts, previous = [], None
    for word in encoding.word_ids(index):
        starts.append(int(word is None or word != previous))
        previous = word
    return starts


# Documents per tokenizer call in Packing.prepare: the encodings of one call (ids, tokens, masks per token) are
# held at once, so fewer at a time lowers the peak; 100 still keeps the tokenizer's threads busy.
ENCODE_DOCS = 100


def blocks_table(blocks: list[dict[str, list[int]]], dtypes: dict[str, str]):
    """Blocks as an Arrow table of list columns, built from one flat numpy array per column and shared
    offsets: a fraction of the memory (and time) of handing datasets lists of Python ints to convert."""
    import numpy as np
    import pyarrow as pa

    lengths = np.fromiter((len(b["input_ids"]) for b in blocks), dtype=np.int64, count=len(blocks))
    offsets = np.zeros(len(blocks) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    total, offsets = int(offsets[-1]), pa.array(offsets)
    columns = {}
    for name, dtype in dtypes.items():
        flat = np.fromiter(chain.from_iterable(b[name] for b in blocks), dtype=dtype, count=total)
        columns[name] = pa.ListArray.from_arrays(offsets, pa.array(flat))
    return pa.table(columns)


@functools.lru_cache(maxsize=None)
def _libc_trim():
    """glibc's malloc_trim, or None (another C library, or none found); looked up once."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_memory() -> None:
    """Hand freed heap memory back to the OS: glibc keeps what the tokenizer's threads freed in per-thread
    arenas, and Arrow's pool keeps freed buffers, so without this the peak of a long preparation grows with
    what every batch once used. Measured (bench/bench_data_prep.py): it lowers the peak by about a fifth."""
    import pyarrow as pa

    trim = _libc_trim()
    if trim is not None:
        trim(0)
    pa.default_memory_pool().release_unused()


# Rows per tokenizing process: below this a source is tokenized in this process (forking costs more).
ROWS_PER_PROCESS = 20_000


def prep_processes(n_rows: int) -> Optional[int]:
    """`num_proc` for tokenizing n_rows: the CPUs this process may use, at most one per ROWS_PER_PROCESS
    rows; None (this process) when that is one. Tokenizing is row by row, so the result does not depend on it."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    procs = min(cpus, n_rows // ROWS_PER_PROCESS)
    return procs if procs > 1 else None


def tokenize_column(dataset, tokenizer, column: str, desc: str = "tokenizing", with_word_starts: bool = False,
                    append: Optional[list[int]] = None):
    """One `ids` row per non-blank text (plus `word_starts` for whole-word masking); `append`
    (e.g. [eos]) is added after every text. Ids are stored as int32 (half the bytes of int64, as written by
    the map and read back by the packer); large sources are tokenized by several processes (prep_processes),
    and the result is cached by the datasets fingerprint, so a second run reads it instead."""
    import datasets

    append = tuple(append or ())

    def encode(batch):
        texts = [t for t in batch[column] if t and t.strip()]
        encoded = encode_texts(tokenizer, texts, append, with_word_starts) if texts else []
        out = {"ids": [ids for ids, _ in encoded]}
        if with_word_starts:
            out["word_starts"] = [starts for _, starts in encoded]
        return out

    features = datasets.Features({"ids": datasets.Sequence(datasets.Value("int32")),
                                  **({"word_starts": datasets.Sequence(datasets.Value("int8"))} if with_word_starts else {})})
    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc=desc, features=features,
                       num_proc=prep_processes(len(dataset)))


@dataclass(frozen=True)
class Packing:
    """How a text objective turns documents into training blocks: `append` after every document's tokens
    (EOS for causal LM), `separator` between documents in a block, every block `prefix` + up to
    content_length tokens + `suffix` ([CLS] ... [SEP] for BERT). One spec serves the prepared (map-style)
    path and the streaming one, so both see the same blocks."""

    content_length: int
    separator: tuple[int, ...] = ()
    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()
    append: tuple[int, ...] = ()
    word_starts: bool = False

    def prepare(self, dataset, tokenizer, column: str = "text", desc: str = "tokenizing and packing"):
        """Documents (a Dataset) into packed blocks in one batched map, cached by fingerprint: each batch of
        DOCS_PER_GROUP documents is tokenized ENCODE_DOCS at a time (the fast tokenizer spreads a call over the CPUs'
        threads, in this process) and packed, so no table of token ids is written and read back, and no worker
        process holds its own copy of the tokenizer and batches. Ids are stored as uint16 when the vocabulary
        fits. Memory: a batch's blocks go to Arrow as flat arrays (not lists of Python ints), and the memory the
        tokenizer's threads and Arrow freed is handed back after each batch (release_memory), so the peak is one
        batch's, not the sum of what the allocators keep."""
        import datasets

        wide = len(tokenizer) > 65_536
        dtypes = {"input_ids": "int32" if wide else "uint16", **({"word_starts": "int8"} if self.word_starts else {})}
        features = datasets.Features({name: datasets.Sequence(datasets.Value(t)) for name, t in dtypes.items()})

        def encode_and_pack(batch):
            texts = [t for t in batch[column] if t and t.strip()]
            packer, blocks = BlockPacker(self), []
            for first in range(0, len(texts), ENCODE_DOCS):
                for ids, starts in self.encode(tokenizer, texts[first:first + ENCODE_DOCS]):
                    blocks += packer.add(ids, starts)
            blocks += packer.flush()
            table = blocks_table(blocks, dtypes)
            del blocks, packer, texts
            release_memory()
            return table

        return dataset.map(encode_and_pack, batched=True, batch_size=DOCS_PER_GROUP, features=features,
                           remove_columns=dataset.column_names, desc=desc)

    def encode(self, tokenizer, texts: list[str]) -> list[tuple[list[int], Optional[list[int]]]]:
        """(ids, word starts or None) per document: encode_texts with this spec's `append`."""
        return encode_texts(tokenizer, texts, self.append, self.word_starts)


def encode_texts(tokenizer, texts: list[str], append: tuple[int, ...] = (), word_starts: bool = False):
    """(ids + append, word starts or None) per text, no special tokens. Without word starts a fast tokenizer's
    backend encodes the batch directly (encode_batch_fast: no offsets, no BatchEncoding), which gives the same
    ids when the backend neither truncates nor pads (as the wrapper sets it for this call)."""
    tail = list(append)
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if not word_starts and backend is not None and backend.truncation is None and backend.padding is None:
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [(e.ids + tail, None) for e in encode(texts, add_special_tokens=False)]
    enc = tokenizer(texts, add_special_tokens=False)
    return [(ids + tail, word_starts_of(enc, i) + [1] * len(tail) if word_starts else None)
            for i, ids in enumerate(enc["input_ids"])]


class BlockPacker:
    """The packing rule, one document at a time: blocks are cut as soon as content_length tokens are
    there, a group of DOCS_PER_GROUP documents ends with its shorter remainder, and what is not cut yet (the
    carry-over) is part of `state()`, so a resumed stream continues mid-block."""

    def __init__(self, spec: Packing, state: Optional[dict[str, Any]] = None):
        state = state or {}
        self.spec = spec
        self.ids: list[int] = list(state.get("ids", []))
        self.starts: list[int] = list(state.get("starts", []))
        self.docs: int = state.get("docs", 0)               # documents in the current group
        self.started: bool = state.get("started", False)    # the group has tokens (a separator goes first)

    def state(self) -> dict[str, Any]:
        return {"ids": list(self.ids), "starts": list(self.starts), "docs": self.docs, "started": self.started}

    def _block(self, ids: list[int], starts: list[int]) -> dict[str, list[int]]:
        spec = self.spec
        block = {"input_ids": [*spec.prefix, *ids, *spec.suffix]}
        if spec.word_starts:
            block["word_starts"] = [1] * len(spec.prefix) + [1] + starts[1:] + [1] * len(spec.suffix)
        return block

    def add(self, ids: list[int], starts: Optional[list[int]] = None) -> list[dict[str, list[int]]]:
        """One tokenized document in; the blocks it completes out."""
        spec, blocks = self.spec, []
        if ids:
            if self.started and spec.separator:
                self.ids.extend(spec.separator)
                self.starts.extend([1] * len(spec.separator))
            self.ids.extend(ids)
            if spec.word_starts:
                self.starts.extend(starts)
            self.started = True
            n = spec.content_length
            while len(self.ids) >= n:
                blocks.append(self._block(self.ids[:n], self.starts[:n]))
                del self.ids[:n], self.starts[:n]
        self.docs += 1
        if self.docs == DOCS_PER_GROUP:
            blocks += self.flush()
        return blocks

    def flush(self) -> list[dict[str, list[int]]]:
        """End the group (or the data): its remainder becomes a shorter block."""
        blocks = [self._block(self.ids, self.starts)] if self.ids else []
        self.ids, self.starts, self.docs, self.started = [], [], 0, False
        return blocks
