"""Stage kinds, one file each: a Config dataclass and run(cfg, ctx) -> StageResult.
Modules import torch and transformers inside run(), so `lmssl validate` stays fast."""

from lmssl.stages import finetune, pretrain, tokenizer

STAGES = {
    "tokenizer": tokenizer,
    "pretrain": pretrain,
    "finetune": finetune,
}
