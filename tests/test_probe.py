"""The probe stage on real CIFAR-10 images: a short SimCLR run beats the same ViT from random
initialization in a linear probe and in kNN; every output reloads with the Auto classes and the
image-classification pipeline predicts exactly what the probe scored; fine-tuning mode; errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import shared_file

from lmssl import load_recipe, run_recipe
from lmssl.errors import RecipeError

SIMCLR_THEN_PROBE = """\
name: probe-test
seed: 0
stages:
  - name: simclr
    kind: pretrain
    objective: simclr
    objective_args: {{temperature: 0.2, projection_hidden: 256, views: {{strength: 0.5, blur: 0.0}}}}
    model: {{family: vit, size: tiny, image_size: 32, patch_size: 8}}
    data: {{path: "{cifar}", split: train, max_samples: 4000, eval_fraction: 0}}
    batch_size: 128
    learning_rate: 2.0e-3
    weight_decay: 0.05
    max_steps: 400
    knn: {{enabled: false}}
  - name: probe
    kind: probe
    model_from: simclr
    data: {{path: "{cifar}", split: train, max_samples: 2000, eval_split: sample}}
    scratch_baseline: true
"""


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    cifar = shared_file("cifar10")
    root = tmp_path_factory.mktemp("probe")
    (root / "recipe.yaml").write_text(SIMCLR_THEN_PROBE.format(cifar=cifar))
    outputs = run_recipe(load_recipe(root / "recipe.yaml"), run_dir=root / "run")
    return root / "run", outputs


def test_short_simclr_run_beats_random_init_in_linear_probe_and_knn_on_cifar(probed):
    run_dir, outputs = probed
    metrics = outputs["probe"].metrics
    assert metrics["simclr/top1"] > metrics["scratch/top1"] + 0.03, metrics         # measured 33.4 vs 28.0
    assert metrics["simclr/knn_top1"] > metrics["scratch/knn_top1"] + 0.02, metrics  # measured 29.0 vs 24.0
    rows = json.loads((run_dir / "probe" / "results.json").read_text())["results"]
    assert [(r["backbone"], r["init"], r["test_images"]) for r in rows] == [("simclr", "pretrained", 500),
                                                                         ("scratch", "scratch", 500)]
    summary = (run_dir / "summary.md").read_text()
    assert "| simclr | pretrained |" in summary and "| scratch | scratch |" in summary


def test_probe_folder_runs_in_the_image_classification_pipeline_and_predicts_what_the_probe_scored(probed):
    from PIL import Image
    from transformers import ViTForImageClassification, pipeline
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    run_dir, outputs = probed
    folder = run_dir / "probe" / "simclr"
    model = ViTForImageClassification.from_pretrained(folder)
    names = [model.config.id2label[i] for i in range(10)]
    assert names == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    processor = AutoImageProcessor.from_pretrained(folder)
    assert processor.size["height"] == 32 and processor.image_mean != [0.5, 0.5, 0.5]  # the data's own statistics
    classify = pipeline("image-classification", model=str(folder), device=-1)
    files = sorted(shared_file("cifar10/sample").glob("*/*.jpg"))
    images = [Image.open(f).convert("RGB") for f in files]
    predicted = [top[0]["label"] for top in classify(images, top_k=1, batch_size=100)]
    accuracy = sum(p == f.parent.name for p, f in zip(predicted, files)) / len(files)
    assert accuracy == pytest.approx(outputs["probe"].metrics["simclr/top1"], abs=1e-9)


def test_pretrained_backbone_reloads_as_vit_model_classifier_and_processor(probed):
    from transformers import ViTForImageClassification, ViTModel
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    run_dir, _ = probed
    folder = run_dir / "simclr"
    backbone = ViTModel.from_pretrained(folder, add_pooling_layer=False)
    classifier = ViTForImageClassification.from_pretrained(folder, num_labels=3)
    assert torch.equal(backbone.embeddings.cls_token, classifier.vit.embeddings.cls_token)
    processor = AutoImageProcessor.from_pretrained(folder)
    pixels = processor(images=[torch.zeros(3, 32, 32, dtype=torch.uint8).numpy().transpose(1, 2, 0)],
                       return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    assert backbone(pixel_values=pixels).last_hidden_state.shape == (1, 17, 64)
    assert (folder / "pretraining" / "projection_head.safetensors").is_file()
    card = (folder / "README.md").read_text()
    assert "pipeline_tag: image-feature-extraction" in card and "simclr" in card


DIGITS_FINETUNE = """\
name: ft
seed: 0
stages:
  - name: mae
    kind: pretrain
    objective: mae
    objective_args: {decoder_width: 32, decoder_depth: 1, flip: 0.0}
    model: {family: vit, size: tiny, image_size: 16, patch_size: 4}
    data: {path: "builtin:digits", eval_split: test}
    batch_size: 64
    max_steps: 20
    eval_every: 10
  - name: probe
    kind: probe
    model_from: mae
    mode: finetune
    epochs: 10
    views: {flip: 0.0, crop_scale: [0.6, 1.0]}
    data: {path: "builtin:digits", eval_split: test}
"""


def test_finetune_mode_trains_the_whole_classifier_and_the_knn_monitor_is_logged(tmp_path):
    from transformers import ViTForImageClassification

    (tmp_path / "r.yaml").write_text(DIGITS_FINETUNE)
    outputs = run_recipe(load_recipe(tmp_path / "r.yaml"), run_dir=tmp_path / "run")
    assert outputs["probe"].metrics["mae/top1"] > 0.5                              # ten classes: chance is 0.1
    from transformers import ViTModel

    model = ViTForImageClassification.from_pretrained(tmp_path / "run" / "probe" / "mae")
    pretrained = ViTModel.from_pretrained(tmp_path / "run" / "mae", add_pooling_layer=False)
    assert not torch.equal(model.vit.embeddings.cls_token, pretrained.embeddings.cls_token)  # fine-tuned, not frozen
    records = [json.loads(line) for line in (tmp_path / "run" / "mae" / "metrics.jsonl").read_text().splitlines()]
    knn = [(r["step"], r["eval/knn_top1"]) for r in records if "eval/knn_top1" in r]
    assert [step for step, _ in knn] == [10, 20] and all(0.1 < v <= 1 for _, v in knn)
    assert (tmp_path / "run" / "mae" / "loss.png").stat().st_size > 1000
    assert "eval/knn_top1" in outputs["mae"].headline
    # the monitor's last figure, by brute force from the saved backbone: every training image votes
    from lmssl.data.images import load_image_splits
    from lmssl.recipe import DataConfig
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    splits = load_image_splits(DataConfig(path="builtin:digits", eval_split="test"), 16, 0, "t")
    processor = AutoImageProcessor.from_pretrained(tmp_path / "run" / "mae")

    def features(data):
        rows = data[:]
        pixels = processor(images=[p.transpose(1, 2, 0) for p in rows["pixels"]], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            return pretrained.eval()(pixel_values=pixels).last_hidden_state[:, 0], torch.tensor(rows["label"])

    (bank, bank_labels), (queries, labels) = features(splits.train), features(splits.eval)
    bank = torch.nn.functional.normalize(bank, dim=1)
    hits = 0
    for query, label in zip(torch.nn.functional.normalize(queries, dim=1), labels):
        similarity = bank @ query
        top = similarity.argsort(descending=True)[:20]
        votes = torch.zeros(10).index_add_(0, bank_labels[top], (similarity[top] / 0.07).exp())
        hits += int(votes.argmax() == label)
    assert hits / len(labels) == pytest.approx(knn[-1][1], abs=1.5 / len(labels))


def test_probe_of_a_text_model_and_of_unlabeled_images_are_clear_errors(tmp_path):
    text = """\
name: bad
stages:
  - {name: tok, kind: tokenizer, vocab_size: 300, data: {path: "builtin:pydocs", max_samples: 50}}
  - {name: pre, kind: pretrain, tokenizer_from: tok, max_steps: 1}
  - {name: probe, kind: probe, model_from: pre}
"""
    (tmp_path / "text.yaml").write_text(text)
    with pytest.raises(RecipeError, match=r"stages\.probe\.model_from: stage 'pre' pretrains a text model"):
        load_recipe(tmp_path / "text.yaml")
    from PIL import Image
    from transformers import ViTConfig, ViTModel

    folder = tmp_path / "loose"                                    # images without class folders: unlabeled
    folder.mkdir()
    for i in range(30):
        Image.new("RGB", (8, 8), (i * 8, 0, 0)).save(folder / f"{i}.png")
    backbone = tmp_path / "backbone"
    ViTModel(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64), add_pooling_layer=False).save_pretrained(backbone)
    (tmp_path / "unlabeled.yaml").write_text(f"""\
name: bad2
stages:
  - {{name: probe, kind: probe, model_from: "{backbone}", data: {{path: "{folder}"}}}}
""")
    proc = subprocess.run([sys.executable, "-m", "lmssl", "run", str(tmp_path / "unlabeled.yaml"), "--run-dir",
                           str(tmp_path / "run")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "stages.probe.data.label_column" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "probe").exists()
