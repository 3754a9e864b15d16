"""Recipes: every shipped recipe validates; each kind of mistake is a one-paragraph error with
exit code 2 that names the problem; --set overrides coerce types."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from lmssl.errors import RecipeError
from lmssl import load_recipe
from conftest import shared_file

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))

GOOD = """\
name: t
stages:
  - {name: tok, kind: tokenizer, vocab_size: 500, data: {path: "builtin:pydocs"}}
  - name: pre
    kind: pretrain
    tokenizer_from: tok
    model: {family: bert, size: tiny}
    data: {path: "builtin:pydocs"}
    max_steps: 10
  - {name: ft, kind: finetune, model_from: pre, tasks: [pydocs-topic]}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates(recipe):
    overrides = []
    if recipe.name == "glue.yaml":  # its glue_dir is ../shared/data/glue; follow LMSSL_DATA_DIR if set
        overrides = [f"stages.glue.glue_dir={shared_file('glue')}"]
    if recipe.name.endswith("-cifar10.yaml"):  # one data field (a YAML anchor) serves every stage
        first = yaml.safe_load(recipe.read_text())["stages"][0]["name"]
        overrides = [f"stages.{first}.data.path={shared_file('cifar10')}"]
    loaded = load_recipe(recipe, overrides)
    assert loaded.stages, recipe
    if recipe.name.endswith("-cifar10.yaml"):
        assert {s.data.path for s in loaded.stages} == {str(shared_file("cifar10"))}


def test_good_recipe_parses_into_stage_dataclasses(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD))
    assert [s.kind for s in recipe.stages] == ["tokenizer", "pretrain", "finetune"]
    assert recipe.stage("pre").max_steps == 10
    assert recipe.stage("pre").model.family == "bert"


def test_set_overrides_any_field_with_type_coercion(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD), ["stages.pre.max_steps=100", "stages.pre.learning_rate=1e-4",
                                                 "stages.pre.model.size=mini", "seed=7"])
    assert recipe.stage("pre").max_steps == 100
    assert recipe.stage("pre").learning_rate == pytest.approx(1e-4)
    assert recipe.stage("pre").model.size == "mini"
    assert recipe.seed == 7


@pytest.mark.parametrize(
    "mutation, expected",
    [
        (lambda t: t.replace("max_steps: 10", "max_step: 10"), ["unknown key 'max_step'", "did you mean 'max_steps'", "line 9"]),
        (lambda t: t.replace("max_steps: 10", "max_steps: lots"), ["stages.pre.max_steps", "expected an integer", "'lots'"]),
        (lambda t: t.replace("vocab_size: 500", "vocab_size: [1]"), ["stages.tok.vocab_size", "expected an integer"]),
        (lambda t: t.replace('data: {path: "builtin:pydocs"}\n    max', 'data: {path: text, files: /nowhere/*.txt}\n    max'),
         ["stages.pre.data.files", "no file matches '/nowhere/*.txt'"]),
        (lambda t: t.replace("model_from: pre", "model_from: nothing"), ["stages.ft.model_from", "'nothing' names no earlier stage"]),
        (lambda t: t.replace("tokenizer_from: tok", "tokenizer_from: ft"), ["stages.pre.tokenizer_from", "comes later"]),
        (lambda t: t.replace("tokenizer_from: tok", "tokenizer_from: pre"), ["stages.pre.tokenizer_from", "comes later"]),
        (lambda t: t.replace("kind: pretrain", "kind: pretrian"), ["unknown stage kind 'pretrian'", "did you mean 'pretrain'"]),
        (lambda t: t.replace("stages:\n", "stages:\n  - {name: [oops\n"), ["YAML syntax error", "line"]),
        (lambda t: t.replace("family: bert", "family: gpt2"), ["stages.pre.model.family", "mlm objective needs"]),
        (lambda t: t.replace("tasks: [pydocs-topic]", "tasks: [nope]"), ["stages.ft.tasks[0]", "unknown task 'nope'"]),
    ],
    ids=["unknown-key", "wrong-type", "wrong-type-list", "missing-file", "unknown-stage", "later-stage",
         "self-reference", "unknown-kind", "yaml-syntax", "objective-family", "unknown-task"],
)
def test_recipe_mistakes_exit_2_with_a_message_naming_the_problem(tmp_path, mutation, expected):
    path = write(tmp_path, mutation(GOOD))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    for fragment in expected:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_cli_validate_reports_mistakes_without_traceback(tmp_path):
    path = write(tmp_path, GOOD.replace("max_steps: 10", "max_step: 10"))
    proc = subprocess.run([sys.executable, "-m", "lmssl", "validate", str(path)], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "unknown key 'max_step'" in proc.stderr and "did you mean 'max_steps'" in proc.stderr


def test_cli_run_with_bad_override_exits_2_and_writes_nothing(tmp_path):
    path = write(tmp_path, GOOD)
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "lmssl", "run", str(path), "--run-dir", str(run_dir),
                           "--set", "stages.pre.batch_size=big"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert "stages.pre.batch_size" in proc.stderr and "Traceback" not in proc.stderr
    assert not run_dir.exists()


def test_set_naming_an_unknown_stage_lists_the_stages(tmp_path):
    with pytest.raises(RecipeError, match="no stage named 'pretrain'; stages: tok, pre, ft"):
        load_recipe(write(tmp_path, GOOD), ["stages.pretrain.max_steps=5"])


def test_duplicate_stage_names_are_rejected(tmp_path):
    text = GOOD.replace("name: pre\n", "name: tok\n").replace("model_from: pre", "model_from: tok")
    with pytest.raises(RecipeError, match="two stages are named 'tok'"):
        load_recipe(write(tmp_path, text))


def test_yaml_tags_that_would_run_code_are_refused(tmp_path):
    path = write(tmp_path, GOOD.replace("name: t", "name: !!python/object/apply:os.system ['touch pwned']"))
    with pytest.raises(RecipeError, match="YAML syntax error"):
        load_recipe(path)
    assert not (tmp_path / "pwned").exists()
