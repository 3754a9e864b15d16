"""Failure handling: a full disk while checkpointing leaves the previous checkpoint intact and
says so; secrets in a recipe never reach the run folder; checkpoint state loads weights-only."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from lmssl import checkpoint
from lmssl.errors import LmsslError
from lmssl.training import train
from test_training_loop import Regression, config, make_data, make_model


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # an earlier test may have made a GPU one
    return Accelerator(cpu=True)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(accelerator, tmp_path, monkeypatch):
    cfg = config(max_steps=25, save_every=10, keep_checkpoints=3)
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:  # step 10 writes optimizer + scheduler; step 20 runs out of space
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(LmsslError, match="No space left on device; the previous checkpoint step-00000010 is intact"):
        train(Regression(), make_model(), make_data(), None, cfg, accelerator, tmp_path / "o", tmp_path / "ckpt",
              seed=0, accumulation=1)
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["step-00000010"], "the partial step-20 folder is removed, step-10 kept"
    assert checkpoint.latest_valid(tmp_path / "ckpt").name == "step-00000010"


def test_checkpoint_state_is_loaded_weights_only(accelerator, tmp_path, monkeypatch):
    train(Regression(), make_model(), make_data(), None, config(max_steps=10, save_every=5), accelerator,
          tmp_path / "o", tmp_path / "ckpt", seed=0, accumulation=1)
    seen = []
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    train(Regression(), make_model(), make_data(), None, config(max_steps=12, save_every=5), accelerator,
          tmp_path / "o2", tmp_path / "ckpt", seed=0, accumulation=1)
    assert seen and all(flag is True for flag in seen)
    assert not list((tmp_path / "ckpt").rglob("*.pkl")) and not list((tmp_path / "ckpt").rglob("*.bin"))


def test_hub_token_in_a_recipe_never_reaches_the_run_folder(tmp_path):
    """(A token belongs in HF_TOKEN; one written into data options anyway is hidden everywhere.)"""
    from lmssl import load_recipe
    from lmssl.runner import run_recipe

    secret = "hf_ThisMustNeverBeWritten123"
    (tmp_path / "r.yaml").write_text(f"""\
name: secret
stages:
  - {{name: tok, kind: tokenizer, vocab_size: 300, data: {{path: "builtin:pydocs", max_samples: 200, options: {{token: {secret}}}}}}}
  - name: pre
    kind: pretrain
    tokenizer_from: tok
    model: {{family: bert, size: tiny}}
    data: {{path: "builtin:pydocs", max_samples: 200}}
    max_length: 32
    batch_size: 8
    max_steps: 2
""")
    run_recipe(load_recipe(tmp_path / "r.yaml"), run_dir=tmp_path / "run")
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file() and path.suffix in {".json", ".md", ".jsonl", ".txt", ".yaml"}:
            assert secret not in path.read_text(errors="ignore"), path
    assert "<hidden>" in (tmp_path / "run" / "tok" / "README.md").read_text()  # the tokenizer card shows its section


def test_code_shipped_in_a_model_folder_never_runs_unless_the_recipe_trusts_it(tmp_path):
    import json
    import subprocess
    import sys

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    folder = tmp_path / "model"
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(folder)
    BertForMaskedLM(BertConfig(vocab_size=7, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                               intermediate_size=8)).save_pretrained(folder)
    marker = tmp_path / "code-ran"
    (folder / "custom_config.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import BertConfig\n\nclass CustomConfig(BertConfig):\n    model_type = 'custom-bert'\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom-bert", auto_map={"AutoConfig": "custom_config.CustomConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    (tmp_path / "r.yaml").write_text(f"""\
name: remote
stages:
  - {{name: ft, kind: finetune, model_from: {folder}, tasks: [pydocs-topic], max_train_samples: 16, epochs: 1}}
""")
    proc = subprocess.run([sys.executable, "-m", "lmssl", "run", str(tmp_path / "r.yaml"), "--run-dir",
                           str(tmp_path / "run")], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "trust_remote_code" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists(), "code from the model folder ran without trust_remote_code"
