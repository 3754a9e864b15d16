"""Short CPU runs of the non-contrastive methods on real CIFAR-10 (one recipe, one probe stage, one
scratch baseline for all): BYOL and DINO backbones beat the same ViT from random initialization in a
linear probe on the 500 sample test images, and their collapse monitor stays well above zero."""

from __future__ import annotations

import json

import pytest

from conftest import shared_file

RECIPE = """\
name: methods-probe
seed: 0
stages:
  - name: byol
    kind: pretrain
    objective: byol
    objective_args: {{projection_hidden: 256, predictor_hidden: 256, projection_dim: 64, base_momentum: 0.9,
                     views: {{strength: 0.5, blur: 0.0}}}}
    model: {{family: vit, size: tiny, image_size: 32, patch_size: 8}}
    data: {{path: "{cifar}", split: train, max_samples: 4000, eval_split: sample}}
    batch_size: 64
    learning_rate: 2.0e-3
    weight_decay: 0.05
    max_steps: 400
    eval_every: 400
    eval_batches: 2
    knn: {{enabled: false}}
  - name: dino
    kind: pretrain
    objective: dino
    objective_args: {{prototypes: 256, head_hidden: 256, bottleneck: 64, teacher_momentum: 0.95, teacher_temp: 0.04,
                     local_crops: 2, global_views: {{blur: 0.0, jitter: 0.0}},
                     second_global_views: {{blur: 0.0, jitter: 0.0}}, local_views: {{blur: 0.0, jitter: 0.0}}}}
    model: {{family: vit, size: tiny, image_size: 32, patch_size: 8}}
    data: {{path: "{cifar}", split: train, max_samples: 4000, eval_fraction: 0.05}}
    batch_size: 64
    learning_rate: 1.0e-3
    weight_decay: 0.05
    warmup_ratio: 0.1
    max_steps: 150
    eval_batches: 2
    knn: {{enabled: false}}
  - name: probe
    kind: probe
    model_from: [byol, dino]
    data: {{path: "{cifar}", split: train, max_samples: 2000, eval_split: sample}}
    scratch_baseline: true
"""


@pytest.fixture(scope="module")
def methods(tmp_path_factory):
    from lmssl import load_recipe, run_recipe

    root = tmp_path_factory.mktemp("methods")
    (root / "recipe.yaml").write_text(RECIPE.format(cifar=shared_file("cifar10")))
    return root / "run", run_recipe(load_recipe(root / "recipe.yaml"), run_dir=root / "run")


def test_a_short_byol_run_beats_random_init_in_the_linear_probe_without_collapsing(methods):
    """400 steps of 64 images, a fast target (base momentum 0.9)."""
    run_dir, outputs = methods
    probe, byol = outputs["probe"].metrics, outputs["byol"].metrics
    assert probe["byol/top1"] > probe["scratch/top1"] + 0.015, probe
    assert byol["eval/embedding_std"] > 0.5, byol                      # 1.0 is healthy, 0 collapsed
    records = [json.loads(line) for line in (run_dir / "byol" / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval/embedding_std"] for r in records if "eval/embedding_std" in r] == [byol["eval/embedding_std"]]
    assert "eval/embedding_std" in outputs["byol"].headline


def test_a_short_dino_run_beats_random_init_in_the_linear_probe_without_collapsing(methods):
    """150 steps of 64 images (crops and flips only), 256 prototypes, a fast teacher (momentum 0.95) at a
    constant temperature 0.04: 0.996 would keep much of the random start this early."""
    _, outputs = methods
    probe, dino = outputs["probe"].metrics, outputs["dino"].metrics
    assert probe["dino/top1"] > probe["scratch/top1"] + 0.01, probe
    assert dino["eval/embedding_std"] > 0.3, dino                      # collapsed: ~0
    assert dino["eval/teacher_entropy"] < 0.95, dino                   # uniform collapse: 1
