"""The `tokenizer` stage: fit a tokenizer to the corpus and save it for AutoTokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

from lmssl.errors import RecipeError
from lmssl.recipe import DataConfig, StageConfig

SPECS = ("bert-wordpiece",)


@dataclass
class Config(StageConfig):
    spec: str = "bert-wordpiece"
    """Tokenizer spec: bert-wordpiece (lowercased WordPiece with [CLS]/[SEP] templates)."""
    vocab_size: int = 8000
    """Target vocabulary size, special tokens included (8k suits a few MB of text; BERT uses 30522)."""
    min_frequency: int = 2
    """A merge or word piece must occur this often (2 drops one-off noise)."""
    lowercase: Optional[bool] = None
    """Lowercase text first; None keeps the spec's choice."""
    max_length: int = 512
    """model_max_length written into the tokenizer config."""
    max_bytes: Optional[int] = None
    """Train on at most this many bytes of text (bounded memory on huge corpora); None reads all."""
    data: DataConfig = field(default_factory=DataConfig)
    """The text to fit the tokenizer on."""

    def check(self, recipe, earlier, where: str) -> None:
        if self.spec not in SPECS:
            raise RecipeError(f"{where}.spec: unknown tokenizer spec {self.spec!r}; known: {', '.join(SPECS)}")
        if self.vocab_size < 100:
            raise RecipeError(f"{where}.vocab_size: {self.vocab_size} is too small to hold an alphabet and specials")
        self.data.check(f"{where}.data")


def _texts(dataset, column: str, max_bytes: Optional[int]) -> Iterator[list[str]]:
    seen = 0
    for start in range(0, len(dataset), 1000):
        batch = [t for t in dataset[start:start + 1000][column] if t]
        if max_bytes is not None:
            kept = []
            for text in batch:
                seen += len(text.encode("utf-8"))
                if seen > max_bytes:
                    break
                kept.append(text)
            if kept:
                yield kept
            if seen > max_bytes:
                return
        else:
            yield batch


def build(cfg: Config, dataset):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True if cfg.lowercase is None else cfg.lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                        special_tokens=specials, show_progress=False)
    tok.train_from_iterator(_texts(dataset, cfg.data.column, cfg.max_bytes), trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=cfg.max_length, unk_token="[UNK]", pad_token="[PAD]",
        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
    )


def run(cfg: Config, ctx):
    from lmssl.data.text import load_splits
    from lmssl.runner import StageResult

    if ctx.is_main:
        train, _ = load_splits(cfg.data, ctx.seed, f"stages.{cfg.name}")
        tokenizer = build(cfg, train)
        tokenizer.save_pretrained(ctx.out_dir)
        metrics = {"vocab_size": len(tokenizer)}
    else:
        metrics = {}
    ctx.accelerator.wait_for_everyone()
    if not ctx.is_main:
        from transformers import AutoTokenizer

        metrics = {"vocab_size": len(AutoTokenizer.from_pretrained(ctx.out_dir))}
    return StageResult(ctx.out_dir, metrics, headline=metrics)
