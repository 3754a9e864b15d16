"""Pretraining objectives, one file per method, behind one contract (base.py). Each owns its model
head, data preparation, collator and loss; the training loop knows none of them by name. Add a
method: one file, one entry."""

from lmssl.objectives.byol import BYOL
from lmssl.objectives.causal_lm import CausalLM
from lmssl.objectives.dino import DINO
from lmssl.objectives.mae import MaskedAutoencoder
from lmssl.objectives.mlm import MaskedLM
from lmssl.objectives.mlm_nsp import MaskedLMWithNSP
from lmssl.objectives.moco_v3 import MoCoV3
from lmssl.objectives.rotation import Rotation
from lmssl.objectives.simclr import SimCLR
from lmssl.objectives.simcse import SimCSE
from lmssl.objectives.simsiam import SimSiam
from lmssl.objectives.sop import MaskedLMWithSOP

OBJECTIVES = {
    "mlm": MaskedLM,
    "mlm_nsp": MaskedLMWithNSP,
    "sop": MaskedLMWithSOP,
    "causal_lm": CausalLM,
    "mae": MaskedAutoencoder,
    "simclr": SimCLR,
    "simcse": SimCSE,
    "byol": BYOL,
    "moco_v3": MoCoV3,
    "simsiam": SimSiam,
    "dino": DINO,
    "rotation": Rotation,
}
