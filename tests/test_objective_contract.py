"""Every entry of OBJECTIVES honours the written contract (objectives/base.py): its class attributes,
its option dataclass, its method signatures, and the behaviour the pretrain stage relies on (a loss
with the declared statistics, features for image methods, a saved folder from_pretrained loads);
and the pretrain stage and the training loop name no method."""

from __future__ import annotations

import contextlib
import os
import sys

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest
import torch

from lmssl.models import FAMILIES
from lmssl.objectives import OBJECTIVES
from lmssl.objectives.base import Objective, Splits
from lmssl.schema import field_docs, parse_dataclass
from lmssl.stages.pretrain import Config

REPO = Path(__file__).resolve().parent.parent
PIPELINES = {"fill-mask", "text-generation", "image-feature-extraction", "feature-extraction"}
DERIVED = {"perplexity", "knn_top1"}  # headline metrics evaluation or the kNN monitor add


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objective_class_declares_what_the_contract_asks(name):
    cls = OBJECTIVES[name]
    for member in ("name", "Options", "families", "modality", "stat_names", "headline", "pipeline_tag",
                   "reports_perplexity", "check", "read", "load_preprocessor", "prepare", "build_model",
                   "check_model", "training_module", "collate", "loss", "features", "save"):
        assert hasattr(cls, member), f"{name} lacks {member}"
    assert cls.name == name
    assert cls.modality in ("text", "image")
    assert cls.families and set(cls.families) <= set(FAMILIES)
    assert cls.pipeline_tag in PIPELINES
    assert cls.stat_names and all(isinstance(s, str) for s in cls.stat_names) and "loss" in cls.stat_names
    assert set(cls.headline) <= set(cls.stat_names) | DERIVED, cls.headline
    assert dataclasses.is_dataclass(cls.Options)
    docs = field_docs(cls.Options)
    assert [f.name for f in dataclasses.fields(cls.Options) if f.name not in docs] == []
    for method in ("check", "read", "load_preprocessor", "prepare", "build_model", "check_model",
                   "training_module", "collate", "loss", "features", "save"):
        wanted = list(inspect.signature(getattr(Objective, method)).parameters)
        got = list(inspect.signature(getattr(cls, method)).parameters)
        assert got[:len(wanted)] == wanted or (got[0] == "cls" and got[1:len(wanted)] == wanted[1:]), \
            (name, method, got, wanted)
    stage = parse_dataclass(Config, {"name": "s", "kind": "pretrain", "objective": name,
                                     "model": {"family": cls.families[0]},
                                     "data": {"path": "builtin:digits" if cls.modality == "image" else "builtin:pydocs"},
                                     "tokenizer_from": "tok" if cls.modality == "text" else None}, "stages.s")
    cls.check(parse_dataclass(cls.Options, {}, "x"), stage, "stages.s")   # the defaults pass their own checks


def text_tokenizer(folder):
    from test_objectives import train_tokenizer, wikitext_lines

    return train_tokenizer("wordpiece", folder, wikitext_lines(limit=800), vocab_size=600)


@contextlib.contextmanager
def host_reads():
    """Every .item(), .tolist(), float(), int() and bool() of a tensor made in the block by an objective's own
    code or the view augmentations it calls (lmssl/data/views.py): on a GPU each one waits for the device.
    As 'file:line method'."""
    names = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")
    originals = {n: getattr(torch.Tensor, n) for n in names}
    calls: list[str] = []

    def counting(name, original):
        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if f"{os.sep}lmssl{os.sep}objectives{os.sep}" in caller or caller.endswith(f"{os.sep}views.py"):
                calls.append(f"{os.path.basename(caller)}:{sys._getframe(1).f_lineno} {name}")
            return original(self, *args, **kwargs)
        return wrapper

    for n, original in originals.items():
        setattr(torch.Tensor, n, counting(n, original))
    try:
        yield calls
    finally:
        for n, original in originals.items():
            setattr(torch.Tensor, n, original)


def plain(value) -> bool:
    """Python data the loop leaves on the host: numbers, strings, None, and tuples, lists and dicts of them
    (a tensor inside would not be moved to the device)."""
    if isinstance(value, (bool, int, float, str, type(None))):
        return True
    if isinstance(value, (tuple, list)):
        return all(plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    return False


def assert_reads_nothing_back(objective, module, batch, monkeypatch):
    """loss() and its backward on the meta device, where tensors have shapes but no values: any read of a
    value (a branch on a mask, boolean-mask indexing, nonzero, a copy to the host) raises there. Such reads
    wait for a GPU on every micro-batch; host_reads sees only the explicit ones. One read is left, inside
    transformers, and is stood in for here: a causal model given no mask first looks for packed documents
    in its position ids (find_packed_sequence_indices), once per forward in eager mode and not at all under
    torch.compile; avoiding it would cost the kernel for plain causal attention."""
    import copy

    from transformers import masking_utils

    autocast = torch.autocast
    monkeypatch.setattr(torch, "autocast", lambda device_type, *a, **k: (
        contextlib.nullcontext() if device_type == "meta" else autocast(device_type, *a, **k)))  # none on meta
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    meta_module = copy.deepcopy(module).to("meta")
    meta_batch = {k: v.to("meta") if torch.is_tensor(v) else v for k, v in batch.items()}
    loss, stats = objective.loss(meta_module, meta_batch)
    loss.backward()
    assert loss.device.type == "meta" and loss.ndim == 0
    assert any(p.grad is not None for p in meta_module.parameters())
    monkeypatch.undo()


def bytebpe_tokenizer(folder):
    from test_objectives import train_tokenizer, wikitext_lines

    return train_tokenizer("bytebpe", folder, wikitext_lines(limit=800), vocab_size=600)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objective_runs_the_stage_sequence_and_saves_a_loadable_folder(name, tmp_path, monkeypatch):
    from accelerate import Accelerator

    from lmssl.rng import seed_all

    cls = OBJECTIVES[name]
    family = cls.families[0]
    raw = {"name": "s", "kind": "pretrain", "objective": name, "model": {"family": family, "size": "tiny"},
           "max_length": 32, "data": {"path": "builtin:digits" if cls.modality == "image" else "builtin:pydocs",
                                      "max_samples": 200, **({"eval_split": "test"} if cls.modality == "image" else {})}}
    if cls.modality == "image":
        raw["model"].update(image_size=16, patch_size=4)
    else:
        tokenizer = text_tokenizer if family == "bert" else bytebpe_tokenizer
        tokenizer(tmp_path / "tok")
        raw["tokenizer_from"] = str(tmp_path / "tok")
    stage = parse_dataclass(Config, raw, "stages.s")
    options = parse_dataclass(cls.Options, {}, "stages.s.objective_args")
    cls.check(options, stage, "stages.s")
    splits = cls.read(stage, 0, "stages.s")
    assert isinstance(splits, Splits) and len(splits.train) > 0
    preprocessor = cls.load_preprocessor(stage, splits.train, lambda ref: ref, "stages.s")
    objective = cls(options, preprocessor, stage.max_length, 0)
    assert isinstance(objective, Objective)
    train = objective.prepare(splits.train)
    seed_all(0)
    model = objective.build_model(stage.model)
    objective.check_model(model, "stages.s")
    module = objective.training_module(model)
    examples = [train[i] for i in range(4)]
    seed_all(1)
    batch = objective.collate(examples)
    assert all(torch.is_tensor(v) or plain(v) for v in batch.values()), {k: type(v) for k, v in batch.items()}
    with host_reads() as reads:
        loss, stats = objective.loss(module, batch)
    assert reads == [], f"{name}.loss() reads tensors back to the host (a device stall per micro-batch): {reads}"
    assert loss.ndim == 0 and loss.requires_grad and torch.isfinite(loss)
    assert set(stats) == set(objective.stat_names)
    assert all(len(pair) == 2 and pair[1] > 0 for pair in stats.values())
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert_reads_nothing_back(objective, module, batch, monkeypatch)
    if cls.modality == "text":        # a padded batch too: its mask must be built without a read as well
        short = dict(examples[0])
        short.update({k: v[:len(v) // 2] for k, v in short.items() if isinstance(v, list) and len(v) > 8})
        seed_all(1)
        padded = objective.collate([short] + examples[1:])
        assert padded.get("padded", True) and padded["input_ids"].shape == batch["input_ids"].shape
        assert_reads_nothing_back(objective, module, padded, monkeypatch)
    features = objective.features(module, batch)
    if cls.modality == "image":
        assert features.shape == (4, model.config.hidden_size) and not features.requires_grad
    else:
        assert features is None
    folder = tmp_path / "out"
    folder.mkdir()
    objective.save(Accelerator(cpu=True), model, folder)
    if cls.modality == "image":
        from transformers import ViTModel
        from transformers.models.auto.image_processing_auto import AutoImageProcessor

        assert ViTModel.from_pretrained(folder).config.image_size == 16
        assert AutoImageProcessor.from_pretrained(folder).size["height"] == 16
    else:
        from transformers import AutoConfig, AutoTokenizer

        assert AutoConfig.from_pretrained(folder).model_type == model.config.model_type
        assert len(AutoTokenizer.from_pretrained(folder)) == len(preprocessor)


def test_pretrain_stage_and_training_loop_name_no_objective():
    """No string in the code that runs a stage, the loop or evaluation is a method's name (the recipe
    field's default, `objective: mlm`, is data, not dispatch)."""
    names = set(OBJECTIVES)
    for path in ("lmssl/stages/pretrain.py", "lmssl/training.py", "lmssl/evaluation.py"):
        tree = ast.parse((REPO / path).read_text())
        functions = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)]
        literals = {node.value for function in functions for node in ast.walk(function)
                    if isinstance(node, ast.Constant) and isinstance(node.value, str)}
        assert functions and not literals & names, (path, literals & names)
