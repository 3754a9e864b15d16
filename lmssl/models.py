"""Model families and size presets, built from config: text families with a trained tokenizer's
vocabulary, the `vit` family with an image and patch size.

Objectives choose the head (AutoModelForMaskedLM, BertForPreTraining, AutoModelForCausalLM,
ViTMAEForPreTraining, ViTModel + projection, ...); this module only says what a "bert/tiny" or
"vit/vit-s" is, so every output reloads with `from_pretrained`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

from lmssl.schema import Range

if TYPE_CHECKING:
    import torch

# hidden, layers, heads, intermediate. mini/small/medium/base follow Turc et al. 2019 (BERT miniatures); tiny is
# half BERT-Tiny's width (2x64, not 2x128): the size the tests train in seconds.
SIZES = {
    "tiny": dict(hidden=64, layers=2, heads=2, intermediate=256),
    "mini": dict(hidden=256, layers=4, heads=4, intermediate=1024),
    "small": dict(hidden=512, layers=4, heads=8, intermediate=2048),
    "medium": dict(hidden=512, layers=8, heads=8, intermediate=2048),
    "base": dict(hidden=768, layers=12, heads=12, intermediate=3072),
}
# The ViT paper's sizes (Dosovitskiy et al. 2021, table 1; Ti from Touvron et al. 2021, DeiT), at 224 pixels
# with 16-pixel patches unless the recipe says otherwise. The sizes above serve vit too, at CIFAR scale
# (32 pixels, 4-pixel patches: 64 patches, as in CIFAR ViT baselines).
VIT_SIZES = {
    "vit-ti": dict(hidden=192, layers=12, heads=3, intermediate=768),
    "vit-s": dict(hidden=384, layers=12, heads=6, intermediate=1536),
    "vit-b": dict(hidden=768, layers=12, heads=12, intermediate=3072),
}
VIT_INPUT = {"vit-ti": (224, 16), "vit-s": (224, 16), "vit-b": (224, 16)}  # (image_size, patch_size)
# What makes two ViT encoders the same architecture; with the training-time fields, what a ViTConfig and a
# ViTMAEConfig share (an MAE encoder saves as a ViTModel of the same shape).
VIT_SHAPE = ("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "intermediate_size", "hidden_act", "qkv_bias", "layer_norm_eps")
VIT_FIELDS = VIT_SHAPE + ("hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range")
CIFAR_INPUT = (32, 4)
FAMILIES = ("bert", "roberta", "gpt2", "llama", "vit")
MASKED_FAMILIES = ("bert", "roberta")
CAUSAL_FAMILIES = ("gpt2", "llama")
IMAGE_FAMILIES = ("vit",)


@dataclass
class ModelConfig:
    """Which transformer to pretrain: a family and size from scratch, or a checkpoint to continue."""

    family: str = "bert"
    """Architecture family: bert, roberta (masked), gpt2, llama (causal), vit (images)."""
    size: str = "tiny"
    """Size preset: tiny (2x64), mini (4x256), small (4x512), medium (8x512), base (12x768); for vit also
    vit-ti (12x192), vit-s (12x384), vit-b (12x768)."""
    init_from: Optional[str] = None
    """Warm start from a folder or hub id instead of random initialization."""
    revision: Optional[str] = None
    """init_from's branch, tag or commit when it is a hub id (pin it for a reproducible run); None reads main."""
    trust_remote_code: bool = False
    """Run model code shipped inside init_from (a security decision: off unless you trust that repository)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Any transformers config field, e.g. {hidden_dropout_prob: 0.0, num_hidden_layers: 6}."""
    dropout: Optional[Annotated[float, Range(0, 1, high_open=True)]] = None
    """Dropout on hidden states and attention; None keeps the family default (0.1; 0 for vit, as in ViT pretraining)."""
    image_size: Optional[Annotated[int, Range(4, 4096)]] = None
    """vit: input side in pixels; None takes the size's default (224 for vit-ti/s/b, 32 for the others)."""
    patch_size: Optional[Annotated[int, Range(1, 512)]] = None
    """vit: patch side in pixels, dividing image_size; None takes the size's default (16 for vit-ti/s/b, else 4)."""


# The config class of each family, and what it calls the width and the head count.
CONFIG_CLASSES = {"bert": "BertConfig", "roberta": "RobertaConfig", "gpt2": "GPT2Config", "llama": "LlamaConfig",
                  "vit": "ViTConfig"}
SHAPE_KEYS = {"gpt2": ("n_embd", "n_head")}


def check_model(cfg: ModelConfig, where: str) -> None:
    """Recipe errors about a model before any data is read: family and size, image and patch sizes, a
    width the heads do not divide, and overrides the family's config does not know."""
    from lmssl.errors import RecipeError

    if cfg.init_from is None:
        if cfg.family not in FAMILIES:
            raise RecipeError(f"{where}.family: unknown model family {cfg.family!r}; known: {', '.join(FAMILIES)}")
        sizes = {**SIZES, **VIT_SIZES} if cfg.family in IMAGE_FAMILIES else SIZES
        if cfg.size not in sizes:
            raise RecipeError(f"{where}.size: unknown size {cfg.size!r} for {cfg.family}; known: {', '.join(sizes)}")
        _check_overrides(cfg, where)
    if cfg.family not in IMAGE_FAMILIES:
        for key in ("image_size", "patch_size"):
            if getattr(cfg, key) is not None:
                raise RecipeError(f"{where}.{key}: only the vit family has an image size; drop it for {cfg.family}")
        return
    if cfg.init_from is None:
        image, patch = vit_input(cfg)
        if image % patch:
            raise RecipeError(f"{where}.patch_size: {patch} does not divide image_size {image}; "
                              f"use a divisor such as {max(d for d in range(1, patch + 1) if image % d == 0)}")
        hidden = cfg.overrides.get("hidden_size", {**SIZES, **VIT_SIZES}[cfg.size]["hidden"])
        if hidden % 4:
            raise RecipeError(f"{where}.overrides.hidden_size: {hidden} must be a multiple of 4 (fixed 2-D "
                              "sine-cosine positions use a quarter each)")


def _check_overrides(cfg: ModelConfig, where: str) -> None:
    """Override keys the family's transformers config knows, and a width its head count divides."""
    import difflib

    import transformers

    from lmssl.errors import RecipeError

    known = set(vars(getattr(transformers, CONFIG_CLASSES[cfg.family])()))
    for key in cfg.overrides:
        if key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=1)
            raise RecipeError(f"{where}.overrides.{key}: {CONFIG_CLASSES[cfg.family]} has no field {key!r}"
                              + (f"; did you mean {near[0]!r}?" if near else ""))
    width_key, heads_key = SHAPE_KEYS.get(cfg.family, ("hidden_size", "num_attention_heads"))
    preset = {**SIZES, **VIT_SIZES}[cfg.size]
    width, heads = cfg.overrides.get(width_key, preset["hidden"]), cfg.overrides.get(heads_key, preset["heads"])
    if not (isinstance(width, int) and isinstance(heads, int)) or heads < 1 or width % heads:
        raise RecipeError(f"{where}.overrides: a width of {width} ({width_key}) is not divided by {heads} attention "
                          f"heads ({heads_key}); each head takes an equal share")


def warm_start_overrides(cfg: ModelConfig) -> dict[str, Any]:
    """Config fields a warm start takes from the recipe (from_pretrained keyword arguments): overrides, and
    the dropout as the family names it."""
    fields = dict(cfg.overrides)
    if cfg.dropout is not None and cfg.family in IMAGE_FAMILIES:
        fields.update(hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout)
    return fields


def vit_input(cfg: ModelConfig) -> tuple[int, int]:
    """(image_size, patch_size) of a vit model config: the recipe's, else the size preset's."""
    image, patch = VIT_INPUT.get(cfg.size, CIFAR_INPUT)
    return cfg.image_size or image, cfg.patch_size or patch


def build_vit_config(cfg: ModelConfig, config_cls, **extra):
    """A ViTConfig (or ViTMAEConfig, passed as config_cls) for `cfg`; `extra` adds head-specific fields."""
    s = {**SIZES, **VIT_SIZES}[cfg.size]
    image, patch = vit_input(cfg)
    dropout = cfg.dropout or 0.0
    config = config_cls(image_size=image, patch_size=patch, num_channels=3, hidden_size=s["hidden"],
                        num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                        intermediate_size=s["intermediate"], hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout, layer_norm_eps=1e-6, **extra)
    for key, value in cfg.overrides.items():
        setattr(config, key, value)
    return config


def sincos_positions(dim: int, grid: int) -> torch.Tensor:
    """(1 + grid**2, dim) fixed 2-D sine-cosine position embeddings, zero for the CLS token first:
    the first half encodes the patch's row, the second its column, each as [sin | cos] over
    dim/4 frequencies 1/10000^(i/(dim/4)) (He et al. 2022, "Masked Autoencoders Are Scalable
    Vision Learners", after Vaswani et al. 2017)."""
    import torch

    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")

    def encode(position):                                                  # (grid*grid,) -> (grid*grid, dim/2)
        angles = position.reshape(-1, 1) * omega[None]
        return torch.cat([angles.sin(), angles.cos()], 1)

    table = torch.cat([encode(rows), encode(cols)], 1)                     # (grid*grid, dim)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table], 0).float()


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
        # gelu_pytorch_tanh: GPT-2's own tanh-approximated GELU (gelu_new), computed by one fused PyTorch kernel
        # instead of five elementwise passes (10% of a small model's CPU step)
        config = GPT2Config(
            n_embd=s["hidden"], n_layer=s["layers"], n_head=s["heads"], n_inner=s["intermediate"],
            n_positions=max_positions, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            activation_function="gelu_pytorch_tanh", **common,
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


def fit_tokenizer(tokenizer, model) -> None:
    """Make the tokenizer say how many tokens its model takes (model_max_length = the model's positions),
    so clients that truncate (pipelines with truncation=True) never feed it more."""
    limit = max_positions_of(model.config)
    if limit is not None:
        tokenizer.model_max_length = limit


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


def encoder_mask(model, attention_mask: Optional[torch.Tensor], padded: bool = True) -> Optional[torch.Tensor]:
    """The attention mask to hand an encoder so that building it reads nothing back from the device. From a
    2D padding mask transformers first checks whether every token is real (`mask.all()`, a wait for the GPU
    on every forward) to leave the mask out. Here the collate says so on the host (`padded`): no padding,
    no mask (so SDPA may pick its fastest kernel); padding under SDPA attention, the 4D boolean key mask
    transformers would build (True: attend), which it takes as it is. Other attention implementations
    get the 2D mask."""
    if attention_mask is None or not padded:
        return None
    if attention_mask.ndim == 2 and getattr(model.config, "_attn_implementation", None) == "sdpa":
        return attention_mask.bool()[:, None, None, :]
    return attention_mask


def is_padded(rows) -> bool:
    """Whether right-padding these rows to the longest adds any padding (a host-side fact for encoder_mask)."""
    lengths = {len(r) for r in rows}
    return len(lengths) > 1
