"""Masked LM plus next-sentence prediction on BertForPreTraining (Devlin et al. 2019, "BERT: Pre-training
of Deep Bidirectional Transformers for Language Understanding", arXiv:1810.04805)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F

from lmssl.data.pairs import build_pair_dataset, tokenize_sentences
from lmssl.errors import RecipeError
from lmssl.models import build_config, encoder_mask
from lmssl.objectives.mlm import MaskedLM, masked_rows
from lmssl.objectives.mlm import Options as MaskOptions
from lmssl.schema import Range


@dataclass
class Options(MaskOptions):
    """Masking and pairing options of mlm_nsp and sop (objective_args in a recipe)."""

    short_seq_prob: Annotated[float, Range(0, 1)] = 0.1
    """Chance that a pair aims at a random shorter length (BERT's 0.1), so short inputs are seen too."""


class PreTrainingHeads(torch.nn.Module):
    """BertForPreTraining's parts for training: encoder on every token, vocabulary head only where
    labels != -100, pair head on the pooled [CLS]. Returns the summed loss and its parts."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids, labels, pair_label, masked_positions=None,
                padded=True):
        out = self.model.bert(input_ids=input_ids, attention_mask=encoder_mask(self.model, attention_mask, padded),
                              token_type_ids=token_type_ids)
        hidden, targets = masked_rows(out.last_hidden_state, labels, masked_positions)  # masked tokens only
        logits = self.model.cls.predictions(hidden)                         # (n_masked, vocab)
        mlm_loss = F.cross_entropy(logits.float(), targets)
        pair_logits = self.model.cls.seq_relationship(out.pooler_output)    # (batch, 2)
        pair_loss = F.cross_entropy(pair_logits.float(), pair_label)
        return {"loss": mlm_loss + pair_loss, "mlm_loss": mlm_loss, "pair_loss": pair_loss,
                "correct": (logits.argmax(-1) == targets).sum(), "masked": targets.numel(),
                "pair_correct": (pair_logits.argmax(-1) == pair_label).sum()}


class MaskedLMWithNSP(MaskedLM):
    """Pairs are drawn once, in `prepare`, from the recipe's seed."""

    name = "mlm_nsp"
    families = ("bert",)
    pair_kind = "nsp"
    stat_names = ("loss", "mlm_loss", "accuracy", "nsp_loss", "nsp_accuracy")
    headline = ("loss", "mlm_loss", "accuracy", "nsp_accuracy")
    streams = False          # the random next sentence is drawn from the whole corpus, which a stream never holds
    Options = Options

    @classmethod
    def check(cls, options: Options, stage, where: str) -> None:
        super().check(options, stage, where)
        if options.whole_word:
            raise RecipeError(f"{where}.objective_args.whole_word: whole-word masking is available with the mlm "
                              f"objective only, not {cls.name}")

    def build_model(self, model_cfg):
        from transformers import BertForPreTraining

        if model_cfg.init_from:
            return BertForPreTraining.from_pretrained(model_cfg.init_from)
        return BertForPreTraining(build_config(model_cfg, self.tokenizer, self.max_length))

    def prepare(self, dataset, column: str = "text"):
        documents = tokenize_sentences(dataset, self.tokenizer, column)
        return build_pair_dataset(documents, self.tokenizer, self.pair_kind, self.max_length, self.seed,
                                  self.options.short_seq_prob, where=self.name)

    def collate(self, examples):
        batch = self.mask(examples)
        batch["pair_label"] = torch.tensor([e["pair_label"] for e in examples], dtype=torch.long)
        return batch

    def training_module(self, model):
        return PreTrainingHeads(model)

    def loss(self, module, batch):
        out = module(**batch)
        n, b = out["masked"], float(batch["pair_label"].shape[0])
        pair = self.pair_kind
        return out["loss"], {
            "loss": (out["loss"].detach() * b, b), "mlm_loss": (out["mlm_loss"].detach() * n, n),
            "accuracy": (out["correct"], n), f"{pair}_loss": (out["pair_loss"].detach() * b, b),
            f"{pair}_accuracy": (out["pair_correct"], b),
        }
