"""The `pretrain` stage: self-supervised training of a transformers model with one objective."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from lmssl.errors import RecipeError
from lmssl.models import ModelConfig, check_model, check_positions
from lmssl.recipe import DataConfig, TrainingConfig, parse_dataclass


@dataclass
class Config(TrainingConfig):
    objective: str = "mlm"
    """The self-supervised objective: mlm, mlm_nsp, sop (BERT only) or causal_lm (gpt2, llama)."""
    objective_args: dict[str, Any] = field(default_factory=dict)
    """The objective's own options, e.g. {mask_rate: 0.15} for mlm."""
    tokenizer_from: Optional[str] = None
    """A tokenizer stage, folder or hub id; None takes the tokenizer of model.init_from."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture family and size, or a checkpoint to warm-start from."""
    data: DataConfig = field(default_factory=DataConfig)
    """The unlabeled text."""
    documents: Literal["rows", "blank_lines"] = "rows"
    """What a document is: rows (each row of data.column) or blank_lines (rows are lines of text
    and blank lines end a document, as in WikiText). NSP/SOP pairs and EOS joins follow documents."""
    max_length: int = 128
    """Tokens per training sequence, the causal block size (BERT pretrains mostly at 128)."""

    REFERENCES = {"tokenizer_from": ("tokenizer",)}

    def check(self, recipe, earlier, where: str) -> None:
        from lmssl.objectives import OBJECTIVES

        if self.objective not in OBJECTIVES:
            raise RecipeError(f"{where}.objective: unknown objective {self.objective!r}; known: {', '.join(OBJECTIVES)}")
        objective = OBJECTIVES[self.objective]
        options = parse_dataclass(objective.Options, self.objective_args, f"{where}.objective_args")
        if hasattr(objective, "check_options"):
            objective.check_options(options, f"{where}.objective_args")
        check_model(self.model, f"{where}.model")
        if self.model.init_from is None and self.model.family not in objective.families:
            raise RecipeError(
                f"{where}.model.family: the {self.objective} objective needs one of "
                f"{', '.join(objective.families)}, not {self.model.family!r}"
            )
        if self.max_length < 8:
            raise RecipeError(f"{where}.max_length: {self.max_length} tokens is too short to train on; use 64 or more")
        check_positions(self.model, self.max_length, f"{where}.model")
        if self.tokenizer_from is None and self.model.init_from is None:
            raise RecipeError(f"{where}.tokenizer_from: a model trained from scratch needs a tokenizer stage or folder")
        self.data.check(f"{where}.data")


def run(cfg: Config, ctx):
    from transformers import AutoTokenizer

    from lmssl.data.cleaning import clean_texts
    from lmssl.data.text import load_splits, to_documents
    from lmssl.errors import LmsslError
    from lmssl.hub import save_model, write_model_card
    from lmssl.models import max_positions_of
    from lmssl.objectives import OBJECTIVES
    from lmssl.runner import StageResult
    from lmssl.training import train

    where = f"stages.{cfg.name}"
    tokenizer = AutoTokenizer.from_pretrained(str(ctx.resolve(cfg.tokenizer_from) or cfg.model.init_from),
                                              trust_remote_code=cfg.model.trust_remote_code)
    objective_cls = OBJECTIVES[cfg.objective]
    objective = objective_cls(parse_dataclass(objective_cls.Options, cfg.objective_args, where), tokenizer,
                              cfg.max_length)
    if hasattr(objective, "seed"):
        objective.seed = ctx.seed  # sentence pairs are drawn once, from the recipe's seed
    with ctx.main_process_first():
        train_text, eval_text = load_splits(cfg.data, ctx.seed, where)
        blank = cfg.documents == "blank_lines"
        train_text, skipped = clean_texts(train_text, cfg.data.column, cfg.data.max_chars, f"{where}.data", blank)
        if eval_text is not None:
            eval_text, _ = clean_texts(eval_text, cfg.data.column, cfg.data.max_chars, f"{where}.data", blank)
        train_data = objective.prepare(to_documents(train_text, cfg.data.column, cfg.documents), "text")
        eval_data = None
        if eval_text is not None:
            eval_data = objective.prepare(to_documents(eval_text, cfg.data.column, cfg.documents), "text")
    model = objective.build_model(cfg.model)
    limit = max_positions_of(model.config)
    if limit is not None and cfg.max_length > limit:
        raise LmsslError(f"{where}.max_length: {cfg.max_length} is beyond the {limit} positions of "
                         f"{cfg.model.init_from or cfg.model.family}; lower it to {limit} or less")
    result = train(objective, model, train_data, eval_data, cfg, ctx.accelerator, ctx.out_dir, ctx.ckpt_dir,
                   ctx.seed, ctx.gradient_accumulation_steps, desc=cfg.name)
    save_model(ctx.accelerator, model, ctx.out_dir, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    metrics = dict(result.metrics, **skipped, steps=result.steps, parameters=n_params,
                   train_examples=len(train_data), eval_examples=len(eval_data) if eval_data is not None else 0)
    if ctx.is_main:
        family = model.config.model_type
        write_model_card(
            ctx.out_dir, title=f"{family} pretrained with {cfg.objective} ({cfg.name})",
            summary=f"A {n_params / 1e6:.1f}M-parameter {family} model pretrained from "
                    f"{'scratch' if not cfg.model.init_from else cfg.model.init_from} with the `{cfg.objective}` "
                    f"objective for {result.steps} steps on `{cfg.data.path}` by lmssl.",
            recipe_raw=ctx.recipe_raw, stage_name=cfg.name, metrics=metrics,
            pipeline_tag="fill-mask" if cfg.objective.startswith(("mlm", "sop")) else "text-generation",
            tags=(cfg.objective, family),
        )
    shown = ("eval/loss", "eval/mlm_loss", "eval/accuracy", "eval/perplexity", "eval/nsp_accuracy",
             "eval/sop_accuracy", "steps")
    headline = {k: v for k, v in metrics.items() if k in shown or k.startswith("data/skipped")}
    return StageResult(ctx.out_dir, metrics, headline=headline)
