"""Stage kinds, one file each: a Config dataclass and run(cfg, ctx) -> StageResult.
Modules import torch and transformers inside run(), so `lmssl validate` stays fast."""

from lmssl.stages import finetune, perplexity, pretrain, probe, tokenizer

STAGES = {
    "tokenizer": tokenizer,
    "pretrain": pretrain,
    "finetune": finetune,
    "probe": probe,
    "perplexity": perplexity,
}

CONFIGS = {kind: module.Config for kind, module in STAGES.items()}
"""Each stage kind's Config dataclass: the registry the recipe parser is handed."""
