"""Pretraining objectives, one file per method, behind one contract (base.py). Each owns its model
head, data preparation, collator and loss; the training loop knows none of them by name. Add a
method: one file, one entry."""

from lmssl.objectives.causal_lm import CausalLM
from lmssl.objectives.mae import MaskedAutoencoder
from lmssl.objectives.mlm import MaskedLM
from lmssl.objectives.mlm_nsp import MaskedLMWithNSP
from lmssl.objectives.simclr import SimCLR
from lmssl.objectives.sop import MaskedLMWithSOP

OBJECTIVES = {
    "mlm": MaskedLM,
    "mlm_nsp": MaskedLMWithNSP,
    "sop": MaskedLMWithSOP,
    "causal_lm": CausalLM,
    "mae": MaskedAutoencoder,
    "simclr": SimCLR,
}
