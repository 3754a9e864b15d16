"""Masked autoencoders: reconstruct the pixels of randomly masked patches from the visible ones
(He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners", arXiv:2111.06377), on
transformers' `ViTMAEForPreTraining`.

Models built from config get MAE's own initialization (fixed 2-D sine-cosine positions in encoder
and decoder, Xavier-uniform linear layers, N(0, 0.02) tokens): transformers 5.17 leaves both position
tables at zero and initializes linears with N(0, 0.02), and a small MAE built that way learns only
the mean image. Masks come from noise drawn in `collate` from the loop's batch seed, so a resumed
run masks the same patches. The encoder saves as a plain `ViTModel`; the whole model, decoder
included, under pretraining/ for continued pretraining.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import torch

from lmssl.data.views import ViewOptions, apply_views
from lmssl.errors import RecipeError
from lmssl.models import VIT_FIELDS, sincos_positions, warm_start_overrides
from lmssl.schema import Range, check_ranges
from lmssl.objectives.vision import (PRETRAINING_FOLDER, ImageObjective, batch_generator, flatten_views,
                                    stack_images, views_of)



@dataclass
class Options:
    """Options of the mae objective (objective_args in a recipe)."""

    mask_ratio: Annotated[float, Range(0, 1, low_open=True, high_open=True)] = 0.75
    """Share of patches hidden from the encoder (the paper's 75%)."""
    norm_pix_loss: bool = True
    """Predict each patch's pixels normalized by that patch's mean and std (the paper: better features)."""
    decoder_width: Optional[Annotated[int, Range(8, 8192)]] = None
    """Decoder hidden size, a multiple of 4; None: half the encoder's, at least 64 (the paper: 512 beside
    ViT-L's 1024), or a warm-started MAE's own."""
    decoder_depth: Optional[Annotated[int, Range(1, 64)]] = None
    """Decoder blocks; None: 4, or a warm-started MAE's own (the paper's 8 helps linear probing, 1 suffices
    for fine-tuning)."""
    decoder_heads: Optional[Annotated[int, Range(1, 1024)]] = None
    """Decoder attention heads, dividing the width; None: one per 32 channels of width (the paper's 16 at
    512), or a warm-started MAE's own."""
    crop_scale: list[Annotated[float, Range(0, 1, low_open=True)]] = field(default_factory=lambda: [0.2, 1.0])
    """Random resized crop: range of the crop's share of the image (the paper's 0.2 to 1)."""
    flip: Annotated[float, Range(0, 1)] = 0.5
    """Probability of a horizontal flip (0 for data where left and right matter, such as digits)."""

    def check(self, where: str) -> None:
        check_ranges(self, where)
        if self.decoder_width is not None and self.decoder_width % 4:
            raise RecipeError(f"{where}.decoder_width: a multiple of 4 (sine-cosine positions take a quarter each "
                              f"for sin/cos of row and column), got {self.decoder_width!r}")
        width, heads = self.decoder_width, self.decoder_heads
        if heads is not None and width is not None and width % heads:
            raise RecipeError(f"{where}.decoder_heads: a positive divisor of decoder_width, got {heads!r}")
        ViewOptions(crop_scale=self.crop_scale, flip=self.flip).check(where)


DEFAULT_DECODER_DEPTH = 4


def decoder_shape(options: Options, width: int, where: str = "objective_args") -> tuple[int, int, int]:
    """(decoder width, depth, heads) for an encoder of `width` channels: the options', or derived ones."""
    from lmssl.errors import LmsslError

    decoder = options.decoder_width or max(64, width // 2 // 4 * 4)   # sine-cosine positions want a multiple of 4
    if options.decoder_heads is not None:
        if decoder % options.decoder_heads:
            raise LmsslError(f"{where}.decoder_heads: {options.decoder_heads} heads do not divide the decoder "
                             f"width {decoder}; pick a divisor or set decoder_width")
        heads = options.decoder_heads
    else:
        heads = max(h for h in range(1, max(1, decoder // 32) + 1) if decoder % h == 0)
    return decoder, options.decoder_depth or DEFAULT_DECODER_DEPTH, heads


def mae_initialize(model) -> None:
    """MAE's initialization of a ViTMAEForPreTraining built from config (the paper's released code)."""
    nn = torch.nn
    config = model.config
    grid = config.image_size // config.patch_size
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        projection = model.vit.embeddings.patch_embeddings.projection
        nn.init.xavier_uniform_(projection.weight.view(projection.weight.shape[0], -1))  # as a linear layer
        nn.init.zeros_(projection.bias)
        nn.init.normal_(model.vit.embeddings.cls_token, std=0.02)
        nn.init.normal_(model.decoder.mask_token, std=0.02)
        model.vit.embeddings.position_embeddings.copy_(sincos_positions(config.hidden_size, grid)[None])
        model.decoder.decoder_pos_embed.copy_(sincos_positions(config.decoder_hidden_size, grid)[None])


@contextlib.contextmanager
def unmasked(model):
    """Run the MAE encoder on every patch (features, not reconstruction)."""
    saved = model.config.mask_ratio
    model.config.mask_ratio = 0.0
    try:
        yield
    finally:
        model.config.mask_ratio = saved


class MaskedAutoencoder(ImageObjective):
    name = "mae"
    stat_names = ("loss",)
    headline = ("loss", "knn_top1")
    Options = Options

    def build_model(self, model_cfg):
        model = self._build(model_cfg)
        self.num_patches = model.vit.embeddings.patch_embeddings.num_patches
        return model

    def _build(self, model_cfg):
        from transformers import AutoConfig, ViTMAEConfig, ViTMAEForPreTraining, ViTModel

        from lmssl.errors import LmsslError
        from lmssl.models import build_vit_config

        options = self.options
        if model_cfg.init_from:
            source = Path(model_cfg.init_from)
            if (source / PRETRAINING_FOLDER / "config.json").is_file():  # an lmssl mae folder: decoder included
                source = source / PRETRAINING_FOLDER
            config = AutoConfig.from_pretrained(str(source), trust_remote_code=model_cfg.trust_remote_code)
            fields = warm_start_overrides(model_cfg)
            if config.model_type == "vit_mae":  # decoder included: it continues as it was
                saved = (config.decoder_hidden_size, config.decoder_num_hidden_layers,
                         config.decoder_num_attention_heads)
                for key, asked, kept in zip(("decoder_width", "decoder_depth", "decoder_heads"),
                                            (options.decoder_width, options.decoder_depth, options.decoder_heads), saved):
                    if asked is not None and asked != kept:
                        raise LmsslError(f"objective_args.{key}: the warm start {model_cfg.init_from!r} has a decoder "
                                         f"of {key.split('_')[1]} {kept}; drop the key to continue it")
                model = ViTMAEForPreTraining.from_pretrained(str(source), mask_ratio=options.mask_ratio,
                                                             norm_pix_loss=options.norm_pix_loss, **fields)
                return model
            width, depth, heads = decoder_shape(options, config.hidden_size)
            encoder = {k: getattr(config, k) for k in VIT_FIELDS if hasattr(config, k)}
            model = ViTMAEForPreTraining(ViTMAEConfig(**{**encoder, **fields}, **self._decoder_fields(width, depth, heads)))
            mae_initialize(model)
            encoder = ViTModel.from_pretrained(str(source), add_pooling_layer=False)
            missing, _ = model.vit.load_state_dict(encoder.state_dict(), strict=False)  # same names as ViTMAEModel
            if missing:
                raise LmsslError(f"model.init_from: {model_cfg.init_from!r} is not a ViT encoder MAE can continue "
                                 f"(missing {', '.join(missing[:3])})")
            return model
        hidden = build_vit_config(model_cfg, ViTMAEConfig).hidden_size
        width, depth, heads = decoder_shape(options, hidden)
        model = ViTMAEForPreTraining(build_vit_config(model_cfg, ViTMAEConfig,
                                                      **self._decoder_fields(width, depth, heads)))
        mae_initialize(model)
        return model

    def _decoder_fields(self, width: int, depth: int, heads: int) -> dict:
        return dict(decoder_hidden_size=width, decoder_num_hidden_layers=depth, decoder_num_attention_heads=heads,
                    decoder_intermediate_size=4 * width, mask_ratio=self.options.mask_ratio,
                    norm_pix_loss=self.options.norm_pix_loss)

    def collate(self, examples):
        """Images, their crops, and the noise whose argsort masks patches (build_model fixed the patch grid)."""
        images = stack_images(examples)                                     # (n, 3, S, S) uint8
        generator = batch_generator()
        crops = ViewOptions(crop_scale=self.options.crop_scale, flip=self.options.flip, jitter=0.0,
                            grayscale=0.0, blur=0.0)
        views = self.draw(len(examples), crops, generator)
        noise = torch.rand(len(examples), self.num_patches, generator=generator)  # argsort: which patches stay
        return {"images": images, "noise": noise, **flatten_views(views, "views")}

    def loss(self, module, batch):
        images = batch["images"]
        if module.training:   # random resized crops and flips; evaluation reconstructs the images as they are
            pixels = apply_views(images, views_of(batch, "views"), self.size, self.mean, self.std)
        else:
            pixels = self.pixels(images)
        out = module(pixel_values=pixels, noise=batch["noise"])
        n = float(images.shape[0])
        return out.loss, {"loss": (out.loss.detach() * n, n)}

    def encode(self, module, pixel_values):
        model = getattr(module, "module", module)
        fixed = torch.arange(model.vit.embeddings.patch_embeddings.num_patches, device=pixel_values.device)
        with unmasked(model):
            out = model.vit(pixel_values=pixel_values, noise=fixed.expand(pixel_values.shape[0], -1).float())
        return out.last_hidden_state[:, 0]

    def backbone(self, model):
        from transformers import ViTConfig, ViTModel

        config = ViTConfig(**{k: getattr(model.config, k) for k in VIT_FIELDS if hasattr(model.config, k)})
        encoder = ViTModel(config, add_pooling_layer=False)
        encoder.load_state_dict(model.vit.state_dict())            # ViTMAEModel and ViTModel share every name
        return encoder.to(next(model.parameters()).device)

    def save_pretraining(self, model, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(folder), safe_serialization=True)
        (folder / "lmssl.json").write_text(json.dumps({"objective": self.name}), encoding="utf-8")
