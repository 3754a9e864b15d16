"""The `perplexity` stage: score a causal LM on held-out text the way papers report it. The text is read
as the causal pretraining reads it (documents, each ending with EOS), tokenized into one stream and
scored in windows of `max_length` tokens, each scoring `stride` new tokens after the context before them
(every token after the first is predicted exactly once; with a stride below the window, each scored
token sees at least max_length - stride tokens of context). It reports the mean NLL per token, perplexity per token,
perplexity per word (the summed NLL divided by the text's word count, as WikiText results are quoted)
and bits per byte of the UTF-8 text."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Literal, Optional

from lmssl.errors import LmsslError, RecipeError
from lmssl.recipe import DataConfig, StageConfig
from lmssl.schema import Range


@dataclass
class Config(StageConfig):
    model_from: Optional[str] = None
    """A causal pretrain stage, a folder or a hub id (its tokenizer comes with it)."""
    data: DataConfig = field(default_factory=lambda: DataConfig(path="text"))
    """The text to score: data.split is read whole (e.g. files {test: .../test.txt.xz}, split: test)."""
    documents: Literal["rows", "blank_lines"] = "rows"
    """What a document is, as in the pretrain stage: rows, or runs of lines between blank lines (WikiText)."""
    max_length: Optional[Annotated[int, Range(2, 65536)]] = None
    """Tokens per scored window; None takes the model's positions."""
    stride: Optional[Annotated[int, Range(1, 65536)]] = None
    """New tokens each window scores (at most max_length - 1: a window's first token is context); None =
    max_length. A smaller stride gives every scored token at least max_length - stride tokens of context
    and costs about max_length / stride times the compute."""
    batch_size: Annotated[int, Range(1, 4096)] = 8
    """Windows per forward pass."""
    word_count: Literal["words_and_lines", "words"] = "words_and_lines"
    """How words are counted for perplexity per word: whitespace-separated words plus one per line (the
    end-of-line `<eos>` of word-level WikiText, whose test split counts 245,569), or the words alone."""
    trust_remote_code: bool = False
    """Run model code shipped inside model_from (off unless you trust that repository)."""

    REFERENCES = {"model_from": ("pretrain",)}

    def check(self, recipe, earlier, where: str) -> None:
        if self.model_from is None:
            raise RecipeError(f"{where}.model_from: name the causal LM to score (a pretrain stage, folder or hub id)")
        source = earlier.get(self.model_from)
        if source is not None and getattr(source, "objective", "causal_lm") != "causal_lm":
            raise RecipeError(f"{where}.model_from: stage {self.model_from!r} trains {source.objective}; "
                              "perplexity scores a causal_lm model")
        if self.stride is not None and self.max_length is not None and self.stride > self.max_length:
            raise RecipeError(f"{where}.stride: {self.stride} is beyond max_length {self.max_length}; "
                              "a window may not skip tokens")
        if self.data.streaming:
            raise RecipeError(f"{where}.data.streaming: perplexity reads its text whole; drop streaming")
        self.data.check(f"{where}.data")


def count_words(lines, mode: str) -> int:
    """Words of the raw rows: whitespace-separated words, plus one per row for `words_and_lines`."""
    words = sum(len(line.split()) for line in lines if line)
    return words + (len(lines) if mode == "words_and_lines" else 0)


def windows(n_tokens: int, length: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first target) of each window over a stream of n_tokens: a window of at most `length`
    tokens scores its last min(stride, length - 1) positions, the tokens before them are its context, and
    the targets of all windows are the stream positions 1..n_tokens-1, each exactly once."""
    step = min(stride, length - 1)
    out, first = [], 1                        # position 0 has no context: never a target
    while first < n_tokens:
        end = min(first + step, n_tokens)
        out.append((max(0, end - length), end, first))
        first = end
    return out


def score_stream(model, ids, length: int, stride: int, batch_size: int, device, shard=(0, 1)):
    """(summed NLL in nats, targets scored) of a causal LM over the token list `ids`; this process takes
    every shard[1]-th window from shard[0]."""
    import torch
    import torch.nn.functional as F

    stream = torch.tensor(ids, dtype=torch.long)
    spans = windows(len(ids), length, stride)[shard[0]::shard[1]]
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    with torch.no_grad():
        for b in range(0, len(spans), batch_size):
            group = spans[b:b + batch_size]
            width = max(end - start for start, end, _ in group)
            batch = torch.zeros(len(group), width, dtype=torch.long)
            targets = torch.full((len(group), width), -100, dtype=torch.long)
            for row, (start, end, first) in enumerate(group):
                batch[row, :end - start] = stream[start:end]
                keep = slice(first - start, end - start)    # window positions whose token is scored
                targets[row, keep] = stream[start:end][keep]
            batch, targets = batch.to(device), targets.to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            labels = targets[:, 1:]
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                   reduction="sum").double()
            count += (labels != -100).sum()
    return nll, count


def run(cfg: Config, ctx):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmssl.data.packing import tokenize_column
    from lmssl.data.text import _load, to_documents
    from lmssl.hub import write_json
    from lmssl.models import max_positions_of
    from lmssl.stages.base import StageResult

    where = f"stages.{cfg.name}"
    source = ctx.resolve(cfg.model_from)
    with ctx.phase("prepare"):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=cfg.trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(str(source), trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as err:
            raise LmsslError(f"{where}.model_from: cannot load a causal LM from {str(source)!r}: "
                             f"{' '.join(str(err).split())[:300]}") from None
        if tokenizer.eos_token_id is None:
            raise LmsslError(f"{where}.model_from: the tokenizer of {str(source)!r} has no EOS token to end documents")
        positions = max_positions_of(model.config)
        length = cfg.max_length or positions
        if length is None:
            raise LmsslError(f"{where}.max_length: the model does not say its positions; set max_length")
        if positions is not None and length > positions:
            raise LmsslError(f"{where}.max_length: {length} tokens is beyond the model's {positions} positions")
        stride = cfg.stride or length
        if stride > length:
            raise LmsslError(f"{where}.stride: {stride} is beyond the window of {length} tokens")
        with ctx.main_process_first():
            raw = _load(cfg.data, cfg.data.split)
            if cfg.data.column not in raw.column_names:
                raise LmsslError(f"{where}.data.column: the data has no column {cfg.data.column!r}; "
                                 f"columns: {', '.join(raw.column_names)}")
            if cfg.data.max_samples is not None:
                raw = raw.select(range(min(cfg.data.max_samples, len(raw))))
            lines = raw[cfg.data.column]
            docs = to_documents(raw, cfg.data.column, cfg.documents)
            encoded = tokenize_column(docs, tokenizer, "text", append=[tokenizer.eos_token_id])
        ids = [token for row in encoded["ids"] for token in row]
        if len(ids) < 2:
            raise LmsslError(f"{where}.data: {len(ids)} tokens of text; nothing to score")
        words = count_words(lines, cfg.word_count)
        n_bytes = sum(len(line.encode("utf-8")) + 1 for line in lines if line is not None)
        model.to(ctx.accelerator.device).eval()
    with ctx.phase("eval"):
        acc = ctx.accelerator
        nll, count = score_stream(model, ids, length, stride, cfg.batch_size, acc.device,
                                  (acc.process_index, acc.num_processes))
        if acc.num_processes > 1:
            nll, count = acc.reduce(nll, "sum"), acc.reduce(count, "sum")
        nll, count = float(nll), int(count)
    metrics = {
        "loss": nll / count, "perplexity": math.exp(nll / count), "perplexity_per_word": math.exp(nll / words),
        "bits_per_byte": nll / math.log(2) / n_bytes, "tokens": count + 1, "targets": count, "words": words,
        "bytes": n_bytes, "window": length, "stride": stride, "documents": len(docs),
    }
    if ctx.is_main:
        with ctx.phase("save"):
            write_json(ctx.out_dir / "results.json", {"model_from": cfg.model_from, "metrics": metrics})
    report = (f"## {cfg.name}: perplexity of {cfg.model_from} on {cfg.data.files or cfg.data.path} ({cfg.data.split})\n\n"
              f"| tokens | words | per token | per word | bits per byte | window / stride |\n|---:|---:|---:|---:|---:|---|\n"
              f"| {count + 1:,} | {words:,} | {metrics['perplexity']:.2f} | {metrics['perplexity_per_word']:.2f} | "
              f"{metrics['bits_per_byte']:.3f} | {length} / {stride} |\n")
    headline = {k: metrics[k] for k in ("perplexity", "perplexity_per_word", "bits_per_byte")}
    return StageResult(ctx.out_dir, metrics, headline=headline, report=report)
