"""Fidelity to the HF path: saved folders survive real clients on long inputs, held-out documents stay
whole, both schedules end where min_lr_ratio says, `defaults: trainer` is the Trainer's, and the stage
timings and throughput mean what they say."""

from __future__ import annotations

import dataclasses
import json
import lzma

import pytest
from conftest import shared_file

from lmssl import load_recipe, run_recipe

CHAIN = """\
name: fidelity
seed: 0
stages:
  - {name: tok, kind: tokenizer, vocab_size: 600, data: {path: "builtin:pydocs", max_samples: 400}}
  - name: pre
    kind: pretrain
    tokenizer_from: tok
    model: {family: bert, size: tiny}
    data: {path: "builtin:pydocs", max_samples: 400}
    max_length: 32
    batch_size: 8
    max_steps: 30
    eval_every: 10
    save_every: 10
  - name: ft
    kind: finetune
    model_from: pre
    tasks: [pydocs-topic]
    max_train_samples: 64
    epochs: 1
    batch_size: 16
"""
LONG_TEXT = ("The standard library documents its modules in docstrings; " * 400)[:20_000]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity")
    (root / "recipe.yaml").write_text(CHAIN)
    outputs = run_recipe(load_recipe(root / "recipe.yaml"), run_dir=root / "run")
    return root / "run", outputs


def test_saved_tokenizers_say_how_many_tokens_their_model_takes(chain):
    run_dir, _ = chain
    assert json.loads((run_dir / "tok" / "tokenizer_config.json").read_text())["model_max_length"] == 512
    for folder in ("pre", "ft/pydocs-topic"):
        config = json.loads((run_dir / folder / "config.json").read_text())
        saved = json.loads((run_dir / folder / "tokenizer_config.json").read_text())["model_max_length"]
        assert saved == config["max_position_embeddings"] == 32, folder


def test_pipelines_with_truncation_run_on_a_20000_character_text(chain):
    from transformers import pipeline

    run_dir, _ = chain
    classify = pipeline("text-classification", model=str(run_dir / "ft" / "pydocs-topic"), device=-1)
    label = classify(LONG_TEXT, truncation=True)[0]["label"]
    assert label in json.loads((run_dir / "ft" / "pydocs-topic" / "config.json").read_text())["id2label"].values()
    fill = pipeline("fill-mask", model=str(run_dir / "pre"), device=-1)
    mask = fill.tokenizer.mask_token
    guesses = fill(f"The {mask} library " + LONG_TEXT, tokenizer_kwargs={"truncation": True})  # its spelling
    assert len(guesses) == 5 and all("token_str" in g for g in guesses)


def test_phase_timings_add_up_to_each_stage_wall_time_and_throughput_is_tokens_over_training_seconds(chain):
    run_dir, outputs = chain
    for stage in ("tok", "pre", "ft"):
        record = json.loads((run_dir / stage / "stage.json").read_text())
        phases = record["phases"]
        assert set(phases) == {"prepare", "train", "eval", "save", "other"}
        named = sum(v for k, v in phases.items() if k != "other")
        # phases are stored rounded to 0.01 s: five of them may be off by 0.025 s together
        assert named == pytest.approx(record["seconds"], rel=0.05, abs=0.03), (stage, phases, record["seconds"])
        assert phases["train"] > 0
    pre = json.loads((run_dir / "pre" / "stage.json").read_text())
    metrics = pre["metrics"]
    assert pre["phases"]["eval"] > 0 and pre["phases"]["save"] > 0          # evaluations and checkpoints ran
    assert metrics["train/tokens_per_s"] == pytest.approx(metrics["train/tokens"] / metrics["time/train_s"], rel=1e-3)
    logged = [json.loads(line) for line in (run_dir / "pre" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in logged if "train/tokens_per_s" in r][-1]
    assert last["train/tokens_per_s"] == pytest.approx(metrics["train/tokens_per_s"], rel=0.05)  # the average
    summary = (run_dir / "summary.md").read_text()
    assert "prepare" in summary and "train" in summary and "eval" in summary
    # FLOP/s: the throughput times the saved model's training FLOPs per token; no MFU on a CPU (no known peak)
    from transformers import AutoModelForMaskedLM

    from lmssl.flops import flops_per_token

    model = AutoModelForMaskedLM.from_pretrained(run_dir / "pre")
    per_token = flops_per_token(model, pre["config"]["max_length"])
    assert metrics["train/flops_per_s"] == pytest.approx(metrics["train/tokens_per_s"] * per_token, rel=1e-6)
    assert "train/mfu" not in metrics and "train/flops_per_s" in pre["headline"]
    assert last["train/flops_per_s"] == pytest.approx(last["train/tokens_per_s"] * per_token, rel=1e-6)


def test_held_out_and_training_documents_never_mix_lines_of_two_sources(tmp_path):
    from lmssl.objectives import OBJECTIVES
    from lmssl.schema import parse_dataclass
    from lmssl.stages.pretrain import Config

    with lzma.open(shared_file("wikitext-2/train.txt.xz"), "rt", encoding="utf-8") as f:
        lines = [line.strip() for line, _ in zip(f, range(6000)) if line.strip() and not line.strip().startswith("=")]
    corpus, documents = tmp_path / "docs.txt", 0
    with open(corpus, "w", encoding="utf-8") as out:  # documents of 1 to 5 real lines, each line tagged
        i = 0
        while i < len(lines):
            size = 1 + documents % 5
            out.write("\n".join(f"doc{documents} {line}" for line in lines[i:i + size]) + "\n\n")
            i, documents = i + size, documents + 1
    raw = {"name": "s", "kind": "pretrain", "objective": "mlm", "tokenizer_from": "x", "documents": "blank_lines",
           "data": {"path": "text", "files": str(corpus), "eval_fraction": 0.1}}
    stage = parse_dataclass(Config, raw, "stages.s")
    splits = OBJECTIVES["mlm"].read(stage, 0, "stages.s")
    for part in (splits.train, splits.eval):
        for text in part["text"]:
            tags = {line.split(" ", 1)[0] for line in text.split("\n")}
            assert len(tags) == 1, tags
    assert len(splits.eval) == pytest.approx(0.1 * documents, abs=2)
    assert splits.metrics["data/eval_documents"] == len(splits.eval)
    assert splits.metrics["data/train_documents"] + len(splits.eval) == documents
    again = OBJECTIVES["mlm"].read(stage, 0, "stages.s")
    other = OBJECTIVES["mlm"].read(stage, 1, "stages.s")
    assert list(again.eval["text"]) == list(splits.eval["text"]) != list(other.eval["text"])   # seeded


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("min_lr_ratio", [None, 0.25])
def test_the_learning_rate_at_the_last_step_is_min_lr_ratio_times_the_peak(tmp_path, schedule, min_lr_ratio):
    from test_training_loop import Regression, config, make_data, make_model

    from lmssl.training import train

    from accelerate import Accelerator

    fields = {"schedule": schedule, "learning_rate": 0.02, "max_steps": 12, "warmup_steps": 2}
    if min_lr_ratio is not None:
        fields["min_lr_ratio"] = min_lr_ratio
    cfg = config(**fields)
    train(Regression(), make_model(), make_data(), None, cfg, Accelerator(cpu=True), tmp_path, None, seed=0,
          accumulation=1)
    lrs = [json.loads(line)["train/lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
           if "train/lr" in line]
    assert len(lrs) == 12 and lrs[1] == pytest.approx(0.02)                        # the peak after warmup ...
    assert lrs[-1] == pytest.approx(0.02 * (min_lr_ratio or 0.0), abs=1e-12)      # ... and where decay ends


def test_defaults_trainer_takes_the_training_arguments_defaults_for_unset_fields():
    from transformers import TrainingArguments

    from lmssl.schema import parse_dataclass
    from lmssl.stages.finetune import Config as FinetuneConfig
    from lmssl.stages.pretrain import Config as PretrainConfig

    hf = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
    stage = parse_dataclass(PretrainConfig, {"defaults": "trainer", "learning_rate": 1e-3}, "stages.s")
    assert stage.learning_rate == 1e-3                                              # written: kept
    assert stage.adam_betas == [hf["adam_beta1"], hf["adam_beta2"]] and stage.adam_eps == hf["adam_epsilon"]
    assert stage.weight_decay == hf["weight_decay"] and stage.max_grad_norm == hf["max_grad_norm"]
    assert stage.schedule == hf["lr_scheduler_type"] and stage.warmup_ratio == 0.0 and stage.min_lr_ratio == 0.0
    assert stage.epochs == hf["num_train_epochs"] and stage.batch_size == hf["per_device_train_batch_size"]
    finetune = parse_dataclass(FinetuneConfig, {"defaults": "trainer"}, "stages.f")
    assert finetune.learning_rate == hf["learning_rate"]
    plain = parse_dataclass(PretrainConfig, {}, "stages.s")
    assert (plain.adam_betas, plain.adam_eps, plain.learning_rate) == ([0.9, 0.98], 1e-6, 5e-4)
