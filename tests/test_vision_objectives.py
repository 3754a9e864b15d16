"""Vision objectives against slow, obviously-correct references: NT-Xent and its gradients, MAE's
initialization and its loss on real CIFAR-10 images, the kNN classifier, the linear probe."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import shared_file

from lmssl.data.views import ViewOptions
from lmssl.evaluation import knn_accuracy, knn_predict, linear_probe
from lmssl.models import ModelConfig, sincos_positions
from lmssl.objectives.mae import MaskedAutoencoder, Options as MaeOptions
from lmssl.objectives.simclr import Options as SimCLROptions, SimCLR, nt_xent
from lmssl.objectives.vision import image_processor


def slow_nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent written out as in the SimCLR paper (eq. 1): for each of the 2N views, the positive is
    its other view, the denominator sums over every other view."""
    n2 = z.shape[0]
    total = 0.0
    for i in range(n2):
        partner = (i + n2 // 2) % n2
        sims = [torch.dot(z[i], z[k]) / (z[i].norm() * z[k].norm()) / temperature for k in range(n2)]
        denominator = sum(torch.exp(sims[k]) for k in range(n2) if k != i)
        total = total - torch.log(torch.exp(sims[partner]) / denominator)
    return total / n2


@pytest.mark.parametrize("n", [2, 5, 16])
@pytest.mark.parametrize("temperature", [0.07, 0.2, 0.5, 1.0])
def test_nt_xent_equals_the_papers_formula_with_gradients(n, temperature):
    g = torch.Generator().manual_seed(n * 100 + int(temperature * 100))
    z = torch.randn(2 * n, 8, generator=g, dtype=torch.float64)
    fast_z, slow_z = z.clone().requires_grad_(), z.clone().requires_grad_()
    fast = nt_xent(fast_z, temperature)
    slow = slow_nt_xent(slow_z, temperature)
    fast.backward()
    slow.backward()
    assert torch.allclose(fast.double(), slow, rtol=1e-5, atol=1e-6), (fast, slow)
    assert torch.allclose(fast_z.grad, slow_z.grad, rtol=1e-4, atol=1e-6)
    assert fast_z.grad.abs().sum() > 0


def test_nt_xent_is_low_when_views_agree_and_high_when_they_do_not():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, 16, generator=g)
    agree = nt_xent(torch.cat([base, base + 0.01 * torch.randn(8, 16, generator=g)]), 0.1)
    shuffled = nt_xent(torch.cat([base, base[torch.randperm(8, generator=g)]]), 0.1)
    assert agree < 0.1 < math.log(15) - 1 < shuffled


# --------------------------------------------------------------------------- MAE


def cifar_sample(limit=500) -> torch.Tensor:
    from PIL import Image

    files = sorted(shared_file("cifar10/sample").glob("*/*.jpg"))[:limit]
    return torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")).transpose(2, 0, 1) for f in files]))


def mae_objective(size=32, **options):
    stats = ([0.49, 0.48, 0.45], [0.25, 0.24, 0.26])
    opts = MaeOptions(decoder_width=64, decoder_depth=1, flip=0.5, **options)
    return MaskedAutoencoder(opts, image_processor(size, *stats))


def test_mae_built_from_config_has_sine_cosine_positions_and_xavier_linears():
    objective = mae_objective()
    model = objective.build_model(ModelConfig(family="vit", size="tiny"))
    grid = 32 // 4
    expected = sincos_positions(64, grid)
    assert torch.equal(model.vit.embeddings.position_embeddings[0], expected)
    assert torch.equal(model.decoder.decoder_pos_embed[0], sincos_positions(64, grid))
    assert expected[1:].abs().sum() > 0 and expected[0].abs().sum() == 0          # CLS row zero, patches not
    # a row encodes (row, column): patches in one row share the first half, patches in one column the second
    assert torch.equal(expected[1, :32], expected[2, :32]) and not torch.equal(expected[1, 32:], expected[2, 32:])
    assert torch.equal(expected[1, 32:], expected[1 + grid, 32:])
    fc = model.vit.layers[0].mlp.fc1.weight
    bound = math.sqrt(6 / (fc.shape[0] + fc.shape[1]))
    assert fc.abs().max() <= bound and fc.abs().max() > 0.9 * bound                 # Xavier-uniform, not N(0, .02)


def test_mae_loss_falls_on_cifar_sample_images_below_the_mean_image():
    from lmssl.data.views import to_pixels
    from lmssl.rng import seed_all

    images = cifar_sample()
    objective = mae_objective(norm_pix_loss=False)
    seed_all(0)
    model = objective.build_model(ModelConfig(family="vit", size="tiny"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.05)
    examples = [{"pixels": img.numpy(), "label": 0} for img in images]
    losses = []
    for step in range(60):
        seed_all(step)
        batch = objective.collate([examples[i] for i in torch.randint(len(examples), (64,)).tolist()])
        loss, stats = objective.loss(model, batch)
        assert set(stats) == set(objective.stat_names)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    seed_all(123)
    batch = objective.collate(examples[:256])
    with torch.no_grad():
        held = objective.loss(model, batch)[0].item()
    pixels = to_pixels(images[:256], objective.mean, objective.std)
    mean_image = ((pixels - pixels.mean(0, keepdim=True)) ** 2).mean().item()  # predicting every image's average
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5]), losses
    assert held < 0.9 * mean_image, (held, mean_image)


def test_mae_masks_come_from_the_batch_seed_and_follow_the_mask_ratio():
    from lmssl.rng import seed_all

    objective = mae_objective(mask_ratio=0.75)
    model = objective.build_model(ModelConfig(family="vit", size="tiny"))
    examples = [{"pixels": img.numpy(), "label": 0} for img in cifar_sample(16)]
    seed_all(5)
    first = objective.collate(examples)
    seed_all(5)
    again = objective.collate(examples)
    seed_all(6)
    other = objective.collate(examples)
    assert torch.equal(first["noise"], again["noise"]) and not torch.equal(first["noise"], other["noise"])
    out = model(pixel_values=objective.pixels(first["images"]), noise=first["noise"])
    assert out.mask.sum(1).tolist() == [48.0] * 16                                   # 75% of 64 patches hidden
    kept = torch.argsort(first["noise"], 1)[:, :16]
    assert torch.equal(out.mask.gather(1, kept), torch.zeros(16, 16))                # lowest noise stays visible


def test_mae_backbone_is_the_encoder_as_a_vit_model():
    objective = mae_objective()
    model = objective.build_model(ModelConfig(family="vit", size="tiny"))
    backbone = objective.backbone(model).eval()
    model.eval()
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = objective.encode(model, pixels)
        got = backbone(pixel_values=pixels).last_hidden_state[:, 0]
    assert type(backbone).__name__ == "ViTModel"
    assert torch.allclose(expected, got, atol=1e-5)


def test_simclr_views_come_from_the_batch_seed_and_the_two_views_differ():
    from lmssl.data.views import apply_views
    from lmssl.objectives.vision import views_of
    from lmssl.rng import seed_all

    objective = SimCLR(SimCLROptions(), image_processor(32, [0.5] * 3, [0.25] * 3))
    examples = [{"pixels": img.numpy(), "label": 0} for img in cifar_sample(8)]
    seed_all(1)
    batch = objective.collate(examples)
    seed_all(1)
    again = objective.collate(examples)
    assert batch.keys() == again.keys()
    assert all(torch.equal(batch[k], again[k]) if torch.is_tensor(batch[k]) else batch[k] == again[k] for k in batch)
    views = apply_views(batch["images"].repeat(2, 1, 1, 1), views_of(batch, "views"), 32)
    assert views.shape == (16, 3, 32, 32)
    assert all(not torch.allclose(views[i], views[i + 8]) for i in range(8))


# --------------------------------------------------------------------------- kNN and the linear probe


def brute_force_knn(bank, bank_labels, queries, k, temperature, classes):
    predictions = []
    for q in queries:
        sims = [(float(torch.dot(q, b) / (q.norm() * b.norm())), int(label)) for b, label in zip(bank, bank_labels)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * classes
        for sim, label in sims[:k]:
            votes[label] += math.exp(sim / temperature)
        predictions.append(max(range(classes), key=lambda c: (votes[c], -c)))
    return torch.tensor(predictions)


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.1), (20, 0.5), (200, 0.07)])
def test_knn_equals_a_brute_force_vote(k, temperature):
    g = torch.Generator().manual_seed(k)
    centers = torch.randn(4, 6, generator=g)
    bank_labels = torch.randint(4, (120,), generator=g)
    bank = centers[bank_labels] + 0.8 * torch.randn(120, 6, generator=g)
    query_labels = torch.randint(4, (40,), generator=g)
    queries = centers[query_labels] + 0.8 * torch.randn(40, 6, generator=g)
    fast = knn_predict(bank, bank_labels, queries, k, temperature, 4, chunk=7)   # chunks of 7 queries
    slow = brute_force_knn(bank, bank_labels, queries, min(k, 120), temperature, 4)
    assert torch.equal(fast, slow)
    accuracy = knn_accuracy(bank, bank_labels, queries, query_labels, k, temperature, 4)
    assert accuracy == pytest.approx(float((slow == query_labels).float().mean()))
    assert accuracy > 0.5


def test_linear_probe_folds_standardization_and_matches_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 5, generator=g) * 2
    labels = torch.randint(3, (300,), generator=g)
    scale = torch.tensor([1.0, 10.0, 0.1, 3.0, 100.0])                             # wildly different scales
    features = (centers[labels] + torch.randn(300, 5, generator=g)) * scale + 7.0
    weight, bias, l2 = linear_probe(features, labels, 3, l2=1e-3)
    assert l2 == 1e-3
    x = ((features - features.mean(0)) / features.std(0)).double().numpy()
    reference = LogisticRegression(C=1 / (1e-3 * 300), max_iter=10_000, tol=1e-10).fit(x, labels.numpy())
    ours = (features @ weight.T + bias).argmax(1).numpy()
    assert (ours == reference.predict(x)).mean() > 0.99
    reference_probabilities = reference.predict_proba(x)
    probabilities = torch.softmax((features @ weight.T + bias).double(), 1).numpy()
    assert np.abs(probabilities - reference_probabilities).max() < 1e-3


def test_linear_probe_picks_a_strong_penalty_where_few_examples_meet_many_dimensions_and_it_pays_off():
    g = torch.Generator().manual_seed(1)

    def sample(n):  # 100 noisy dimensions that each carry a little of the class: averaging them pays
        labels = torch.randint(2, (n,), generator=g)
        return torch.randn(n, 100, generator=g) + 0.3 * labels[:, None], labels

    (train_x, train_y), (test_x, test_y) = sample(80), sample(2000)
    chosen, again = linear_probe(train_x, train_y, 2, seed=3), linear_probe(train_x, train_y, 2, seed=3)
    assert chosen[2] == again[2] and torch.equal(chosen[0], again[0])               # reproducible for a seed
    assert chosen[2] >= 1e-2, chosen[2]
    weakest = linear_probe(train_x, train_y, 2, l2=1e-6)

    def accuracy(probe):
        return float(((test_x @ probe[0].T + probe[1]).argmax(1) == test_y).float().mean())

    assert accuracy(chosen) > accuracy(weakest) + 0.015, (accuracy(chosen), accuracy(weakest))   # 86.6 vs 84.3


def test_view_options_in_objective_args_are_checked():
    from lmssl.errors import RecipeError

    with pytest.raises(RecipeError, match=r"objective_args\.views\.flip"):
        SimCLROptions(views=ViewOptions(flip=2.0)).check("stages.s.objective_args")
    with pytest.raises(RecipeError, match=r"temperature"):
        SimCLROptions(temperature=0.0).check("stages.s.objective_args")
    with pytest.raises(RecipeError, match=r"mask_ratio"):
        MaeOptions(mask_ratio=1.0).check("stages.m.objective_args")


# --------------------------------------------------------------------------- warm starts

def test_warm_starts_continue_what_an_lmssl_folder_or_a_vit_folder_holds(tmp_path):
    from accelerate import Accelerator
    from transformers import ViTConfig, ViTModel

    accelerator = Accelerator(cpu=True)
    objective = mae_objective()
    first = objective.build_model(ModelConfig(family="vit", size="tiny"))
    with torch.no_grad():
        first.decoder.decoder_pred.bias.fill_(0.25)                        # something a fresh model lacks
    objective.save(accelerator, first, tmp_path / "mae")
    again = mae_objective().build_model(ModelConfig(family="vit", init_from=str(tmp_path / "mae")))
    assert torch.equal(again.decoder.decoder_pred.bias, first.decoder.decoder_pred.bias)   # decoder continues
    assert torch.equal(again.vit.layers[1].mlp.fc2.weight, first.vit.layers[1].mlp.fc2.weight)

    vit = ViTModel(ViTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=128), add_pooling_layer=False)
    vit.save_pretrained(tmp_path / "vit")
    from_vit = mae_objective().build_model(ModelConfig(family="vit", init_from=str(tmp_path / "vit")))
    assert torch.equal(from_vit.vit.layers[0].attention.q_proj.weight, vit.layers[0].attention.q_proj.weight)
    assert from_vit.decoder.decoder_pos_embed.abs().sum() > 0                   # a fresh decoder, MAE-initialized

    simclr = SimCLR(SimCLROptions(projection_hidden=32), image_processor(32, [0.5] * 3, [0.25] * 3))
    module = simclr.training_module(simclr.build_model(ModelConfig(family="vit", size="tiny")))
    with torch.no_grad():
        module.head[0].bias.fill_(0.5)
    simclr.save(accelerator, module.backbone, tmp_path / "simclr")
    resumed = SimCLR(SimCLROptions(projection_hidden=32), image_processor(32, [0.5] * 3, [0.25] * 3))
    head = resumed.training_module(resumed.build_model(ModelConfig(family="vit", init_from=str(tmp_path / "simclr"))))
    assert torch.equal(head.head[0].bias, module.head[0].bias)                   # the projection head continues
    assert torch.equal(head.backbone.embeddings.cls_token, module.backbone.embeddings.cls_token)
