"""Sharing on the Hub, against the local emulator (tests/hub_emulator.py) driven by the real
huggingface_hub client: a recipe pushes its tokenizer, pretrained model (with a branch per checkpoint)
and fine-tuned model; each loads back identical; every card validates and its model-index carries the
run's numbers; the token appears nowhere; failed pushes leave complete local outputs and are retried;
an uncached hub input offline is an exit-2 error at once."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml

from hub_emulator import hub  # noqa: F401  (the fixture)
from lmssl.__main__ import main

DATA = {"path": "builtin:pydocs", "max_samples": 300}


def _csv(path: Path) -> str:
    """A two-class task from real text: pydocs lines about strings against the rest."""
    from lmssl.data.builtin import builtin_file

    rows = [json.loads(line)["text"] for line in builtin_file("pydocs").read_text().splitlines()[:400]]
    lines = ["sentence,label"] + [f'"{r[:200].replace(chr(34), "")}",{int("str" in r)}' for r in rows if r.strip()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _recipe(tmp_path: Path, user: str, **pre_push) -> Path:
    stages = [
        {"name": "tok", "kind": "tokenizer", "vocab_size": 400, "data": DATA,
         "push_to_hub": {"repo_id": f"{user}/tok"}},
        {"name": "pre", "kind": "pretrain", "tokenizer_from": "tok", "model": {"family": "bert", "size": "tiny"},
         "data": DATA, "max_length": 32, "batch_size": 8, "max_steps": 9, "save_every": 4,
         "push_to_hub": {"repo_id": f"{user}/pre", "strategy": "checkpoints", **pre_push}},
        {"name": "ft", "kind": "finetune", "model_from": "pre", "epochs": 1, "batch_size": 16,
         "tasks": [{"name": "strings", "data": {"path": "csv", "files": _csv(tmp_path / "task.csv")}}],
         "push_to_hub": {"repo_id": f"{user}/ft-{{name}}"}},
    ]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "shared", "license": "apache-2.0", "stages": stages}, sort_keys=False))
    return path


@pytest.fixture
def no_backoff(monkeypatch):
    """The client retries server errors and lost connections with 1-8 s sleeps; tests skip the sleeping."""
    import types

    from huggingface_hub.utils import _http

    monkeypatch.setattr(_http, "time", types.SimpleNamespace(**{**vars(time), "sleep": lambda seconds: None}))


def _same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_a_recipe_shares_its_tokenizer_pretrained_and_finetuned_models(hub, tmp_path, capfd):
    """One run (tokenizer, pretraining with checkpoint branches, fine-tuning), four sets of checks; then a
second recipe reads the pushed model back by hub id and revision."""
    recipe = _recipe(tmp_path, hub.user)
    assert main(["run", str(recipe), "--run-dir", str(tmp_path / "run")]) == 0
    shared_run = tmp_path / "run", "".join(capfd.readouterr())
    check_models_load_back_identical(hub, shared_run)
    check_one_loadable_branch_per_saved_step(hub, shared_run)
    check_cards_validate_and_carry_the_results(hub, shared_run)
    check_the_token_is_nowhere(hub, shared_run)
    check_hub_inputs_with_revisions(hub, tmp_path)


def check_models_load_back_identical(hub, shared_run):
    from huggingface_hub import HfApi
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

    run, _ = shared_run
    user = hub.user
    local_tok, remote_tok = AutoTokenizer.from_pretrained(run / "tok"), AutoTokenizer.from_pretrained(f"{user}/tok")
    assert remote_tok.get_vocab() == local_tok.get_vocab() and len(remote_tok) == 400
    _same_weights(AutoModelForMaskedLM.from_pretrained(f"{user}/pre"), AutoModelForMaskedLM.from_pretrained(run / "pre"))
    _same_weights(AutoModelForSequenceClassification.from_pretrained(f"{user}/ft-strings"),
                  AutoModelForSequenceClassification.from_pretrained(run / "ft" / "strings"))
    assert HfApi().model_info(f"{user}/pre").private is True          # private by default
    files = hub.files(f"{user}/pre")
    assert "loss.png" in files and "model.safetensors" in files
    assert not any(name.startswith(("checkpoints/", "tensorboard/", ".")) or name.endswith(".jsonl")
                   for name in files if name != ".gitattributes")
    record = json.loads((run / "ft" / "stage.json").read_text())
    assert [p["repo_id"] for p in record["pushed"]] == [f"{user}/ft-strings"]


def check_one_loadable_branch_per_saved_step(hub, shared_run):
    from huggingface_hub import HfApi
    from transformers import AutoModelForMaskedLM

    run, printed = shared_run
    branches = {b.name for b in HfApi().list_repo_refs(f"{hub.user}/pre").branches}
    assert branches == {"main", "step-4", "step-8"}
    final = AutoModelForMaskedLM.from_pretrained(f"{hub.user}/pre")
    earlier = [AutoModelForMaskedLM.from_pretrained(f"{hub.user}/pre", revision=b) for b in ("step-4", "step-8")]
    for model in earlier:   # each branch is its own step's weights, not the final ones
        assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), final.parameters()))
    assert not torch.equal(next(earlier[0].parameters()), next(earlier[1].parameters()))
    assert "pushed step-4" in printed and not (run / "pre" / ".hub-snapshots").exists()


def check_cards_validate_and_carry_the_results(hub, shared_run):
    from huggingface_hub import ModelCard

    run, _ = shared_run
    cards = {name: ModelCard.load(f"{hub.user}/{name}") for name in ("tok", "pre", "ft-strings")}
    for name, card in cards.items():
        card.validate()                                              # the (emulated) Hub's validate-yaml
        assert card.data.license == "apache-2.0" and "lmssl" in card.data.tags, name
        assert "## Usage" in card.text and f'from_pretrained("{hub.user}/{name}")' in card.text, name
        assert "## Training run" in card.text and "hardware" in card.text, name
    assert "## Report card" in cards["tok"].text and "fertility" in cards["tok"].text
    assert cards["pre"].data.pipeline_tag == "fill-mask" and {"mlm", "bert"} <= set(cards["pre"].data.tags)
    assert "AutoModelForMaskedLM" in cards["pre"].text and "![training and evaluation curves](loss.png)" in cards["pre"].text
    stage = json.loads((run / "pre" / "stage.json").read_text())
    pre_results = {r.metric_type: r.metric_value for r in cards["pre"].data.eval_results}
    assert pre_results == {"accuracy": stage["metrics"]["eval/accuracy"], "loss": stage["metrics"]["eval/loss"]}
    ft = cards["ft-strings"].data
    assert ft.base_model == f"{hub.user}/pre" and ft.pipeline_tag == "text-classification"
    rows = json.loads((run / "ft" / "results.json").read_text())["results"]
    expected = {r["metric"]: r["mean"] for r in rows if r["init"] == "pretrained"}
    assert {r.metric_type: r.metric_value for r in ft.eval_results} == expected and expected
    assert all(r.task_type == "text-classification" and r.dataset_split == "validation" for r in ft.eval_results)


def check_the_token_is_nowhere(hub, shared_run):
    run, printed = shared_run
    assert hub.token not in printed
    for path in run.rglob("*"):
        if path.is_file():
            assert hub.token.encode() not in path.read_bytes(), path
    for repo in ("tok", "pre", "ft-strings"):
        for name, content in hub.files(f"{hub.user}/{repo}").items():
            assert hub.token.encode() not in content, (repo, name)


@pytest.mark.parametrize("failure", ["500", "401", "unreachable"])
def test_a_failed_push_leaves_complete_local_outputs_and_lmssl_push_succeeds_later(hub, no_backoff, tmp_path, capsys,
                                                                                monkeypatch, failure):
    import lmssl.sharing

    stage = {"name": "tok", "kind": "tokenizer", "vocab_size": 300, "data": DATA,
             "push_to_hub": {"repo_id": f"{hub.user}/tok-{failure}"}}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "t", "stages": [stage]}))
    if failure == "unreachable":
        monkeypatch.setattr(lmssl.sharing, "preflight", lambda recipe: None)  # the login check passed; then ...
        hub.stop()                                                             # ... the server goes away
    else:
        hub.fail_next(20, status=int(failure), paths="/commit/")   # more than the client's retries
    assert main(["run", str(recipe), "--run-dir", str(tmp_path / "run")]) == 2
    hub._failures.clear()                                            # the server recovers
    err = capsys.readouterr().err
    folder = tmp_path / "run" / "tok"
    assert "pushing to the Hub failed; every local output is complete" in err and "Traceback" not in err, err
    assert f"lmssl push {folder} {hub.user}/tok-{failure}" in err
    assert {"HTTP 500" if failure == "500" else "HTTP 401" if failure == "401" else "cannot be reached"} <= {
        p for p in ("HTTP 500", "HTTP 401", "cannot be reached") if p in err}
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(folder)) == 300 and (folder / "README.md").is_file()
    assert "pushed" not in json.loads((folder / "stage.json").read_text())
    if failure == "unreachable":
        hub.start()
    assert main(["push", str(folder), f"{hub.user}/tok-{failure}"]) == 0, capsys.readouterr().err
    assert "tokenizer.json" in hub.files(f"{hub.user}/tok-{failure}")
    assert json.loads((folder / "stage.json").read_text())["pushed"][0]["repo_id"] == f"{hub.user}/tok-{failure}"


def test_a_rerun_retries_a_push_that_failed_and_skips_one_that_succeeded(hub, no_backoff, tmp_path, capsys):
    stage = {"name": "tok", "kind": "tokenizer", "vocab_size": 300, "data": DATA,
             "push_to_hub": {"repo_id": f"{hub.user}/tok-retry", "revision": "v1"}}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "t", "stages": [stage]}))
    hub.fail_next(20, status=503, paths="/commit/")
    assert main(["run", str(recipe), "--run-dir", str(tmp_path / "run")]) == 2
    capsys.readouterr()
    hub._failures.clear()                                            # the server recovers
    assert main(["run", str(recipe), "--run-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "[tok] up to date, skipped" in out and "pushed tok to" in out
    assert "tokenizer.json" in hub.files(f"{hub.user}/tok-retry", revision="v1")
    commits = len(hub.commit_titles(f"{hub.user}/tok-retry", revision="v1"))
    assert main(["run", str(recipe), "--run-dir", str(tmp_path / "run")]) == 0
    assert len(hub.commit_titles(f"{hub.user}/tok-retry", revision="v1")) == commits, "pushed once only"


def test_a_bad_token_fails_before_any_stage_runs(hub, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "t", "stages": [
        {"name": "tok", "kind": "tokenizer", "vocab_size": 300, "data": DATA, "push_to_hub": {"repo_id": "me/x"}}]}))
    started = time.perf_counter()
    assert main(["run", str(recipe), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "HTTP 401" in err and "HF_TOKEN" in err and "x" * 34 not in err
    assert time.perf_counter() - started < 5 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("key, value", [("data", {"path": "someone/not-in-any-cache"}),
                                        ("model", {"family": "bert", "size": "tiny", "init_from": "someone/no-model"}),
                                        ("tokenizer_from", "someone/no-tokenizer@v2")])
def test_offline_an_uncached_hub_input_is_an_exit_2_error_within_seconds(tmp_path, capsys, key, value):
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE, "the suite runs offline"
    tok = {"name": "tok", "kind": "tokenizer", "vocab_size": 300, "data": DATA}
    stage = {"name": "pre", "kind": "pretrain", "model": {"family": "bert", "size": "tiny"}, "data": DATA,
             "tokenizer_from": "tok", "max_steps": 2, key: value}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "t", "stages": [tok, stage]}))
    started = time.perf_counter()
    assert main(["run", str(recipe), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    seconds = time.perf_counter() - started
    assert seconds < 5, seconds
    assert "not in the local cache, and HF_HUB_OFFLINE=1" in err and "Traceback" not in err, err
    assert {"data": "stages.pre.data.path", "model": "stages.pre.model.init_from",
            "tokenizer_from": "stages.pre.tokenizer_from"}[key] in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("push, expected", [
    ({"repo_id": "no-namespace"}, "stages.tok.push_to_hub.repo_id"),
    ({"repo_id": "me/../x"}, "stages.tok.push_to_hub.repo_id"),
    ({"repo_id": "me/x", "strategy": "checkpoints"}, "checkpoints are pushed from pretrain stages only"),
    ({"repo_id": "me/x", "revision": "../main"}, "stages.tok.push_to_hub.revision"),
    ({"repo_id": "me/x", "token": "hf_abcdefghijklmnopqrstuvwxyz"}, "unknown key 'token'"),
])
def test_push_settings_are_checked_at_validate(tmp_path, capsys, push, expected):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "t", "stages": [
        {"name": "tok", "kind": "tokenizer", "vocab_size": 300, "data": DATA, "push_to_hub": push}]}))
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "abcdefghijklmnopqrstuvwxyz" not in err, err


def test_an_unknown_license_and_the_old_hub_section_are_recipe_errors(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    base = {"name": "t", "stages": [{"name": "tok", "kind": "tokenizer", "data": DATA}]}
    recipe.write_text(yaml.safe_dump({**base, "license": "apache2"}))
    assert main(["validate", str(recipe)]) == 2
    assert "did you mean 'apache-2.0'" in capsys.readouterr().err
    recipe.write_text(yaml.safe_dump({**base, "hub": {"repo_prefix": "me"}}))
    assert main(["validate", str(recipe)]) == 2
    assert "push_to_hub" in capsys.readouterr().err


def test_checkpoint_pushes_run_in_the_background_and_finish_waits_for_them(tmp_path, monkeypatch):
    import threading

    from lmssl import hub as hub_module
    from lmssl.recipe import PushConfig

    release, uploaded = threading.Event(), []

    def slow_push(folder, repo_id, private, revision, message, what):
        assert (Path(folder) / "config.json").read_text() == revision   # the snapshot of that step
        release.wait(10)
        uploaded.append(revision)
        return "url"

    monkeypatch.setattr(hub_module, "push_folder", slow_push)
    pusher = hub_module.CheckpointPusher(PushConfig(repo_id="me/x", strategy="checkpoints"), tmp_path / "snap",
                                         True, lambda message: None)
    started = time.perf_counter()
    for step in (10, 20):
        pusher.on_save(step, lambda folder, s=step: (folder.mkdir(parents=True), (folder / "config.json")
                                                     .write_text(f"step-{s}")))
    assert time.perf_counter() - started < 1 and uploaded == [], "the loop did not wait for the network"
    release.set()
    assert pusher.finish() == [] and uploaded == ["step-10", "step-20"] and pusher.pushed == uploaded
    assert not (tmp_path / "snap").exists()


def check_hub_inputs_with_revisions(hub, tmp_path):
    """The pushed model with its checkpoint branches, used by hub id: model.init_from with model.revision
    for more pretraining, and model_from 'repo@branch' for fine-tuning."""
    from huggingface_hub import ModelCard
    from transformers import AutoModelForMaskedLM

    stages = [
        {"name": "more", "kind": "pretrain", "model": {"family": "bert", "init_from": f"{hub.user}/pre",
                                                       "revision": "step-4"},
         "data": DATA, "max_length": 32, "batch_size": 8, "max_steps": 2, "learning_rate": 1e-9, "warmup_steps": 0},
        {"name": "ft", "kind": "finetune", "model_from": f"{hub.user}/pre@step-8", "epochs": 1, "batch_size": 16,
         "tasks": [{"name": "strings", "data": {"path": "csv", "files": _csv(tmp_path / "task.csv")}}]},
    ]
    recipe = tmp_path / "second.yaml"
    recipe.write_text(yaml.safe_dump({"name": "second", "stages": stages}))
    assert main(["run", str(recipe), "--run-dir", str(tmp_path / "second")]) == 0
    from huggingface_hub import HfApi

    heads = {b.name: b.target_commit for b in HfApi().list_repo_refs(f"{hub.user}/pre").branches}
    fetched = {path for method, path in hub.requests if "/resolve/" in path}   # snapshots resolve to commits
    for branch in ("step-4", "step-8"):
        assert any(f"/resolve/{heads[branch]}/" in p for p in fetched), (branch, fetched)
    step4 = AutoModelForMaskedLM.from_pretrained(f"{hub.user}/pre", revision="step-4").state_dict()
    more = AutoModelForMaskedLM.from_pretrained(tmp_path / "second" / "more").state_dict()
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.allclose(step4[key], more[key], atol=1e-6)          # the warm start was that branch
    card = ModelCard.load(tmp_path / "second" / "more" / "README.md")
    assert card.data.base_model == f"{hub.user}/pre"
    assert ModelCard.load(tmp_path / "second" / "ft" / "strings" / "README.md").data.base_model == f"{hub.user}/pre"
