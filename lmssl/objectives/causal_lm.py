"""Causal LM on EOS-joined, packed documents (Radford et al. 2019, "Language Models are Unsupervised
Multitask Learners"; Touvron et al. 2023, "LLaMA", arXiv:2302.13971); shifted loss on real tokens only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmssl.data.packing import Packing
from lmssl.errors import LmsslError
from lmssl.models import CAUSAL_FAMILIES, build_config
from lmssl.objectives.base import TextObjective
from lmssl.objectives.mlm import pad_rows


@dataclass
class Options:
    """Options of the causal_lm objective (objective_args in a recipe)."""

    document_attention: bool = False
    """Keep attention inside each document of a packed block (position ids restart after EOS);
    False lets blocks attend across document boundaries, as GPT-2 did."""


def document_positions(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Position ids that restart at 0 after every EOS: (batch, seq) -> (batch, seq)."""
    after_eos = torch.zeros_like(input_ids, dtype=torch.bool)
    after_eos[:, 1:] = input_ids[:, :-1] == eos_id                       # a new document starts here
    index = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    start = torch.where(after_eos, index, torch.zeros_like(index))
    start = torch.cummax(start, dim=1).values                           # start of each token's document
    return index - start


class ShiftedCausalLM(torch.nn.Module):
    """Runs the decoder without `labels` and the vocabulary head only on positions that have a
    real next token, so no head compute goes to padding."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids=None):
        # Right padding under a causal mask never reaches a real token, so no attention mask is
        # passed; that (and no cache) lets transformers read packed documents from restarting position ids.
        hidden = self.model.base_model(input_ids=input_ids, position_ids=position_ids,
                                       use_cache=False).last_hidden_state
        has_next = attention_mask[:, 1:].bool()                             # (batch, seq-1)
        logits = self.model.get_output_embeddings()(hidden[:, :-1][has_next])  # (n_targets, vocab)
        targets = input_ids[:, 1:][has_next]                                # (n_targets,)
        loss = F.cross_entropy(logits.float(), targets)
        return loss, (logits.argmax(-1) == targets).sum(), targets.numel()


class CausalLM(TextObjective):
    """Documents end with EOS and are cut into blocks of max_length; the last, shorter block of each
    packing batch is kept (padded at the right, never scored there), not dropped."""

    name = "causal_lm"
    families = CAUSAL_FAMILIES
    stat_names = ("loss", "accuracy")
    headline = ("loss", "perplexity", "accuracy")
    pipeline_tag = "text-generation"
    reports_perplexity = True
    streams = True
    Options = Options

    def __init__(self, options: Options, tokenizer, max_length: int = 128, seed: int = 0):
        if tokenizer.eos_token_id is None:
            raise LmsslError("the causal_lm objective needs a tokenizer with an EOS token to join documents; "
                             "this one has none")
        super().__init__(options, tokenizer, max_length, seed)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def build_model(self, model_cfg):
        from transformers import AutoModelForCausalLM

        if model_cfg.init_from:
            return AutoModelForCausalLM.from_pretrained(model_cfg.init_from, trust_remote_code=model_cfg.trust_remote_code)
        return AutoModelForCausalLM.from_config(build_config(model_cfg, self.tokenizer, self.max_length))

    def packing(self) -> Packing:
        """Every document ends with EOS; blocks are max_length tokens with nothing added."""
        return Packing(self.max_length, append=(self.tokenizer.eos_token_id,))

    def prepare(self, dataset, column: str = "text"):
        return self.packing().prepare(dataset, self.tokenizer, column)

    def collate(self, examples):
        input_ids = pad_rows([e["input_ids"] for e in examples], self.pad_id)
        attention = pad_rows([[1] * len(e["input_ids"]) for e in examples], 0)
        batch = {"input_ids": input_ids, "attention_mask": attention}
        if self.options.document_attention:
            batch["position_ids"] = document_positions(input_ids, self.tokenizer.eos_token_id)
        return batch

    def training_module(self, model):
        return ShiftedCausalLM(model)

    def loss(self, module, batch):
        loss, correct, count = module(**batch)
        n = float(count)
        return loss, {"loss": (loss.detach() * n, n), "accuracy": (correct, n)}
