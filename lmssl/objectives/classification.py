"""Sequence classification and regression heads for fine-tuning (AutoModelForSequenceClassification),
as in BERT's fine-tuning recipe: Devlin et al., 2019, "BERT: Pre-training of Deep Bidirectional
Transformers for Language Understanding", section 4 (the [CLS] representation feeds one linear layer).

Texts (one column or a pair) are tokenized once; batches are padded to their longest example.
"""

from __future__ import annotations

from typing import Optional

import torch


class SequenceClassification:
    name = "classify"
    stat_names = ("loss", "accuracy")

    def __init__(self, tokenizer, text_column: str, pair_column: Optional[str], max_length: int, num_labels: int):
        self.tokenizer, self.text_column, self.pair_column = tokenizer, text_column, pair_column
        self.max_length, self.num_labels = max_length, num_labels
        self.regression = num_labels == 1
        if self.regression:
            self.stat_names = ("loss",)

    def prepare(self, dataset, label_column: str = "label"):
        """Token ids (pairs joined by the tokenizer's template, truncated to max_length) and `labels`."""
        def encode(batch):
            pair = batch[self.pair_column] if self.pair_column else None
            out = self.tokenizer(batch[self.text_column], pair, truncation=True, max_length=self.max_length)
            out["labels"] = batch[label_column]
            return out

        return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="tokenizing")

    def training_module(self, model):
        return model

    def collate(self, examples):
        features = [{k: v for k, v in e.items() if k != "labels"} for e in examples]
        batch = self.tokenizer.pad(features, return_tensors="pt")
        dtype = torch.float if self.regression else torch.long
        batch["labels"] = torch.tensor([e["labels"] for e in examples], dtype=dtype)  # (batch,)
        return dict(batch)

    def loss(self, module, batch):
        out = module(**batch)  # cross-entropy over classes, or mean squared error when num_labels == 1
        n = float(batch["labels"].shape[0])
        stats = {"loss": (out.loss.detach() * n, n)}
        if not self.regression:
            stats["accuracy"] = ((out.logits.argmax(-1) == batch["labels"]).sum(), n)
        return out.loss, stats

    @torch.no_grad()
    def predict(self, module, batch) -> torch.Tensor:
        """Class ids (batch,) or, for regression, the predicted values (batch,)."""
        logits = module(**{k: v for k, v in batch.items() if k != "labels"}).logits  # (batch, num_labels)
        return logits.squeeze(-1) if self.regression else logits.argmax(-1)
