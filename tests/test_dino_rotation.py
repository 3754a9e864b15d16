"""DINO and rotation prediction against slow, obviously-correct references: the DINO loss as a loop
over (teacher view, student view) pairs, its center, teacher temperature and EMA as their formulas,
multi-crop batches as one crop at a time, rotations as pixel moves; a killed and resumed DINO run
ends bit-identical to an uninterrupted one. (The short DINO run on CIFAR-10 against a random ViT is in
test_ssl_methods_cifar.py.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_vision_resume import RECIPE as RESUME_RECIPE
from test_vision_resume import assert_same_weights, killed_then_resumed_weights, reference_weights

from lmssl.data.views import ViewOptions, apply_crop_sets, draw_crop_sets, draw_views, normalize
from lmssl.models import ModelConfig
from lmssl.objectives.dino import (DINO, DINOModule, dino_loss, default_local_size, teacher_temperature,
                                   update_center)
from lmssl.objectives.rotation import Rotation, rotate_four
from lmssl.objectives.vision import image_processor
from lmssl.rng import seed_all
from lmssl.schema import parse_dataclass

MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
TINY_DINO = {"prototypes": 64, "head_hidden": 32, "bottleneck": 16, "local_crops": 2}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make(cls, args: dict, size: int = 32, patch: int = 8):
    """(objective, training module) of a tiny ViT, as the pretrain stage builds them."""
    objective = cls(parse_dataclass(cls.Options, args, "args"), image_processor(size, MEAN, STD))
    seed_all(0)
    model = objective.build_model(ModelConfig(family="vit", size="tiny", image_size=size, patch_size=patch))
    objective.check_model(model, "stages.s")
    return objective, objective.training_module(model)


def examples(n: int, size: int = 32, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"pixels": rng.integers(0, 256, (3, size, size), dtype=np.uint8)} for _ in range(n)]


# --- DINO's math -----------------------------------------------------------------------------------

def reference_dino_loss(student, teacher, center, student_temp, teacher_temp, global_views=2):
    """The paper's Algorithm 1 with multi-crop: one (teacher view, student view) pair at a time."""
    n = teacher.shape[0] // global_views
    views = student.shape[0] // n
    total, terms = 0.0, 0
    for g in range(global_views):
        q = torch.softmax((teacher[g * n:(g + 1) * n].detach() - center) / teacher_temp, dim=1)
        for v in range(views):
            if v == g:
                continue
            log_p = torch.log_softmax(student[v * n:(v + 1) * n] / student_temp, dim=1)
            total = total + (-(q * log_p).sum(1)).mean()
            terms += 1
    return total / terms


@pytest.mark.parametrize("n, local, k, student_temp, teacher_temp",
                         [(1, 0, 5, 0.1, 0.04), (4, 2, 16, 0.1, 0.07), (3, 6, 33, 0.5, 0.2), (8, 1, 7, 1.0, 1.0)])
def test_dino_loss_equals_a_loop_over_teacher_and_student_view_pairs_with_gradients(n, local, k, student_temp,
                                                                                    teacher_temp):
    g = gen(n * 100 + k)
    student = torch.randn((2 + local) * n, k, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2 * n, k, generator=g, dtype=torch.float64, requires_grad=True)
    center = torch.randn(1, k, generator=g, dtype=torch.float64)
    got = dino_loss(student, teacher, center, student_temp, teacher_temp)
    (got_grad,) = torch.autograd.grad(got, student, retain_graph=True)
    student_ref = student.detach().clone().requires_grad_(True)
    want = reference_dino_loss(student_ref, teacher, center, student_temp, teacher_temp)
    want.backward()
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    assert torch.allclose(got_grad, student_ref.grad, rtol=1e-9, atol=1e-12)
    got.backward()
    assert teacher.grad is None, "no gradient reaches the teacher"


def test_center_update_is_an_ema_of_the_teacher_batch_mean():
    g = gen(1)
    center, logits = torch.randn(1, 10, generator=g), torch.randn(12, 10, generator=g)
    want = 0.9 * center + 0.1 * logits.mean(0, keepdim=True)
    update_center(center, logits, 0.9)
    assert torch.allclose(center, want, atol=1e-6)


def test_teacher_temperature_warms_up_linearly_from_a_ratio_or_a_step_count_then_holds():
    def temp(step, total=100, ratio=0.1, steps=None):
        return teacher_temperature(step, total, 0.04, 0.07, ratio, steps)

    assert [round(temp(s), 6) for s in (0, 5, 10, 11, 100)] == [0.04, 0.055, 0.07, 0.07, 0.07]
    assert [round(temp(s, steps=20), 6) for s in (0, 10, 20)] == [0.04, 0.055, 0.07]
    assert temp(0, ratio=0.0) == 0.07 and temp(0, steps=0) == 0.07            # no warmup: the final value
    assert temp(0, total=1) == temp(0, total=10_000) == 0.04                  # step 0 needs no run length
    assert default_local_size(224, 16) == 96 and default_local_size(32, 8) == 16 and default_local_size(16, 4) == 8


def test_dino_teacher_gets_no_gradient_follows_the_student_by_cosine_ema_and_keeps_its_schedule_in_buffers():
    objective, module = make(DINO, dict(TINY_DINO, teacher_temp_warmup_steps=4, teacher_momentum=0.9))
    assert isinstance(module, DINOModule) and float(module.teacher_temp) == pytest.approx(0.04)
    assert {"center", "teacher_temp"} <= set(module.state_dict())           # checkpoints keep them
    seed_all(3)
    batch = objective.collate(examples(4))
    loss, stats = objective.loss(module, batch)
    assert set(stats) == {"loss", "embedding_std", "teacher_entropy"} and stats["embedding_std"][0] > 0
    center = module.center.clone()
    assert center.abs().sum() > 0, "a training loss moves the center"
    loss.backward()
    assert all(p.grad is None for p in module.teacher.parameters())
    assert all(p.grad is not None for p in module.student.parameters())
    torch.optim.SGD(module.student.parameters(), lr=0.5).step()
    before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    objective.after_step(module, 1, 10)
    momentum = 1 - (1 - 0.9) * (math.cos(math.pi * 1 / 10) + 1) / 2
    student = module.student.state_dict()
    for name, value in module.teacher.state_dict().items():
        assert torch.allclose(value, momentum * before[name] + (1 - momentum) * student[name], atol=1e-6), name
    assert float(module.teacher_temp) == pytest.approx(0.04 + 0.03 / 4)       # the temperature of step 2
    module.eval()
    with torch.no_grad():
        objective.loss(module, batch)
    assert torch.equal(module.center, center), "evaluation leaves the center alone"


# --- multi-crop ------------------------------------------------------------------------------------

def reference_crop(image: torch.Tensor, box, flip: bool, size: int) -> torch.Tensor:
    """One view: cut the box out, resize it bilinearly, flip it: the crop-then-resize of torchvision."""
    top, left, h, w = (int(v) for v in box)
    x = image[None, :, top:top + h, left:left + w].float() / 255.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x.flip(3) if flip else x)[0].clamp(0, 1)


def test_crop_sets_equal_one_crop_at_a_time_and_come_out_one_batch_per_size():
    geometry = dict(jitter=0.0, grayscale=0.0, blur=0.0, solarize=0.0)
    sets = [(1, ViewOptions(crop_scale=[0.4, 1.0], **geometry)), (1, ViewOptions(crop_scale=[0.4, 1.0], **geometry)),
            (3, ViewOptions(crop_scale=[0.05, 0.4], **geometry))]
    n, sizes = 5, [32, 32, 16]
    images = torch.from_numpy(np.stack([e["pixels"] for e in examples(n, seed=4)]))
    drawn = draw_crop_sets(n, 32, 32, sets, gen(7))
    g = gen(7)   # the sets are draw_views of count * n views each, drawn in turn from the one generator
    for (count, options), views in zip(sets, drawn):
        again = draw_views(count * n, 32, 32, options, g)
        assert all(torch.equal(views[key], again[key]) for key in views)
    made = apply_crop_sets(images, drawn, sizes, MEAN, STD)
    assert [tuple(x.shape) for x in made] == [(5, 3, 32, 32), (5, 3, 32, 32), (15, 3, 16, 16)]
    for views, size, batch in zip(drawn, sizes, made):
        for row in range(batch.shape[0]):
            image = images[row % n]                                   # crop-major: row c * n + i is crop c of image i
            want = normalize(reference_crop(image, views["crop"][row], bool(views["flip"][row]), size)[None],
                             MEAN, STD)[0]
            assert torch.allclose(batch[row], want, atol=1e-5), row


class Recorder(torch.nn.Module):
    """Wraps the training module as DDP does (`.module`), noting the pixel batches each forward gets."""

    def __init__(self, module):
        super().__init__()
        self.module, self.shapes = module, []

    def forward(self, *pixels):
        self.shapes.append([tuple(p.shape) for p in pixels])
        return self.module(*pixels)


def test_dino_gives_the_student_globals_and_locals_in_one_batch_each_and_the_teacher_globals_only():
    objective, module = make(DINO, TINY_DINO)
    recorder = Recorder(module)
    seed_all(5)
    objective.loss(recorder, objective.collate(examples(3)))
    assert recorder.shapes == [[(6, 3, 32, 32), (6, 3, 16, 16)]]      # 2 globals and 2 locals of 3 images
    globals_ = torch.randn(6, 3, 32, 32)
    student, teacher, cls = module(globals_, torch.randn(6, 3, 16, 16))
    assert student.shape == (12, 64) and teacher.shape == (6, 64) and cls.shape == (6, 64)
    assert torch.allclose(teacher, module.teacher(globals_)[1])


# --- rotation --------------------------------------------------------------------------------------

def test_rotations_turn_counter_clockwise_by_quarter_turns_and_are_labelled_by_them():
    image = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)   # no two pixels alike
    turned, labels = rotate_four(image)
    assert turned.shape == (8, 3, 4, 4) and labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    for row in range(8):
        k, x, y = int(labels[row]), image[row % 2], turned[row]
        for i in range(4):
            for j in range(4):   # counter-clockwise by 90k degrees: where pixel (i, j) of the turned image came from
                src = [(i, j), (j, 3 - i), (3 - i, 3 - j), (3 - j, i)][k]
                assert torch.equal(y[:, i, j], x[:, src[0], src[1]])
    marked = torch.zeros(1, 1, 4, 4)
    marked[0, 0, 0, 3] = 1.0                                          # the top-right pixel
    corners = [tuple(int(v) for v in (t[0] == 1).nonzero()[0]) for t in rotate_four(marked)[0]]
    assert corners == [(0, 3), (0, 0), (3, 0), (3, 3)]               # top-right -> top-left -> bottom-left -> bottom-right


def test_rotation_loss_is_the_cross_entropy_of_each_turned_view_and_its_accuracy_counts_hits():
    from lmssl.data.views import apply_views
    from lmssl.objectives.vision import views_of

    objective, module = make(Rotation, {"head_hidden": 16})
    seed_all(2)
    batch = objective.collate(examples(3))
    loss, stats = objective.loss(module, batch)
    pixels = apply_views(batch["images"], views_of(batch, "views"), 32, MEAN, STD)
    losses, hits = [], 0
    for i in range(3):
        for k in range(4):
            logits = module(torch.rot90(pixels[i:i + 1], k, dims=(2, 3)))
            losses.append(F.cross_entropy(logits, torch.tensor([k])))
            hits += int(logits.argmax(1).item() == k)
    assert loss.item() == pytest.approx(torch.stack(losses).mean().item(), abs=1e-5)
    assert stats["loss"][1] == 12 and stats["rotation_accuracy"] == (float(hits), 12.0)


# --- resume and a real run -------------------------------------------------------------------------

RESUME_ARGS = ("{prototypes: 128, head_hidden: 32, bottleneck: 16, local_crops: 2, teacher_momentum: 0.9, "
               "teacher_temp_warmup_ratio: 0.6, local_views: {blur: 0.5}}")  # the temperature still rises at the kills


def test_sigkill_during_dino_then_resume_gives_identical_teacher_head_and_center(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RESUME_RECIPE.replace("OBJECTIVE", "dino").replace("ARGS", RESUME_ARGS))
    expected = reference_weights(recipe, tmp_path)
    assert set(expected) == {"backbone", "dino_head.safetensors"}
    assert expected["dino_head.safetensors"]["center"].abs().sum() > 0
    assert_same_weights(killed_then_resumed_weights(recipe, tmp_path, "dino"), expected)
