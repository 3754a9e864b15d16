"""The objective contract: what the pretrain stage and the one training loop may ask of a
self-supervised method, and the defaults every text or image method shares.

A method is one file holding one class that subclasses `TextObjective` or `ImageObjective` (or
honours `Objective` on its own), plus one entry in OBJECTIVES. The stage calls, in this order:

    options = parse(cls.Options, objective_args); cls.check(options, stage, where)   # before anything runs
    splits = cls.read(stage, seed, where)                       # raw examples (texts, decoded images), once
    preprocessor = cls.load_preprocessor(stage, splits.train, resolve, where)  # tokenizer or image processor
    objective = cls(options, preprocessor, stage.max_length, seed)
    train = objective.prepare(splits.train)                     # tokenize/pack/pair; images are ready as read
    model = objective.build_model(stage.model); objective.check_model(model, where)
    train(objective, ...)                                       # training_module, collate, loss; features (kNN)
    objective.save(accelerator, model, folder)

and shows `eval/<name>` for each name in `headline`. The loop knows no method by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Protocol, runtime_checkable

import torch

from lmssl.errors import RecipeError


@dataclass
class Splits:
    """What `read` gives: the training examples, the held-out ones (or None), and data metrics
    (skipped rows or images, counted); `label_names` for labeled image data."""

    train: Any
    eval: Any = None
    metrics: dict[str, float] = field(default_factory=dict)
    label_names: Optional[list[str]] = None


@runtime_checkable
class Objective(Protocol):
    """The contract. Class attributes describe the method; methods are called as the module docstring says."""

    name: ClassVar[str]
    """The recipe's `objective:` value."""
    Options: ClassVar[type]
    """Its objective_args: a dataclass whose fields carry docstrings; an optional check(where) method checks ranges."""
    families: ClassVar[tuple[str, ...]]
    """Model families it trains from scratch (a warm start may bring another)."""
    modality: ClassVar[str]
    """"text" or "image": which data reader and preprocessor it uses."""
    stat_names: ClassVar[tuple[str, ...]]
    """Statistics `loss` reports as (sum, count) pairs; evaluation averages each over the eval set."""
    headline: ClassVar[tuple[str, ...]]
    """Evaluation metrics the run summary shows (as eval/<name>)."""
    pipeline_tag: ClassVar[str]
    """The Hub pipeline the saved folder serves (fill-mask, text-generation, image-feature-extraction)."""
    reports_perplexity: ClassVar[bool]
    """Whether evaluation adds exp(loss) as perplexity."""
    unused_fields: ClassVar[tuple[str, ...]]
    """Pretrain-stage fields (a.b for nested ones) this method has no use for: writing one is a recipe error."""
    streams: ClassVar[bool]
    """Whether it trains from a stream (data.streaming): then `packing()` says how documents become blocks, and
    the stream tokenizes, packs and collates in DataLoader workers, nothing prepared first."""

    @classmethod
    def check(cls, options, stage, where: str) -> None:
        """Recipe errors before anything runs (`where` is the stage's key path): option ranges, stage
        fields this method needs or refuses."""

    @classmethod
    def read(cls, stage, seed: int, where: str) -> Splits:
        """Read and clean stage.data once: training and held-out examples, bad ones skipped and counted."""

    @classmethod
    def load_preprocessor(cls, stage, train, resolve, where: str):
        """The tokenizer (text) or image processor (image) the method and its saved folder use."""

    def prepare(self, dataset):
        """Turn read examples into training examples (tokenize, pack, pair), once, cached."""

    def packing(self):
        """Methods that stream: the data.packing.Packing that `prepare` applies (tokens to blocks)."""

    def build_model(self, model_cfg) -> torch.nn.Module:
        """A transformers model (from config or model_cfg.init_from) that from_pretrained loads back."""

    def check_model(self, model, where: str) -> None:
        """Errors the built model reveals (sequences beyond its positions, images of another size)."""

    def training_module(self, model) -> torch.nn.Module:
        """The module the loop trains and checkpoints: the model, or the model wrapped with heads (a method
        may keep it, to save its heads beside the model: SimCLR's projection head)."""

    def collate(self, examples: list[dict]) -> dict[str, Any]:
        """One batch: padding, masks, views. The loop has seeded every RNG for this batch. Values are tensors
        (the loop moves them to the device) or plain Python data (numbers, strings, tuples and dicts of them),
        which stay on the host as they are: what loss() must know to choose a branch goes there, computed
        here from CPU tensors, so that loss() never reads it back from the device (views.plan_views)."""

    def loss(self, module, batch) -> tuple[torch.Tensor, dict[str, tuple[float, float]]]:
        """The training loss and its statistics, (sum, count) per name in stat_names. Sums (and counts) may be
        tensors on the batch's device and should be: the loop adds them up there and reads them once per
        log_every, so a `.item()` here would stall the device on every micro-batch."""

    def features(self, module, batch) -> Optional[torch.Tensor]:
        """(batch, dim) embeddings of a batch's evaluation view, for the kNN monitor; None: not an encoder of images."""

    def after_step(self, module, step: int, total_steps: int) -> None:
        """Called on every process after each optimizer step (`step` counts from 1), with the unwrapped
        training module: momentum teachers and target networks follow the online weights here (an EMA
        whose momentum is a function of the step, so a resumed run repeats it exactly)."""

    def save(self, accelerator, model, folder) -> None:
        """Write what the stage hands on: model and preprocessor, loadable with from_pretrained."""


class BaseObjective:
    """Defaults shared by every method: option checks, the model as its own training module, no features."""

    reports_perplexity: ClassVar[bool] = False
    unused_fields: ClassVar[tuple[str, ...]] = ()
    streams: ClassVar[bool] = False

    def __init__(self, options, preprocessor, max_length: Optional[int] = None, seed: int = 0):
        """`max_length`: tokens per sequence (text; image methods take their size from the processor);
        `seed`: the recipe's, for anything drawn once in `prepare` (sentence pairs)."""
        self.options, self.preprocessor, self.max_length, self.seed = options, preprocessor, max_length, seed

    @classmethod
    def check(cls, options, stage, where: str) -> None:
        from lmssl.data.builtin import modality_of

        if hasattr(options, "check"):
            options.check(f"{where}.objective_args")
        held = modality_of(stage.data.path)
        if held is not None and held != cls.modality:
            raise RecipeError(f"{where}.data.path: {stage.data.path} holds {held}s; the {cls.name} objective "
                              f"trains on {cls.modality}s")
        if stage.model.init_from is None and stage.model.family not in cls.families:
            raise RecipeError(f"{where}.model.family: the {cls.name} objective needs one of "
                              f"{', '.join(cls.families)}, not {stage.model.family!r}")

    def check_model(self, model, where: str) -> None:
        return None

    def training_module(self, model) -> torch.nn.Module:
        return model

    def after_step(self, module, step: int, total_steps: int) -> None:
        """No teacher to update."""

    def features(self, module, batch) -> Optional[torch.Tensor]:
        return None

    def packing(self):
        """None: the method does not stream (streams is False)."""
        return None


class TextObjective(BaseObjective):
    """Text methods: documents from stage.data (bad rows skipped and counted), a trained tokenizer,
    sequences of stage.max_length tokens, the model saved with its tokenizer."""

    modality: ClassVar[str] = "text"
    unused_fields: ClassVar[tuple[str, ...]] = ("image_mean", "image_std", "knn", "data.image_column")

    def __init__(self, options, preprocessor, max_length: Optional[int] = 128, seed: int = 0):
        super().__init__(options, preprocessor, max_length, seed)
        self.tokenizer = preprocessor

    @classmethod
    def check(cls, options, stage, where: str) -> None:
        super().check(options, stage, where)
        if stage.max_length < 8:
            raise RecipeError(f"{where}.max_length: {stage.max_length} tokens is too short to train on; "
                              "use 64 or more")
        if stage.tokenizer_from is None and stage.model.init_from is None:
            raise RecipeError(f"{where}.tokenizer_from: a model trained from scratch needs a tokenizer "
                              "stage or folder")

    @classmethod
    def read(cls, stage, seed: int, where: str) -> Splits:
        """Documents from stage.data; without an eval_split, eval_fraction of the *documents* is held out
        (rows are documents, or lines grouped first: a held-out document never mixes two sources)."""
        from lmssl.data.cleaning import clean_texts
        from lmssl.data.text import hold_out_rows, load_splits, to_documents

        blank = stage.documents == "blank_lines"
        train_text, eval_text = load_splits(stage.data, seed, where, hold_out=not blank)
        column, limit = stage.data.column, stage.data.max_chars
        train_text, metrics = clean_texts(train_text, column, limit, f"{where}.data", blank)
        train = to_documents(train_text, column, stage.documents)
        if eval_text is not None:
            eval_text, _ = clean_texts(eval_text, column, limit, f"{where}.data", blank)
            eval_text = to_documents(eval_text, column, stage.documents)
        elif blank and stage.data.eval_split is None:
            train, eval_text = hold_out_rows(train, stage.data.eval_fraction, seed)
        metrics = dict(metrics, **{"data/train_documents": float(len(train)),
                                   "data/eval_documents": float(len(eval_text) if eval_text is not None else 0)})
        return Splits(train, eval_text, metrics)

    @classmethod
    def read_stream(cls, stage, seed: int, where: str) -> Splits:
        """A streamed stage.data: the training split as an unread IterableDataset of rows (cleaned, made
        documents and packed as it is read: lmssl.data.streaming), the eval_split read whole as `read` reads it
        (no eval_split: no evaluation, since a fraction of a stream of unknown length cannot be held out)."""
        from lmssl.data.cleaning import clean_texts
        from lmssl.data.streaming import open_source
        from lmssl.data.text import _materialize, stream_split, to_documents

        train = open_source(stage.data, where)
        eval_text = None
        if stage.data.eval_split:
            eval_text = _materialize(stream_split(stage.data, stage.data.eval_split), stage.data.column, None, where)
            eval_text, _ = clean_texts(eval_text, stage.data.column, stage.data.max_chars, f"{where}.data",
                                       stage.documents == "blank_lines")
            eval_text = to_documents(eval_text, stage.data.column, stage.documents)
        return Splits(train, eval_text, {"data/eval_documents": float(len(eval_text) if eval_text is not None else 0)})

    @classmethod
    def load_preprocessor(cls, stage, train, resolve, where: str):
        from transformers import AutoTokenizer

        source = resolve(stage.tokenizer_from) or stage.model.init_from
        return AutoTokenizer.from_pretrained(str(source), trust_remote_code=stage.model.trust_remote_code)

    def check_model(self, model, where: str) -> None:
        from lmssl.errors import LmsslError
        from lmssl.models import max_positions_of

        limit = max_positions_of(model.config)
        if limit is not None and self.max_length > limit:
            raise LmsslError(f"{where}.max_length: {self.max_length} is beyond the {limit} positions of the "
                             f"model; lower it to {limit} or less")

    def save(self, accelerator, model, folder) -> None:
        from lmssl.hub import save_model
        from lmssl.models import fit_tokenizer

        fit_tokenizer(self.tokenizer, model)
        save_model(accelerator, model, folder, self.tokenizer)
