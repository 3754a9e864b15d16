"""Masked language modeling (Devlin et al. 2019, "BERT", arXiv:1810.04805; Liu et al. 2019,
"RoBERTa", arXiv:1907.11692), with optional whole-word masking (BERT's 2019 release).

Dynamic masking: masks are drawn when a batch is collated, so every epoch sees fresh ones; the
loop seeds that draw per batch, which keeps resumed runs exact. The vocabulary head runs only on
the masked positions (about 15% of tokens), not on the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Optional

import torch
import torch.nn.functional as F

from lmssl.data.packing import Packing
from lmssl.errors import RecipeError
from lmssl.models import MASKED_FAMILIES, build_config, encoder_mask, is_padded
from lmssl.objectives.base import TextObjective
from lmssl.schema import Range, check_ranges


@dataclass
class Options:
    """Masking options of the mlm objective (objective_args in a recipe)."""

    mask_rate: Annotated[float, Range(0, 1, low_open=True, high_open=True)] = 0.15
    """Share of (non-special) tokens to predict; BERT's 15%."""
    mask_token_share: Annotated[float, Range(0, 1)] = 0.8
    """Of the chosen tokens, this share becomes [MASK] (BERT's 80)..."""
    random_token_share: Annotated[float, Range(0, 1)] = 0.1
    """...this share a random token (10); the rest stay as they are (10)."""
    whole_word: bool = False
    """Choose whole words, not tokens: every piece of a chosen word is predicted (BERT's WWM)."""

    def check(self, where: str) -> None:
        check_ranges(self, where)
        if self.mask_token_share + self.random_token_share > 1.0:
            raise RecipeError(f"{where}.random_token_share: mask_token_share + random_token_share is "
                              f"{self.mask_token_share + self.random_token_share:g}, more than all chosen tokens (1)")


def choose_words(word_starts: torch.Tensor, maskable: torch.Tensor, rate: float) -> torch.Tensor:
    """Token choice where each word is drawn with probability `rate` and all its tokens follow."""
    word_id = word_starts.long().cumsum(dim=1)                              # (batch, seq): 1, 1, 2, 3, 3, ...
    draws = torch.bernoulli(torch.full((word_id.shape[0], word_id.shape[1] + 1), rate)).bool()
    return torch.gather(draws, 1, word_id) & maskable                       # (batch, seq)


def mask_tokens(input_ids: torch.Tensor, maskable: torch.Tensor, options: Options, mask_id: int, vocab_size: int,
                word_starts: Optional[torch.Tensor] = None):
    """(masked input ids, labels with -100 where nothing is predicted). `maskable` is False on
    special and padding tokens, which are never chosen. At least one token per batch is chosen.
    With `word_starts` (1 where a word begins), whole words are chosen."""
    if word_starts is not None:
        chosen = choose_words(word_starts, maskable, options.mask_rate)
    else:
        chosen = torch.bernoulli(torch.where(maskable, options.mask_rate, 0.0)).bool()
    if not chosen.any() and maskable.any():
        candidates = maskable.nonzero()
        pick = candidates[torch.randint(len(candidates), (1,))][0]
        chosen[pick[0], pick[1]] = True
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    inputs = input_ids.clone()
    to_mask = torch.bernoulli(torch.full(inputs.shape, options.mask_token_share)).bool() & chosen
    inputs[to_mask] = mask_id
    rest = 1.0 - options.mask_token_share
    random_share = options.random_token_share / rest if rest > 0 else 0.0
    to_random = torch.bernoulli(torch.full(inputs.shape, random_share)).bool() & chosen & ~to_mask
    inputs[to_random] = torch.randint(vocab_size, inputs.shape)[to_random]
    return inputs, labels


class SparseHeadMLM(torch.nn.Module):
    """Runs the encoder on every token and the vocabulary head only where labels != -100."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @property
    def head(self) -> torch.nn.Module:
        """The model's own vocabulary head, looked up, not registered a second time: one name per weight in a
        state dict (torch.distributed.checkpoint keys shards by name)."""
        return self.model.cls if hasattr(self.model, "cls") else self.model.lm_head

    def forward(self, input_ids, attention_mask, labels, masked_positions=None, token_type_ids=None, padded=True):
        encoder = self.model.base_model
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        mask = encoder_mask(self.model, attention_mask, padded)          # built without reading the device
        hidden = encoder(input_ids=input_ids, attention_mask=mask, **kwargs).last_hidden_state
        hidden, targets = masked_rows(hidden, labels, masked_positions)   # (n_masked, hidden), (n_masked,)
        logits = self.head(hidden)                                  # (n_masked, vocab)
        loss = F.cross_entropy(logits.float(), targets)
        correct = (logits.argmax(-1) == targets).sum()
        return loss, correct, targets.numel()


def masked_rows(hidden: torch.Tensor, labels: torch.Tensor, positions: Optional[torch.Tensor] = None):
    """(hidden states, labels) of the masked tokens. `positions`, the flat indices of labels != -100, comes
    from the collator, which drew the masks on the host: selecting by it needs no read of the device (a
    boolean mask would: its count decides the shape). Without it, the boolean selection."""
    if positions is None:
        selected = labels != -100
        return hidden[selected], labels[selected]
    flat = hidden.reshape(-1, hidden.shape[-1])
    return flat.index_select(0, positions), labels.reshape(-1).index_select(0, positions)


def pad_rows(rows: list[list[int]], value: int) -> torch.Tensor:
    """Right-pad integer lists to the longest into a (len(rows), longest) tensor."""
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


class MaskedLM(TextObjective):
    name = "mlm"
    families = MASKED_FAMILIES
    stat_names = ("loss", "accuracy")
    headline = ("loss", "accuracy")
    pipeline_tag = "fill-mask"
    streams = True
    Options = Options

    def __init__(self, options: Options, tokenizer, max_length: int = 128, seed: int = 0):
        if tokenizer.mask_token_id is None:
            from lmssl.errors import LmsslError

            raise LmsslError(f"the {self.name} objective needs a tokenizer with a mask token; this one has none")
        super().__init__(options, tokenizer, max_length, seed)
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)))

    def build_model(self, model_cfg):
        from transformers import AutoModelForMaskedLM

        if model_cfg.init_from:
            return AutoModelForMaskedLM.from_pretrained(model_cfg.init_from, trust_remote_code=model_cfg.trust_remote_code)
        return AutoModelForMaskedLM.from_config(build_config(model_cfg, self.tokenizer, self.max_length))

    def packing(self) -> Packing:
        """[CLS] block [SEP], documents joined by [SEP] inside a block (RoBERTa's FULL-SENTENCES)."""
        tok = self.tokenizer
        cls = (tok.cls_token_id,) if tok.cls_token_id is not None else (tok.bos_token_id,)
        sep = (tok.sep_token_id,) if tok.sep_token_id is not None else (tok.eos_token_id,)
        return Packing(self.max_length - 2, separator=sep, prefix=cls, suffix=sep, word_starts=self.options.whole_word)

    def prepare(self, dataset, column: str = "text"):
        return self.packing().prepare(dataset, self.tokenizer, column)

    def mask(self, examples) -> dict[str, torch.Tensor]:
        """Pad `input_ids` (and `token_type_ids`) and draw this batch's masks."""
        input_ids = pad_rows([e["input_ids"] for e in examples], self.tokenizer.pad_token_id)
        attention = pad_rows([[1] * len(e["input_ids"]) for e in examples], 0)
        maskable = attention.bool() & ~torch.isin(input_ids, self.special_ids)
        starts = pad_rows([e["word_starts"] for e in examples], 1) if self.options.whole_word else None
        inputs, labels = mask_tokens(input_ids, maskable, self.options, self.tokenizer.mask_token_id,
                                     len(self.tokenizer), starts)
        batch = {"input_ids": inputs, "attention_mask": attention, "labels": labels,
                 "masked_positions": (labels.reshape(-1) != -100).nonzero().squeeze(1),   # on the host, here
                 "padded": is_padded([e["input_ids"] for e in examples])}                # a Python bool
        if "token_type_ids" in examples[0]:
            batch["token_type_ids"] = pad_rows([e["token_type_ids"] for e in examples], 0)
        return batch

    def collate(self, examples):
        return self.mask(examples)

    def training_module(self, model):
        return SparseHeadMLM(model)

    def loss(self, module, batch):
        loss, correct, count = module(**batch)
        n = float(count)
        return loss, {"loss": (loss.detach() * n, n), "accuracy": (correct, n)}
