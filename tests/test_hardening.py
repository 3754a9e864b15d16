"""Hardening (issue 11): what a careless or hostile user can do to a run directory, and the one-paragraph
exit-2 error each mistake gets instead. Names that become paths, folders lmssl did not make, secrets in
data options, two runs on one folder, checkpoint writers failing, bad run directories and recipe files,
model shapes, and every numeric field's range, walked field by field through the stage dataclasses."""

from __future__ import annotations

import copy
import dataclasses
import json
import lzma
import os
import signal
import subprocess
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import pytest
import yaml

from conftest import shared_file
from lmssl.__main__ import main
from lmssl.errors import LmsslError

REPO = Path(__file__).resolve().parent.parent
TEXT_DATA = {"path": "builtin:pydocs", "max_samples": 200}
TOK = {"name": "tok", "kind": "tokenizer", "vocab_size": 300, "data": TEXT_DATA}
PRE = {"name": "pre", "kind": "pretrain", "tokenizer_from": "tok", "model": {"family": "bert", "size": "tiny"},
       "data": TEXT_DATA, "max_length": 32, "batch_size": 8, "max_steps": 2}


def cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def recipe_file(folder: Path, *stages: dict, **top) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "t", **top, "stages": [copy.deepcopy(s) for s in stages]}, sort_keys=False))
    return path


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def tiny_csv(path: Path) -> Path:
    path.write_text("sentence,label\n" + "".join(f"sentence number {i},{i % 2}\n" for i in range(40)))
    return path


# --------------------------------------------------------------------------- 1. names that become paths

@pytest.mark.parametrize("name", ["../../escaped", "/tmp/lmssl-absolute-task", "a/b", "..", ".hidden", "results.json",
                                  "x" * 200, "nul", "with space"])
def test_a_task_name_that_is_not_a_plain_folder_name_is_refused_before_anything_is_written(tmp_path, capsys, name):
    ft = {"name": "ft", "kind": "finetune", "model_from": "pre",
          "tasks": [{"name": name, "data": {"path": "csv", "files": str(tiny_csv(tmp_path / "t.csv"))}}]}
    path = recipe_file(tmp_path, TOK, PRE, ft)
    for command in (["validate", path], ["run", path, "--run-dir", tmp_path / "run"]):
        rc, _, err = cli(capsys, *command)
        assert rc == 2 and "stages.ft.tasks[0].name" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()
    assert not Path("/tmp/lmssl-absolute-task").exists() and not (tmp_path.parent.parent / "escaped").exists()


@pytest.mark.parametrize("name", ["summary.md", "SUMMARY.md", ".partial", ".lmssl.lock", "x" * 300, "a/b", "com1"])
def test_a_stage_name_lmssl_cannot_use_as_a_folder_is_refused(tmp_path, capsys, name):
    rc, _, err = cli(capsys, "run", recipe_file(tmp_path, dict(TOK, name=name)), "--run-dir", tmp_path / "run")
    assert rc == 2 and ".name" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- 2. folders lmssl did not make

def test_a_users_folder_named_like_a_stage_is_never_moved_or_deleted(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "tok").mkdir(parents=True)
    (run / "tok" / "thesis.tex").write_text("years of work")
    (run / ".partial" / "tok-mine").mkdir(parents=True)          # looks like an old attempt, but is not lmssl's
    (run / ".partial" / "tok-mine" / "notes.txt").write_text("mine")
    path = recipe_file(tmp_path, TOK)
    rc, _, err = cli(capsys, "run", path, "--run-dir", run)
    assert rc == 2 and str(run / "tok") in err and "not made by lmssl" in err and "Traceback" not in err, err
    assert (run / "tok" / "thesis.tex").read_text() == "years of work"
    assert not (run / ".old-tok").exists()
    assert sorted(p.name for p in (run / ".partial").iterdir()) == ["tok-mine"]

    (run / "tok" / "thesis.tex").rename(tmp_path / "thesis.tex")   # the user moves it away ...
    (run / "tok").rmdir()
    rc, _, err = cli(capsys, "run", path, "--run-dir", run)
    assert rc == 0, err                                              # ... and the stage runs
    assert (run / "tok" / "stage.json").is_file() and (run / ".partial" / "tok-mine" / "notes.txt").is_file()
    rc, _, err = cli(capsys, "run", path, "--run-dir", run, "--force", "tok")
    assert rc == 0, err                                              # lmssl's own folder is replaced as before
    assert (run / "tok" / "stage.json").is_file() and not (run / ".old-tok").exists()


# --------------------------------------------------------------------------- 3. secrets

SECRETS = ["hf_DataOptionTokenNeverWritten123456", "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY", "AKIAIOSFODNN7EXAMPLE",
           "eyJhbGciOiJIUzI1NiJ9.headerpayload"]


def test_credentials_in_data_options_never_reach_a_file_or_the_terminal(tmp_path, capfd):
    with lzma.open(shared_file("gutenberg_nltk/carroll-alice.txt.xz"), "rt", encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if line.strip()][:1500]
    (tmp_path / "alice.txt").write_text("\n".join(lines) + "\n")
    data = {"path": "text", "files": str(tmp_path / "alice.txt"),
            "options": {"token": SECRETS[0],
                        "storage_options": {"key": SECRETS[2], "aws_secret_access_key": SECRETS[1],
                                            "headers": {"Authorization": f"Bearer {SECRETS[3]}"}}}}
    path = recipe_file(tmp_path, dict(TOK, data=data), dict(PRE, data=data))
    assert main(["run", str(path), "--run-dir", str(tmp_path / "run")]) == 0
    printed = "".join(capfd.readouterr())
    written = files_under(tmp_path / "run")
    assert {"stage.json", "README.md", "summary.md"} <= {p.name for p in written}
    for secret in SECRETS:
        assert secret not in printed
        for file in written:
            assert secret.encode() not in file.read_bytes(), (secret, file)
    record = json.loads((tmp_path / "run" / "pre" / "stage.json").read_text())
    assert record["config"]["data"]["options"]["token"] == "<hidden>"
    assert record["config"]["data"]["files"] == str(tmp_path / "alice.txt")   # what is not a secret stays readable


@pytest.mark.parametrize("config", [
    {"token": "s3cr3t-value"}, {"hf_token": "s3cr3t-value"}, {"HF-Token": "s3cr3t-value"}, {"api_key": "s3cr3t-value"},
    {"apiKey": "s3cr3t-value"}, {"db_password": "s3cr3t-value"}, {"passwd": "s3cr3t-value"},
    {"client_secret": "s3cr3t-value"}, {"Authorization": "s3cr3t-value"}, {"aws_session_token": "s3cr3t-value"},
    {"aws_secret_access_key": "s3cr3t-value"}, {"storage_options": {"key": "s3cr3t-value"}},
    {"storage_options": {"client_kwargs": {"endpoint": "s3cr3t-value"}}}, {"headers": {"X-Api": "s3cr3t-value"}},
    {"options": [{"private_key": "s3cr3t-value"}]}, {"deep": {"deeper": {"credentials": {"a": "s3cr3t-value"}}}},
    {"url": "https://user:s3cr3t-value@example.org/data"}, {"note": "hf_abcdefghijklmnopqrstuvwxyz"},
    {"comment": "Authorization: Bearer s3cr3t-value"},
], ids=lambda c: json.dumps(c)[:40])
def test_the_one_scrubber_hides_credential_shapes_at_any_depth_and_keeps_the_rest(config):
    from lmssl.redact import redact

    plain = {"tokenizer_from": "tok", "pad_token_id": 0, "max_tokens": 5, "key_column": "id", "path": "text"}
    hidden = json.dumps(redact({**plain, "x": config}))
    assert "s3cr3t-value" not in hidden and "hf_abcdefghijklmnopqrstuvwxyz" not in hidden and "<hidden>" in hidden
    assert redact(plain) == plain


def test_a_secret_in_an_error_message_is_hidden(tmp_path, capsys):
    rc, _, err = cli(capsys, "validate", recipe_file(tmp_path, TOK), "--set",
                     "stages.tok.vocab_size=hf_abcdefghijklmnopqrstuvwxyz")
    assert rc == 2 and "stages.tok.vocab_size" in err and "<hidden>" in err
    assert "hf_abcdefghijklmnopqrstuvwxyz" not in err


# --------------------------------------------------------------------------- 4. one run per folder

def test_a_second_run_on_a_locked_folder_exits_2_naming_the_holder_and_a_killed_holders_lock_is_taken_over(
        tmp_path, capsys):
    run = tmp_path / "run"
    path = recipe_file(tmp_path, TOK, dict(PRE, max_steps=200, save_every=10, max_length=128, batch_size=32))
    first = subprocess.Popen([sys.executable, "-m", "lmssl", "run", str(path), "--run-dir", str(run)], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not list(run.glob(".partial/pre-*/checkpoints/step-*")):
            assert first.poll() is None and time.time() < deadline, "the first run ended before its first checkpoint"
            time.sleep(0.01)
        os.kill(first.pid, signal.SIGSTOP)                       # frozen mid-stage, lock held
        before = {p: p.stat().st_mtime_ns for p in files_under(run / ".partial")}
        rc, _, err = cli(capsys, "run", path, "--run-dir", run)
        assert rc == 2 and f"pid {first.pid}" in err and "Traceback" not in err, err
        assert {p: p.stat().st_mtime_ns for p in files_under(run / ".partial")} == before, "the first run's work is untouched"
    finally:
        first.kill()                                             # SIGKILL: no cleanup, the lock file stays
        first.wait()
    assert json.loads((run / ".lmssl.lock").read_text())["pid"] == first.pid
    rc, out, err = cli(capsys, "run", path, "--run-dir", run)
    assert rc == 0, err
    assert "[pre] resuming" in out and "resuming from" in out + err   # the killed run's checkpoint is used
    assert json.loads((run / ".lmssl.lock").read_text())["pid"] == os.getpid()
    assert json.loads((run / "pre" / "stage.json").read_text())["metrics"]["steps"] == 200


# --------------------------------------------------------------------------- 7, 8. checkpoints

@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=True)


def test_keep_zero_in_code_still_keeps_the_checkpoint_just_written(accelerator, tmp_path):
    from lmssl import checkpoint
    from test_training_loop import make_model

    import torch

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    for step in (1, 2):
        checkpoint.save(accelerator, tmp_path, step, model, optimizer, scheduler, {"step": step}, keep=0)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step-00000002"]


def _storage_full(kind: str):
    from safetensors import SafetensorError

    if kind == "safetensors":
        return "save_model", SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                             'message: "No space left on device" })')
    return "torch.save", RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed "
                                      "writing file data/0: file write failed")


@pytest.mark.parametrize("kind", ["safetensors", "torch"])
def test_a_full_disk_as_the_writers_really_report_it_is_a_clean_error_naming_the_last_good_checkpoint(
        accelerator, tmp_path, monkeypatch, kind):
    import torch

    from lmssl import checkpoint
    from lmssl.training import train
    from test_training_loop import Regression, config, make_data, make_model

    target, error = _storage_full(kind)
    real = checkpoint.save_model if target == "save_model" else torch.save
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > (1 if target == "save_model" else 2):   # the second checkpoint fails
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_model", failing) if target == "save_model" else \
        monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(LmsslError, match="could not write checkpoint .*step-00000020.*; the previous checkpoint "
                                         "step-00000010 is intact"):
        train(Regression(), make_model(), make_data(), None, config(max_steps=25, save_every=10, keep_checkpoints=3),
              accelerator, tmp_path / "o", tmp_path / "ckpt", seed=0, accumulation=1)
    assert calls["n"] > (1 if target == "save_model" else 2), "the failure was injected"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-00000010"], "no .tmp-step-* is left"


# --------------------------------------------------------------------------- 10, 11. bad values and shapes

@pytest.mark.parametrize("stage, key, value", [
    ("pre", "max_steps", 0), ("pre", "max_steps", -5), ("pre", "learning_rate", float("inf")),
    ("pre", "learning_rate", float("nan")), ("pre", "learning_rate", -1e-4), ("pre", "batch_size", 0),
    ("pre", "batch_size", -8), ("pre", "adam_betas", [0.9, 1.0]), ("pre", "adam_betas", [-0.1, 0.9]),
    ("pre", "gradient_accumulation_steps", 0), ("pre", "keep_checkpoints", 0), ("pre", "keep_checkpoints", -1),
    ("tok", "min_frequency", -1), ("tok", "vocab_size", 0), (None, "seed", -1), (None, "seed", 2**40),
], ids=str)
def test_the_silently_wrong_and_traceback_values_of_the_issue_exit_2_at_validate(tmp_path, capsys, stage, key, value):
    stages = [dict(TOK), dict(PRE)]
    top = {}
    if stage is None:
        top[key] = value
    else:
        next(s for s in stages if s["name"] == stage)[key] = value
    path = recipe_file(tmp_path, *stages, **top)
    for command in (["validate", path], ["run", path, "--run-dir", tmp_path / "run"]):
        rc, _, err = cli(capsys, *command)
        assert rc == 2 and (f"stages.{stage}.{key}" if stage else key) in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("model, expected", [
    ({"family": "bert", "size": "tiny", "overrides": {"hidden_size": 100, "num_attention_heads": 3}},
     "stages.pre.model.overrides: a width of 100 (hidden_size) is not divided by 3 attention heads"),
    ({"family": "bert", "size": "tiny", "overrides": {"hiden_size": 64}},
     "stages.pre.model.overrides.hiden_size: BertConfig has no field 'hiden_size'; did you mean 'hidden_size'?"),
    ({"family": "gpt2", "size": "tiny", "overrides": {"n_embd": 130, "n_head": 4}},
     "a width of 130 (n_embd) is not divided by 4 attention heads (n_head)"),
], ids=["heads", "unknown-key", "gpt2-heads"])
def test_model_shapes_are_checked_before_any_data_is_read(tmp_path, capsys, model, expected):
    pre = dict(PRE, model=model, data={"path": "text", "files": "/nowhere/at-all.txt"})  # data never reached
    if model["family"] == "gpt2":
        pre["objective"] = "causal_lm"
    rc, _, err = cli(capsys, "validate", recipe_file(tmp_path, TOK, pre))
    assert rc == 2 and expected in err, err


def _read_only_folder(folder: Path):
    """A folder this process cannot write, also as root (chattr +i), or None where neither works."""
    folder.mkdir()
    folder.chmod(0o500)
    try:
        (folder / "probe").write_text("")
        (folder / "probe").unlink()
    except OSError:
        return lambda: folder.chmod(0o700)
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        return lambda: (subprocess.run(["chattr", "-i", str(folder)]), folder.chmod(0o700))
    folder.chmod(0o700)
    return None


@pytest.mark.parametrize("where", ["file", "under-file", "read-only", "proc", "sys"])
def test_a_run_dir_that_cannot_be_one_exits_2_and_creates_nothing(tmp_path, capsys, where):
    undo = None
    if where in ("file", "under-file"):
        (tmp_path / "taken").write_text("a file of the user's")
        run = tmp_path / "taken" / ("" if where == "file" else "run")
    elif where == "read-only":
        undo = _read_only_folder(tmp_path / "locked")
        if undo is None:
            pytest.skip("no way to make a folder read-only for this user here (neither chmod nor chattr)")
        run = tmp_path / "locked" / "run"
    else:
        run = Path(f"/{where}/lmssl-test-run")
    try:
        rc, _, err = cli(capsys, "run", recipe_file(tmp_path, TOK), "--run-dir", run)
        assert rc == 2 and "--run-dir" in err and "Traceback" not in err, err
        assert not run.exists() or where == "file"
        if where in ("file", "under-file"):
            assert (tmp_path / "taken").read_text() == "a file of the user's"
    finally:
        if undo:
            undo()


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b"name: t\x00\nstages: []\n",
                                     bytes(range(256)), "folder"], ids=["png", "nul", "bytes", "folder"])
def test_a_recipe_that_is_not_a_text_file_exits_2(tmp_path, capsys, content):
    path = tmp_path / "recipe.yaml"
    if content == "folder":
        path.mkdir()
    else:
        path.write_bytes(content)
    rc, _, err = cli(capsys, "validate", path)
    assert rc == 2 and "recipe" in err and "Traceback" not in err, err


# --------------------------------------------------------------------------- every field of every stage config

def _unwrap(tp):
    """(base type, Range or None, optional) of a field type."""
    from lmssl.schema import Range

    optional = False
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) == 1:
            tp = args[0]
    found = None
    if typing.get_origin(tp) is typing.Annotated:
        tp, *extras = typing.get_args(tp)
        found = next((e for e in extras if isinstance(e, Range)), None)
    return tp, found, optional


def _outside(tp, bounds) -> list:
    """Values of numeric type `tp` just outside `bounds`, and the non-finite ones for floats."""
    step = 1 if tp is int else 0.5
    values = []
    if bounds.low is not None:
        values.append(bounds.low if bounds.low_open else bounds.low - step)
    if bounds.high is not None:
        values.append(bounds.high if bounds.high_open else bounds.high + step)
    if tp is float:
        values += [float("nan"), float("inf"), float("-inf")]
    return [int(v) if tp is int else float(v) for v in values]


def _wrong_kind(tp) -> Any:
    """A value of a kind (mapping, list, text, number) that no member of `tp` takes."""
    members = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
    kinds = set()
    for m in members:
        m = _unwrap(m)[0]
        origin = typing.get_origin(m)
        kinds.add("map" if origin is dict or _dataclass_in(m) else "list" if origin is list
                  else "text" if m is str or origin is Literal else "number" if m in (int, float) else "other")
    for kind, value in (("map", {"not": "this"}), ("list", ["not", "this"]), ("text", "not this"), ("number", 1.5)):
        if kind not in kinds:
            return value
    raise AssertionError(f"no wrong kind for {tp}")


def _bad_values(tp) -> tuple[list, list[str]]:
    """(bad values for a field of type tp, problems of the schema itself: a number without a Range)."""
    base, bounds, _ = _unwrap(tp)
    origin = typing.get_origin(base)
    if base in (int, float):
        if bounds is None:
            return [], ["a numeric field without a Range"]
        return _outside(base, bounds) + ["many"], []
    if origin is list:
        item, problems = _bad_values(typing.get_args(base)[0])
        return [_wrong_kind(base)] + [[v] for v in item[:3]], problems
    if base is bool:
        return ["maybe"], []
    if origin is Literal:
        return ["no-such-choice"], []
    if base is Any:
        return [], []
    return [_wrong_kind(base)], []


def _cases(cls, mapping: dict, path: list, base_data: dict):
    """(key path, bad value) for every field of dataclass `cls`, recursing into nested dataclasses;
    `mapping` is the valid recipe mapping at this level. Also yields schema problems as (path, message)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        if f.name in ("name", "kind", "source", "raw", "stages"):
            continue
        tp = hints[f.name]
        base, _, _ = _unwrap(tp)
        members = [_unwrap(m)[0] for m in (typing.get_args(base) if typing.get_origin(base) in (Union, types.UnionType)
                                           else [base])]
        spec = _dataclass_in(typing.get_args(base)[0]) if typing.get_origin(base) is list else None
        if spec is not None:
            inner = mapping.get(f.name) or []
            if inner and isinstance(inner[0], dict):   # tasks: [{...}]: walk the first entry's fields
                yield from _cases(spec, inner[0], path + [f.name, 0], base_data)
            yield path + [f.name], ("value", _wrong_kind(tp))
            continue
        nested = next((m for m in members if _dataclass_in(m)), None)
        if nested is not None:
            inner = mapping.get(f.name)
            if inner is None:
                inner = copy.deepcopy(base_data) if nested.__name__ == "DataConfig" else {}
            yield from _cases(nested, inner, path + [f.name], base_data)
            yield path + [f.name], ("value", _wrong_kind(tp))
            continue
        values, problems = _bad_values(tp)
        for problem in problems:
            yield path + [f.name], ("problem", problem)
        for value in values:
            yield path + [f.name], ("value", value)


def _dataclass_in(tp):
    """The dataclass type `tp` is or holds as a Union member, if any."""
    for member in (typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)):
        if isinstance(member, type) and dataclasses.is_dataclass(member):
            return member
    return None


def _put(mapping: dict, path: list, value, base_data: dict) -> None:
    node = mapping
    for key in path[:-1]:
        if isinstance(key, int):
            node = node[key]
            continue
        if node.get(key) is None:
            node[key] = copy.deepcopy(base_data) if key == "data" else {}
        node = node[key]
    node[path[-1]] = value


def _key(path: list) -> str:
    text = ""
    for key in path:
        text += f"[{key}]" if isinstance(key, int) else (f".{key}" if text else key)
    return text


def _variants(tmp_path: Path) -> dict[str, tuple[list[dict], str, type, dict]]:
    """A valid recipe per stage config to walk: (stages, stage to vary, the dataclass, its base data)."""
    from lmssl.objectives import OBJECTIVES
    from lmssl.recipe import Recipe
    from lmssl.stages import STAGES

    csv = str(tiny_csv(tmp_path / "task.csv"))
    digits = {"path": "builtin:digits", "eval_split": "test"}
    vit = {"family": "vit", "size": "tiny", "image_size": 16, "patch_size": 4}
    task = {"name": "mine", "data": {"path": "csv", "files": csv}}
    variants = {
        "recipe": ([TOK], None, Recipe, TEXT_DATA),
        "tokenizer": ([TOK], "tok", STAGES["tokenizer"].Config, TEXT_DATA),
        "pretrain": ([TOK, PRE], "pre", STAGES["pretrain"].Config, TEXT_DATA),
        "finetune": ([TOK, PRE, {"name": "ft", "kind": "finetune", "model_from": "pre", "tasks": [task]}], "ft",
                     STAGES["finetune"].Config, TEXT_DATA),
        "probe": ([{"name": "pre", "kind": "pretrain", "objective": "mae", "model": vit, "data": digits, "max_steps": 2},
                   {"name": "probe", "kind": "probe", "model_from": "pre", "data": digits}], "probe",
                  STAGES["probe"].Config, digits),
        "perplexity": ([dict(TOK, spec="gpt2-bytebpe"), dict(PRE, objective="causal_lm", model={"family": "gpt2", "size": "tiny"}),
                        {"name": "ppl", "kind": "perplexity", "model_from": "pre", "data": TEXT_DATA}], "ppl",
                       STAGES["perplexity"].Config, TEXT_DATA),
    }
    for name, objective in OBJECTIVES.items():   # each objective's options, on a model it trains
        family = objective.families[0]
        if objective.modality == "text":
            stage = dict(PRE, objective=name, model={"family": family, "size": "tiny"})
            stages = [TOK, stage]
        else:
            stage = {"name": "pre", "kind": "pretrain", "objective": name, "model": vit, "data": digits}
            stages = [stage]
        stage["objective_args"] = {}
        variants[f"objective:{name}"] = (stages, "pre", objective.Options, stage["data"])
    return variants


def _stage_configs() -> list[str]:
    from lmssl.objectives import OBJECTIVES

    return ["recipe", "tokenizer", "pretrain", "finetune", "probe", "perplexity",
            *(f"objective:{n}" for n in OBJECTIVES)]


STAGE_CONFIGS = _stage_configs()


def test_the_walk_covers_every_stage_kind_and_objective():
    from lmssl.objectives import OBJECTIVES
    from lmssl.stages import STAGES

    assert set(STAGE_CONFIGS) == {"recipe", *STAGES, *(f"objective:{n}" for n in OBJECTIVES)}


@pytest.mark.parametrize("which", STAGE_CONFIGS)
def test_every_field_rejects_out_of_range_and_wrong_typed_values_with_exit_2_naming_it_and_writing_nothing(
        tmp_path, capsys, which):
    stages, name, cls, base_data = _variants(tmp_path)[which]
    valid = recipe_file(tmp_path, *stages)
    rc, _, err = cli(capsys, "validate", valid)
    assert rc == 0, f"the base recipe must be valid: {err}"
    target = next((s for s in stages if s["name"] == name), None)
    prefix = ["objective_args"] if which.startswith("objective:") else []
    failures, checked = [], 0
    mapping = target.get("objective_args", {}) if prefix else (target if target is not None else {})
    cases = list(_cases(cls, mapping, prefix, base_data))
    if prefix:  # the options mapping itself, and a key the objective does not know
        cases += [(prefix, ("value", ["not", "this"])), (prefix + ["no_such_option"], ("value", 1))]
    for path, case in cases:
        key = (f"stages.{name}." if name else "") + _key(path)
        what, value = case
        if what == "problem":
            failures.append(f"{key}: {value}")
            continue
        recipe = {"name": "t", "stages": [copy.deepcopy(stage) for stage in stages]}  # no shared mappings
        _put(next(s for s in recipe["stages"] if s["name"] == name) if name else recipe, path, value, base_data)
        path_file = tmp_path / "bad.yaml"
        path_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
        for command in (["validate", path_file], ["run", path_file, "--run-dir", tmp_path / "run"]):
            try:
                rc, _, err = cli(capsys, *command)
            except Exception as crash:  # noqa: BLE001 - a crash is the defect this test looks for
                failures.append(f"{key}={value!r}: {command[0]} raised {type(crash).__name__}: {crash}")
                break
            if rc != 2 or "Traceback" in err or key not in err:
                failures.append(f"{key}={value!r}: {command[0]} gave rc {rc}: {err.strip()[:200]}")
                break
        if (tmp_path / "run").exists():
            failures.append(f"{key}={value!r}: the run directory was created")
            break
        checked += 1
    assert not failures, "\n".join(failures)
    assert checked == len(cases) >= 2, f"cases skipped for {which}"
