"""Vision edge cases a demanding user hits: several processes evaluating SimCLR, changed image folders,
unlabeled rows, warm starts from the wrong kind of model, mixed precision, fields a method would
ignore, constant color channels."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmssl import load_recipe, run_recipe
from lmssl.errors import LmsslError, RecipeError

REPO = Path(__file__).resolve().parent.parent


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


SIMCLR = """\
name: edges
seed: 2
stages:
  - name: pre
    kind: pretrain
    objective: simclr
    objective_args: {projection_hidden: 32, views: {blur: 0.0}}
    model: {family: vit, size: tiny, image_size: 16, patch_size: 4}
    data: {path: "DATA", eval_split: test, max_samples: 256}
    batch_size: BATCH
    max_steps: 6
    eval_every: 3
"""


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate CLI is not on PATH")
def test_two_processes_evaluate_simclr_on_an_odd_number_of_batches_as_one_process_would(tmp_path):
    from accelerate import Accelerator
    from test_multiprocess import _PORTS

    from lmssl.evaluation import evaluate_objective
    from lmssl.objectives import OBJECTIVES
    from lmssl.schema import parse_dataclass
    from lmssl.stages.pretrain import Config

    # 359 test digits in batches of 32: 12 batches, the last one short, 6 per process
    (tmp_path / "two.yaml").write_text(SIMCLR.replace("DATA", "builtin:digits").replace("BATCH", "32"))
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--main_process_port", str(next(_PORTS)), "-m", "lmssl", "run", str(tmp_path / "two.yaml"),
              "--run-dir", str(tmp_path / "run")]
    two = subprocess.run(launch, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=400)
    assert two.returncode == 0, two.stderr[-3000:]
    logged = [json.loads(line) for line in (tmp_path / "run" / "pre" / "metrics.jsonl").read_text().splitlines()
              if "eval/loss" in line]
    assert [r["step"] for r in logged] == [3, 6]

    # the same weights evaluated on one process: every batch's views come from (seed, batch index) only
    raw = {"name": "pre", "kind": "pretrain", "objective": "simclr", "model": {"init_from": str(tmp_path / "run" / "pre")},
           "data": {"path": "builtin:digits", "eval_split": "test", "max_samples": 256}}
    stage = parse_dataclass(Config, raw, "stages.pre")
    cls = OBJECTIVES["simclr"]
    splits = cls.read(stage, 2, "stages.pre")
    objective = cls(cls.Options(projection_hidden=32), cls.load_preprocessor(stage, splits.train, str, "s"), None, 2)
    module = objective.training_module(objective.build_model(stage.model))
    again = evaluate_objective(objective, module, splits.eval, 32, Accelerator(cpu=True), seed=2)
    assert again["loss"] == pytest.approx(logged[-1]["eval/loss"], rel=1e-5)
    # six steps in, the views' projections are nearly collapsed: the nearest view can flip with the
    # last bit of a float (thread counts differ), the loss cannot
    assert again["pair_accuracy"] == pytest.approx(logged[-1]["eval/pair_accuracy"], abs=0.01)


def test_changing_the_images_of_a_folder_reruns_the_stage(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (16, 16), (i * 20, 100 if label == "a" else 0, 50)).save(folder / label / f"{i}.png")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(SIMCLR.replace("DATA", str(folder)).replace("eval_split: test, ", "eval_fraction: 0, ")
                      .replace("BATCH", "8").replace("eval_every: 3", "knn: {enabled: false}"))
    run_recipe(load_recipe(recipe), run_dir=tmp_path / "run")
    first = json.loads((tmp_path / "run" / "pre" / "stage.json").read_text())["fingerprint"]
    run_recipe(load_recipe(recipe), run_dir=tmp_path / "run")
    assert json.loads((tmp_path / "run" / "pre" / "stage.json").read_text())["fingerprint"] == first
    Image.new("RGB", (16, 16), (1, 2, 3)).save(folder / "b" / "new.png")
    rerun = run_recipe(load_recipe(recipe), run_dir=tmp_path / "run")
    assert rerun["pre"].fingerprint != first
    assert rerun["pre"].metrics["data/images"] == 25


def test_unlabeled_rows_are_left_out_of_the_knn_monitor_and_the_probe(tmp_path):
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(80):
        label = i % 2
        images.append(Image.fromarray(rng.integers(0, 80, (16, 16, 3), dtype=np.uint8) + (120 if label else 0)))
        labels.append(-1 if i % 5 == 0 else label)                             # 16 rows without a label
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["dark", "bright"])})
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(tmp_path / "d.parquet")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""\
name: unlabeled
stages:
  - name: pre
    kind: pretrain
    objective: mae
    objective_args: {{decoder_width: 32, decoder_depth: 1}}
    model: {{family: vit, size: tiny, image_size: 16, patch_size: 4}}
    data: {{path: parquet, files: "{tmp_path / 'd.parquet'}", eval_fraction: 0.25}}
    batch_size: 8
    max_steps: 4
  - name: probe
    kind: probe
    model_from: pre
    data: {{path: parquet, files: "{tmp_path / 'd.parquet'}", eval_fraction: 0.25}}
""")
    outputs = run_recipe(load_recipe(recipe), run_dir=tmp_path / "run")
    assert 0 <= outputs["pre"].metrics["eval/knn_top1"] <= 1
    assert outputs["probe"].metrics["data/skipped_unlabeled"] == 16
    row = json.loads((tmp_path / "run" / "probe" / "results.json").read_text())["results"][0]
    assert row["train_images"] + row["test_images"] == 64


def test_a_warm_start_from_a_text_model_is_a_recipe_error(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""\
name: wrong
stages:
  - {{name: pre, kind: pretrain, objective: simclr, model: {{init_from: "{tmp_path / 'bert'}"}},
     data: {{path: "builtin:digits"}}}}
""")
    proc = subprocess.run([sys.executable, "-m", "lmssl", "validate", str(recipe)], capture_output=True, text=True)
    assert proc.returncode == 2 and "stages.pre.model.init_from" in proc.stderr and "bert" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("stage, key", [
    ("{objective: mae, model: {family: vit}, data: {path: 'builtin:digits'}, max_length: 64}", "max_length"),
    ("{objective: simclr, model: {family: vit}, data: {path: 'builtin:digits', column: img}}", "data.column"),
    ("{objective: mlm, tokenizer_from: TOK, model: {family: bert}, knn: {k: 5}}", "knn"),
    ("{objective: mae, model: {family: vit, image_size: 32}, data: {path: 'builtin:digits'}, "
     "objective_args: {decoder_width: 90}}", "objective_args.decoder_width"),
])
def test_fields_a_method_would_ignore_or_cannot_use_are_recipe_errors(tmp_path, stage, key):
    (tmp_path / "t").mkdir()
    recipe = tmp_path / "r.yaml"
    stage = stage.replace("TOK", str(tmp_path / "t"))
    recipe.write_text(f"name: x\nstages:\n  - {{name: s, kind: pretrain, {stage[1:-1]}}}\n")
    with pytest.raises(RecipeError, match=rf"stages\.s\.{key.replace('.', '[.]')}"):
        load_recipe(recipe)


def test_decoder_heads_that_do_not_divide_the_width_are_refused_not_adjusted():
    from lmssl.objectives.mae import Options, decoder_shape

    assert decoder_shape(Options(), 192) == (96, 4, 3)
    assert decoder_shape(Options(decoder_width=128, decoder_depth=2, decoder_heads=8), 64) == (128, 2, 8)
    with pytest.raises(LmsslError, match="decoder_heads"):
        decoder_shape(Options(decoder_heads=7), 128)


def test_simclr_loss_is_computed_in_fp32_under_bf16_autocast():
    from lmssl.objectives.simclr import nt_xent

    z = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    reference = nt_xent(z, 0.1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        under = nt_xent(z.to(torch.bfloat16), 0.1)
    assert under.dtype == torch.float32
    assert torch.allclose(under, nt_xent(z.to(torch.bfloat16).float(), 0.1), atol=1e-6)
    assert abs(under.item() - reference.item()) < 0.05                      # bf16 inputs, fp32 arithmetic


def test_a_from_scratch_simclr_head_is_never_read_from_the_working_directory(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from lmssl.models import ModelConfig
    from lmssl.objectives.simclr import HEAD_FILE, Options, SimCLR
    from lmssl.objectives.vision import image_processor

    objective = SimCLR(Options(projection_hidden=8, projection_dim=4), image_processor(32, [0.5] * 3, [0.2] * 3))
    model = objective.build_model(ModelConfig(family="vit", size="tiny"))
    planted = {k: torch.full_like(v, 7.0) for k, v in objective.training_module(model).head.state_dict().items()}
    (tmp_path / "pretraining").mkdir()
    save_file(planted, str(tmp_path / "pretraining" / HEAD_FILE))
    monkeypatch.chdir(tmp_path)
    head = objective.training_module(objective.build_model(ModelConfig(family="vit", size="tiny"))).head
    assert not torch.equal(head[0].weight, planted["0.weight"])


def test_a_constant_color_channel_normalizes_to_finite_pixels():
    import datasets
    import numpy as np

    from lmssl.data.images import MIN_STD, channel_stats
    from lmssl.data.views import to_pixels

    pixels = np.random.default_rng(0).integers(0, 255, (10, 3, 8, 8), dtype=np.uint8)
    pixels[:, 2] = 0                                                         # blue is always black
    data = datasets.Dataset.from_dict({"pixels": pixels, "label": [0] * 10},
                                      features=datasets.Features({"pixels": datasets.Array3D((3, 8, 8), "uint8"),
                                                                  "label": datasets.Value("int64")}))
    mean, std = channel_stats(data)
    assert std[2] == pytest.approx(MIN_STD) and std[0] > 0.2
    assert torch.isfinite(to_pixels(torch.from_numpy(pixels), mean, std)).all()
