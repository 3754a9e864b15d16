"""Streaming pretraining: documents read from an iterable `datasets` source, tokenized, packed, shuffled in
windows and collated on the fly, in DataLoader workers; nothing is prepared or written first.

Who reads what. When the source's shards divide by the processes, it is split over them with
`datasets.distributed.split_dataset_by_node` (whole shards each); otherwise every process reads it all and keeps
every world-th document (cleaned rows, or runs of lines), so no document is cut and none is blank. Each
DataLoader worker of a process gets its shards from `datasets` (shard w, w + workers, ...). Worker w makes the process's micro-batches
g = w, w + workers, ...; `ordered()` hands them to the loop in g order whatever order they arrive in.

Exact resume without replay. Every batch carries the state its worker was in after making it: the source's
own `state_dict()` at the start of the current shuffle window, the line and packer carry-over (tokens not cut
into a block yet) at that point, how many blocks of the window were handed out, and its next g. A checkpoint
keeps the last such state per worker; a resumed worker loads its source state, remakes that one window
(at most shuffle_buffer blocks plus one chunk of documents are tokenized again, never trained on) and
continues with the next block. The loop seeds collation by (seed, g, rank), so masks are the same too.
"""

from __future__ import annotations

import random
from typing import Any, Iterator, Optional

import torch

from lmssl.data.packing import BlockPacker, Packing
from lmssl.errors import LmsslError
from lmssl.rng import batch_key, seed_all

# Documents tokenized per call of the tokenizer: the state is taken between chunks, so a resume re-tokenizes
# at most one chunk beyond its shuffle window.
CHUNK_DOCS = 64


def open_source(cfg, where: str):
    """The training split of a DataConfig as a `datasets.IterableDataset` of rows (nothing read yet): local
    text files through lmssl's own reader (one shard per file, undecodable bytes as U+FFFD, .xz/.gz too),
    builtin sets as one shard, anything else with load_dataset(streaming=True)."""
    from lmssl.data.text import stream_split

    source = stream_split(cfg, cfg.split)
    columns = source.column_names
    if columns is not None and cfg.column not in columns:
        raise LmsslError(f"{where}.data.column: the data has no column {cfg.column!r}; columns: {', '.join(columns)}")
    if cfg.max_samples is not None:
        source = source.take(cfg.max_samples)
    return source


class DocumentReader:
    """One stream's documents and blocks, from a (rank, world) part of `source`, with a state to resume from.

    Rows are cleaned as the prepared path cleans them (lmssl.data.cleaning); `documents` is rows or
    blank_lines (lines grouped, cut every LINES_PER_BATCH lines as to_documents cuts them)."""

    def __init__(self, source, rank: int, world: int, packing: Packing, tokenizer, column: str, documents: str,
                 max_chars: int, state: Optional[dict[str, Any]] = None):
        self.source, self.rank, self.world = source, rank, world
        self.packing, self.tokenizer, self.column = packing, tokenizer, column
        self.blank_lines, self.max_chars = documents == "blank_lines", max_chars
        # shards that do not divide by the processes: datasets would deal out rows, which cuts line-documents
        # apart and can leave a process only blank rows (WikiText alternates text and blank lines), so every
        # process reads the stream and keeps every world-th *document* instead
        self.by_document = world > 1 and source.num_shards % world != 0
        state = state or {}
        self.epoch: int = state.get("epoch", 0)
        self.lines: list[str] = list(state.get("lines", []))          # the document being read (blank_lines)
        self.line_count: int = state.get("line_count", 0)            # lines read this epoch
        self.doc_count: int = state.get("doc_count", 0)              # documents seen this epoch (split by document)
        self.epoch_blocks: int = state.get("epoch_blocks", 0)        # blocks made this epoch (none: no usable text)
        self.packer = BlockPacker(packing, state.get("packer"))
        self._open(state.get("source"))

    def _open(self, source_state: Optional[dict]) -> None:
        from datasets.distributed import split_dataset_by_node

        whole = self.by_document or self.world == 1
        part = self.source if whole else split_dataset_by_node(self.source, self.rank, self.world)
        if source_state is not None:
            part.load_state_dict(source_state)
        self.part, self.rows = part, iter(part)
        self.read_any = source_state is not None

    def state(self) -> dict[str, Any]:
        """Where this reader is, between two chunks: JSON-able, a few kB (the unfinished document and block)."""
        return {"source": self.part.state_dict() if self.read_any else None, "epoch": self.epoch,
                "lines": list(self.lines), "line_count": self.line_count, "doc_count": self.doc_count,
                "epoch_blocks": self.epoch_blocks, "packer": self.packer.state()}

    def _documents(self, limit: int) -> tuple[list[str], bool]:
        """Up to `limit` documents of this stream, and whether the epoch ended."""
        from lmssl.data.cleaning import _reason
        from lmssl.data.text import LINES_PER_BATCH

        docs: list[str] = []

        def finish() -> None:
            if self.lines:
                self._keep(docs, "\n".join(self.lines))
                self.lines = []

        while len(docs) < limit:
            try:
                row = next(self.rows)
            except StopIteration:
                finish()
                return docs, True
            self.read_any = True
            text = row.get(self.column)
            bad = _reason(text, self.max_chars)
            if not self.blank_lines:
                if not bad:
                    self._keep(docs, text.strip())
                continue
            if bad:                                                 # blank (or bad, made blank): a document ends
                finish()
            else:
                self.lines.append(text.strip())
            self.line_count += 1
            if self.line_count % LINES_PER_BATCH == 0:             # where to_documents' map batches end
                finish()
        return docs, False

    def _keep(self, docs: list[str], text: str) -> None:
        if not self.by_document or self.doc_count % self.world == self.rank:
            docs.append(text)
        self.doc_count += 1

    def next_chunk(self) -> list[dict[str, list[int]]]:
        """The blocks that the next chunk of documents completes (maybe none); at the end of the data the
        last block is flushed and the next epoch opens."""
        docs, ended = self._documents(CHUNK_DOCS)
        blocks: list[dict[str, list[int]]] = []
        if docs:
            for ids, starts in self.packing.encode(self.tokenizer, docs):
                blocks += self.packer.add(ids, starts)
        if ended:
            blocks += self.packer.flush()
        self.epoch_blocks += len(blocks)
        if ended:
            if self.epoch_blocks == 0:
                raise LmsslError("the streamed training data has no usable text for this process "
                                 f"(rank {self.rank} of {self.world}); check data.column, or use fewer processes")
            self.epoch += 1
            self.line_count = self.doc_count = self.epoch_blocks = 0
            self._open(None)
        return blocks

    def blocks(self) -> Iterator[dict[str, list[int]]]:
        """Every block of one epoch, in stream order (what the prepared path's Dataset holds, for one process)."""
        epoch = self.epoch
        while self.epoch == epoch:
            yield from self.next_chunk()


def window_order(n: int, seed: int, rank: int, worker: int, window: int) -> list[int]:
    """The order a shuffle window's n blocks are handed out in: a permutation drawn from its coordinates."""
    order = list(range(n))
    random.Random(f"lmssl-window:{seed}:{rank}:{worker}:{window}").shuffle(order)
    return order


class StreamBatches(torch.utils.data.IterableDataset):
    """Collated micro-batches of one process: each DataLoader worker (or this process, without workers) reads its
    shards and makes every `workers`-th micro-batch, with `_g` (its index) and `_state` (to resume after it)."""

    def __init__(self, stream: "TextStream", batch_size: int, rank: int, world: int, seed: int, workers: int,
                 states: list[Optional[dict]]):
        self.stream, self.batch_size, self.rank, self.world, self.seed = stream, batch_size, rank, world, seed
        self.workers, self.states = workers, states

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        stream, state = self.stream, self.states[worker]
        if info is not None:
            torch.set_num_threads(1)                                # a worker tokenizes; its process trains
        reader = DocumentReader(stream.source, self.rank, self.world, stream.packing, stream.tokenizer, stream.column,
                                stream.documents, stream.max_chars, state["window"] if state else None)
        g = state["next_g"] if state else worker
        window_index = state["window_index"] if state else 0
        skip = state["handed_out"] if state else 0
        size, stride = max(1, stream.shuffle_buffer), max(1, self.workers)   # stride: this worker's g step
        pending: list[dict] = []
        while True:
            start = reader.state()
            window: list[dict] = []
            while len(window) < size:
                window += reader.next_chunk()
            order = window_order(len(window), self.seed, self.rank, worker, window_index) \
                if stream.shuffle_buffer > 1 else range(len(window))
            for handed, index in enumerate(order, start=1):
                if handed <= skip:
                    continue
                pending.append(window[index])
                if len(pending) == self.batch_size:
                    key = batch_key(self.seed, g, self.rank)
                    seed_all(key)                                   # masks drawn as the prepared path draws them
                    batch = stream.collate(pending)
                    batch.update(_key=key, _g=g, _state={"worker": worker, "window": start, "window_index": window_index,
                                                         "handed_out": handed, "next_g": g + stride})
                    yield batch
                    g += stride
                    pending = []
            skip, window_index = 0, window_index + 1


def ordered(batches, start: int) -> Iterator[dict[str, Any]]:
    """Micro-batches in index order from start on: workers answer in turn, and after a resume the turn
    begins at worker 0 whatever worker's batch is next, so a few (fewer than the workers) wait here."""
    held: dict[int, dict] = {}
    want = start
    try:
        for batch in batches:
            g = batch.pop("_g")
            if g < want or g in held:   # a worker went back: it would train on its data twice
                raise LmsslError(f"the data stream handed out micro-batch {g} again (expected {want} or later); "
                                 "its resume state does not match this run")
            held[g] = batch
            while want in held:
                yield held.pop(want)
                want += 1
    except LmsslError as err:
        text = str(err)
        if "Original Traceback" in text:    # raised in a DataLoader worker: the user's error, not its traceback
            raise LmsslError(text.rsplit("LmsslError: ", 1)[-1].strip()) from None
        raise


class TextStream:
    """The training data of a streaming pretrain stage: a source and how to make blocks and batches of it.
    The loop asks it for `loader(...)`; `len()` is unknown, so max_steps says how long to train."""

    streaming = True

    def __init__(self, source, packing: Packing, tokenizer, collate, column: str, documents: str, max_chars: int,
                 shuffle_buffer: int):
        self.source, self.packing, self.tokenizer, self.collate = source, packing, tokenizer, collate
        self.column, self.documents, self.max_chars, self.shuffle_buffer = column, documents, max_chars, shuffle_buffer

    def reader(self, rank: int = 0, world: int = 1) -> DocumentReader:
        """A reader of one process's part from the start (tests and tools: `reader().blocks()`)."""
        return DocumentReader(self.source, rank, world, self.packing, self.tokenizer, self.column, self.documents,
                              self.max_chars)

    def workers_for(self, num_workers: int, world: int) -> int:
        """DataLoader workers that will have shards to read: `datasets` gives each worker whole shards."""
        if num_workers == 0:
            return 0
        shards = self.source.num_shards
        per_process = shards // world if world > 1 and shards % world == 0 else shards
        return max(1, min(num_workers, per_process))

    def loader(self, batch_size: int, rank: int, world: int, seed: int, start: int, num_workers: int,
               saved: Optional[dict], pin_memory: bool, where: str):
        """(micro-batches from `start` on, in order; the workers used). `saved`: what a checkpoint kept."""
        from torch.utils.data import DataLoader

        workers = self.workers_for(num_workers, world)
        states: list[Optional[dict]] = [None] * max(1, workers)
        if saved is not None:
            if saved["workers"] != workers:
                raise LmsslError(f"{where}.num_workers: the checkpoint's stream was read by {saved['workers']} "
                                 f"DataLoader worker(s) per process and this run would use {workers}; resume with the "
                                 "same num_workers (each worker reads its own shards)")
            states = list(saved["streams"])
        dataset = StreamBatches(self, batch_size, rank, world, seed, workers, states)
        loader = DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                            persistent_workers=False)
        return ordered(loader, start), workers
