"""Pretraining objectives, one file per method. Each owns its model head, data preparation,
collator and loss; the training loop knows none of them by name. Add a method: one file, one entry."""

from lmssl.objectives.mlm import MaskedLM

OBJECTIVES = {
    "mlm": MaskedLM,
}
