"""Model families and size presets, built from config with a trained tokenizer's vocabulary.

Objectives choose the head (AutoModelForMaskedLM, BertForPreTraining, AutoModelForCausalLM, ...);
this module only says what a "bert/tiny" or "llama/small" is, so every output reloads with
`from_pretrained`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

# hidden, layers, heads, intermediate. tiny/mini/small follow Turc et al. 2019 (BERT miniatures).
SIZES = {
    "tiny": dict(hidden=64, layers=2, heads=2, intermediate=256),
    "mini": dict(hidden=256, layers=4, heads=4, intermediate=1024),
    "small": dict(hidden=512, layers=4, heads=8, intermediate=2048),
    "medium": dict(hidden=512, layers=8, heads=8, intermediate=2048),
    "base": dict(hidden=768, layers=12, heads=12, intermediate=3072),
}
FAMILIES = ("bert", "roberta", "gpt2", "llama")
MASKED_FAMILIES = ("bert", "roberta")
CAUSAL_FAMILIES = ("gpt2", "llama")


@dataclass
class ModelConfig:
    """Which transformer to pretrain: a family and size from scratch, or a checkpoint to continue."""

    family: str = "bert"
    """Architecture family: bert, roberta (masked), gpt2, llama (causal)."""
    size: str = "tiny"
    """Size preset: tiny (2x64), mini (4x256), small (4x512), medium (8x512), base (12x768)."""
    init_from: Optional[str] = None
    """Warm start from a folder or hub id instead of random initialization."""
    trust_remote_code: bool = False
    """Run model code shipped inside init_from (a security decision: off unless you trust that repository)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Any transformers config field, e.g. {hidden_dropout_prob: 0.0, num_hidden_layers: 6}."""
    dropout: Optional[float] = None
    """Dropout on hidden states and attention; None keeps the family default (0.1)."""


def check_model(cfg: ModelConfig, where: str) -> None:
    from lmssl.errors import RecipeError

    if cfg.init_from is None:
        if cfg.family not in FAMILIES:
            raise RecipeError(f"{where}.family: unknown model family {cfg.family!r}; known: {', '.join(FAMILIES)}")
        if cfg.size not in SIZES:
            raise RecipeError(f"{where}.size: unknown size {cfg.size!r}; known: {', '.join(SIZES)}")


def build_config(cfg: ModelConfig, tokenizer, max_positions: int):
    """A transformers config for `cfg` with the tokenizer's vocabulary and special ids."""
    from transformers import BertConfig, GPT2Config, LlamaConfig, RobertaConfig

    s = SIZES[cfg.size]
    vocab = len(tokenizer)
    pad = tokenizer.pad_token_id
    common: dict[str, Any] = dict(vocab_size=vocab, pad_token_id=pad)
    if cfg.family in ("bert", "roberta"):
        config_cls = BertConfig if cfg.family == "bert" else RobertaConfig
        extra = {"max_position_embeddings": max_positions}
        if cfg.family == "roberta":
            # RoBERTa numbers positions from pad_token_id + 1, so it needs that many more rows.
            extra.update(max_position_embeddings=max_positions + (pad or 0) + 1, type_vocab_size=1)
        config = config_cls(
            hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
            intermediate_size=s["intermediate"], **extra, **common,
        )
        if cfg.dropout is not None:
            config.hidden_dropout_prob = config.attention_probs_dropout_prob = cfg.dropout
    elif cfg.family == "gpt2":
        config = GPT2Config(
            n_embd=s["hidden"], n_layer=s["layers"], n_head=s["heads"], n_inner=s["intermediate"],
            n_positions=max_positions, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            **common,
        )
        if cfg.dropout is not None:
            config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = cfg.dropout
    else:
        config = LlamaConfig(
            hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
            num_key_value_heads=s["heads"], intermediate_size=s["intermediate"], max_position_embeddings=max_positions,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True, **common,
        )
        if cfg.dropout is not None:
            config.attention_dropout = cfg.dropout
    for key, value in cfg.overrides.items():
        setattr(config, key, value)
    return config


def max_positions_of(config) -> Optional[int]:
    """How many tokens a sequence may hold in a model of this config (None: unbounded)."""
    for key in ("max_position_embeddings", "n_positions"):
        if getattr(config, key, None):
            value = getattr(config, key)
            if getattr(config, "model_type", "") == "roberta":
                return value - (config.pad_token_id or 0) - 1
            return value
    return None


def check_positions(cfg: ModelConfig, max_length: int, where: str) -> None:
    """A recipe error when sequences of max_length tokens would not fit the model's positions:
    a warm start's config (local folders only, read offline) or a positions override."""
    from lmssl.errors import RecipeError

    limit, origin = None, None
    for key in ("max_position_embeddings", "n_positions"):
        if key in cfg.overrides:
            limit, origin = cfg.overrides[key], f"{where}.overrides.{key}"
            if cfg.family == "roberta":
                limit -= 2
    if cfg.init_from and Path(cfg.init_from).expanduser().is_dir():
        from transformers import AutoConfig

        limit, origin = max_positions_of(AutoConfig.from_pretrained(cfg.init_from)), f"{where}.init_from"
    if limit is not None and max_length > limit:
        raise RecipeError(f"{where}: max_length {max_length} is beyond the {limit} positions of the model "
                          f"({origin}); lower max_length to {limit} or less")
