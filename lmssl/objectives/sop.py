"""Masked LM plus sentence-order prediction (Lan et al. 2020, "ALBERT: A Lite BERT for Self-supervised
Learning of Language Representations", arXiv:1909.11942) on BertForPreTraining's pair head (1 = swapped)."""

from __future__ import annotations

from lmssl.objectives.mlm_nsp import MaskedLMWithNSP


class MaskedLMWithSOP(MaskedLMWithNSP):
    name = "sop"
    pair_kind = "sop"
    stat_names = ("loss", "mlm_loss", "accuracy", "sop_loss", "sop_accuracy")
    headline = ("loss", "mlm_loss", "accuracy", "sop_accuracy")
