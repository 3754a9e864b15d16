"""The whole chain on CPU with tiny models: tokenizer -> MLM pretraining -> fine-tuning (with a
from-scratch baseline). Outputs reload with the Auto classes; a second run skips every stage."""

from __future__ import annotations

import json
import time

import pytest

from lmssl import load_recipe
from lmssl.runner import run_recipe

TINY_CHAIN = """\
name: tiny-chain
seed: 0
stages:
  - {name: tok, kind: tokenizer, vocab_size: 1500, data: {path: "builtin:pydocs", max_samples: 1500}}
  - name: pre
    kind: pretrain
    tokenizer_from: tok
    model: {family: bert, size: tiny}
    data: {path: "builtin:pydocs", max_samples: 1500}
    max_length: 64
    batch_size: 16
    learning_rate: 2.0e-3
    max_steps: 60
    eval_every: 30
    save_every: 20
  - name: ft
    kind: finetune
    model_from: pre
    tasks: [pydocs-topic]
    scratch_baseline: true
    max_length: 64
    batch_size: 32
    epochs: 2
"""


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    (root / "recipe.yaml").write_text(TINY_CHAIN)
    recipe = load_recipe(root / "recipe.yaml")
    outputs = run_recipe(recipe, run_dir=root / "run")
    return root, recipe, outputs


def test_chain_outputs_reload_with_auto_classes(chain):
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

    root, _, outputs = chain
    run = root / "run"
    tokenizer = AutoTokenizer.from_pretrained(run / "tok")
    pair = tokenizer("first part", "second part")
    assert tokenizer.convert_ids_to_tokens(pair["input_ids"])[0] == "[CLS]"
    assert set(pair["token_type_ids"]) == {0, 1}
    mlm = AutoModelForMaskedLM.from_pretrained(run / "pre")
    assert mlm.config.vocab_size == len(tokenizer)
    assert (run / "pre" / "model.safetensors").exists() and not list((run / "pre").glob("*.bin"))
    clf = AutoModelForSequenceClassification.from_pretrained(run / "ft" / "pydocs-topic")
    assert clf.config.num_labels == 10
    assert not (run / "pre" / "checkpoints").exists(), "checkpoints are removed once a stage completes"
    assert not (run / ".partial").exists()


def test_chain_records_metrics_summary_and_cards(chain):
    root, _, outputs = chain
    run = root / "run"
    record = json.loads((run / "pre" / "stage.json").read_text())
    assert record["metrics"]["steps"] == 60 and record["fingerprint"]
    losses = [json.loads(l)["train/loss"] for l in (run / "pre" / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in l]
    assert losses[-1] < losses[0] - 0.5, "MLM loss should fall within 60 steps"
    assert (run / "pre" / "loss.png").stat().st_size > 1000
    summary = (run / "summary.md").read_text()
    assert "| pretrained | scratch |" in summary and "| pydocs-topic | accuracy | 1 |" in summary
    card = (run / "pre" / "README.md").read_text()
    assert "```yaml" in card and "tiny-chain" in card and "eval/loss" in card
    assert 0.0 <= outputs["ft"].metrics["pydocs-topic/pretrained/accuracy"] <= 1.0


def test_finetuning_keeps_the_best_epoch_by_the_task_metric(chain):
    root, _, _ = chain
    results = json.loads((root / "run" / "ft" / "results.json").read_text())["results"]
    for row in results:
        log = root / "run" / "ft" / "runs" / f"pydocs-topic-{row['init']}-seed0" / "metrics.jsonl"
        per_epoch = [json.loads(l)["eval/accuracy"] for l in log.read_text().splitlines() if "eval/accuracy" in l]
        assert len(per_epoch) >= 2, "scored after every epoch"
        assert row["scores"] == [max(per_epoch)]


def test_second_run_skips_every_finished_stage(chain):
    root, recipe, _ = chain
    started = time.perf_counter()
    outputs = run_recipe(recipe, run_dir=root / "run")
    assert time.perf_counter() - started < 10  # generous: skipping reads three stage.json files
    summary = (root / "run" / "summary.md").read_text()
    assert summary.count("skipped (up to date)") == 3
    assert outputs["pre"].metrics["steps"] == 60


def test_changed_config_reruns_that_stage_and_its_dependents(chain, tmp_path):
    root, _, _ = chain
    changed = load_recipe(root / "recipe.yaml", ["stages.ft.epochs=1"])
    run_recipe(changed, run_dir=root / "run")
    summary = (root / "run" / "summary.md").read_text()
    assert summary.count("skipped (up to date)") == 2
    assert "| ft | finetune | done |" in summary


def test_force_reruns_one_stage_and_an_unknown_name_is_an_error(chain):
    from lmssl.errors import RecipeError

    root, recipe, _ = chain
    run_recipe(recipe, run_dir=root / "run")  # up to date again, whatever the tests before did
    run_recipe(recipe, run_dir=root / "run", force=("tok",))
    summary = (root / "run" / "summary.md").read_text()
    assert "| tok | tokenizer | done |" in summary and summary.count("skipped (up to date)") == 2
    with pytest.raises(RecipeError, match="--force pretrain: no such stage; stages: tok, pre, ft"):
        run_recipe(recipe, run_dir=root / "run", force=("pretrain",))
