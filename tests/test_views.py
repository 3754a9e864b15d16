"""lmssl.data.views against slow, obviously-correct references: a per-image loop of torchvision's
RandomResizedCrop/ColorJitter/GaussianBlur algorithms written here with math, random, colorsys,
numpy and PIL, on the CIFAR-10 sample JPEGs where real pixels matter."""

from __future__ import annotations

import colorsys
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import shared_file
from lmssl.data.views import (
    ViewOptions,
    apply_views,
    color_jitter,
    crop_resize_flip,
    draw_crops,
    draw_views,
    gaussian_blur,
    grayscale,
    normalize,
    to_pixels,
)
from lmssl.errors import RecipeError

LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601, written out again: the test must not borrow the module's
IDENTITY = dict(crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0], flip=0.0, jitter=0.0, grayscale=0.0, blur=0.0,
                solarize=0.0)  # every op off and the crop the whole (square) image
CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


@pytest.fixture(scope="module")
def cifar() -> torch.Tensor:
    """(20, 3, 32, 32) uint8: the first two sample JPEGs of each CIFAR-10 class, decoded by PIL."""
    folder = shared_file("cifar10/sample")
    paths = [p for cls in sorted(folder.iterdir()) for p in sorted(cls.glob("*.jpg"))[:2]]
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def plain_views(n: int, height: int, width: int, **overrides) -> dict:
    """Hand-made choices that do nothing (full crop, no flip, identity jitter, no gray/blur/solarize)."""
    views = {
        "crop": torch.tensor([[0.0, 0.0, height, width]]).repeat(n, 1),
        "flip": torch.zeros(n, dtype=torch.bool),
        "jitter": torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(n, 1),
        "order": torch.arange(4).repeat(n, 1),
        "gray": torch.zeros(n, dtype=torch.bool),
        "sigma": torch.zeros(n),
        "solarize": torch.zeros(n, dtype=torch.bool),
    }
    return {**views, **overrides}


# --- slow references, one image at a time ---------------------------------------------------------

def ref_crop_params(height: int, width: int, scale, ratio, rng: random.Random, tries: int = 10):
    """torchvision's RandomResizedCrop.get_params, in Python scalars."""
    area = height * width
    for _ in range(tries):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def ref_resize(image: torch.Tensor, box, flip: bool, size: int) -> torch.Tensor:
    """(C, H, W) -> (C, size, size): slice the box, bilinear resize (align_corners=False), flip."""
    top, left, h, w = (int(v) for v in box)
    region = image[None, :, top:top + h, left:left + w]
    out = F.interpolate(region, size=(size, size), mode="bilinear", align_corners=False)[0]
    return out.flip(-1) if flip else out


def ref_luma(x: np.ndarray) -> np.ndarray:
    """(3, H, W) -> (H, W)."""
    return LUMA[0] * x[0] + LUMA[1] * x[1] + LUMA[2] * x[2]


def ref_hue(x: np.ndarray, shift: float) -> np.ndarray:
    """(3, H, W) in [0, 1]: each pixel through colorsys, hue moved by `shift` turns (wrapping)."""
    out = np.empty_like(x)
    for i in range(x.shape[1]):
        for j in range(x.shape[2]):
            h, s, v = colorsys.rgb_to_hsv(*x[:, i, j])
            out[:, i, j] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
    return out


def ref_jitter(x: np.ndarray, factors, order) -> np.ndarray:
    """torchvision's ColorJitter on one (3, H, W) float image: blends clamped after every op."""
    b, c, s, hue = (float(f) for f in factors)
    for op in order:
        if op == 0:
            x = b * x
        elif op == 1:
            x = c * x + (1 - c) * ref_luma(x).mean()
        elif op == 2:
            x = s * x + (1 - s) * ref_luma(x)[None]
        elif hue != 0:
            x = ref_hue(x, hue)
        x = np.clip(x, 0, 1)
    return x


def ref_kernel_size(height: int, width: int) -> int:
    k = int(0.1 * min(height, width))  # a tenth of the side (SimCLR), made odd, never below 3
    return max(3, k + 1 if k % 2 == 0 else k)


def ref_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """(C, H, W): explicit 2-D convolution with the outer product of a normalized 1-D Gaussian,
    reflect padding (numpy's "reflect" leaves the edge pixel out, as torch's does)."""
    if sigma == 0:
        return x.copy()
    k = ref_kernel_size(*x.shape[1:])
    g = np.exp(-0.5 * (np.arange(k) - k // 2) ** 2 / sigma ** 2)
    kernel = np.outer(g, g) / g.sum() ** 2
    p = k // 2
    padded = np.pad(x, ((0, 0), (p, p), (p, p)), mode="reflect")
    out = np.empty_like(x)
    for i in range(x.shape[1]):
        for j in range(x.shape[2]):
            out[:, i, j] = (padded[:, i:i + k, j:j + k] * kernel).sum((1, 2))
    return out


def ref_apply(images: torch.Tensor, views: dict, size: int) -> torch.Tensor:
    """The whole SimCLR pipeline, image by image: crop+resize+flip, jitter, gray, blur, solarize."""
    out = []
    for i in range(len(images)):
        x = ref_resize(images[i].double() / 255, views["crop"][i].tolist(), bool(views["flip"][i]), size)
        x = ref_jitter(x.numpy(), views["jitter"][i].tolist(), views["order"][i].tolist())
        if views["gray"][i]:
            x = np.repeat(ref_luma(x)[None], 3, 0)
        x = ref_blur(x, float(views["sigma"][i]))
        if views["solarize"][i]:
            x = np.where(x >= 0.5, 1 - x, x)
        out.append(torch.from_numpy(x))
    return torch.stack(out)


# --- 1. shapes, dtypes, range, normalization ------------------------------------------------------

@pytest.mark.parametrize("size", [16, 32, 48])
@pytest.mark.parametrize("n", [1, 7])
def test_apply_views_gives_float32_views_of_the_requested_size_in_unit_range(cifar, size, n):
    options = ViewOptions(solarize=0.5)
    views = draw_views(n, 32, 32, options, gen(n * 100 + size))
    out = apply_views(cifar[:n], views, size)
    assert out.shape == (n, 3, size, size) and out.dtype == torch.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_normalized_views_are_unit_views_minus_mean_over_std(cifar):
    views = draw_views(10, 32, 32, ViewOptions(), gen(1))
    plain = apply_views(cifar[:10], views, 24)
    normed = apply_views(cifar[:10], views, 24, CIFAR_MEAN, CIFAR_STD)
    mean, std = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(normed, (plain - mean) / std, rtol=0, atol=1e-5)
    assert normalize(plain) is plain
    pixels = to_pixels(cifar[:2], CIFAR_MEAN, CIFAR_STD)
    torch.testing.assert_close(pixels[1, 2, 3, 4], (cifar[1, 2, 3, 4] / 255 - CIFAR_MEAN[2]) / CIFAR_STD[2])


def test_apply_views_matches_a_per_image_reference_of_the_whole_pipeline(cifar):
    views = draw_views(8, 32, 32, ViewOptions(solarize=0.3), gen(7))
    views["sigma"][:3] = torch.tensor([0.0, 0.7, 1.6])  # blur on at least two views whatever the draw
    out = apply_views(cifar[:8], views, 28)
    torch.testing.assert_close(out.double(), ref_apply(cifar[:8], views, 28), rtol=0, atol=1e-4)


# --- 2. reproducibility ---------------------------------------------------------------------------

def test_same_seed_gives_identical_views_and_other_seeds_or_second_views_differ(cifar):
    first, again = draw_views(20, 32, 32, ViewOptions(), gen(3)), draw_views(20, 32, 32, ViewOptions(), gen(3))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert torch.equal(apply_views(cifar, first, 32), apply_views(cifar, again, 32))
    other = draw_views(20, 32, 32, ViewOptions(), gen(4))
    assert not torch.equal(first["crop"], other["crop"])
    assert not torch.equal(apply_views(cifar, first, 32), apply_views(cifar, other, 32))
    pair = apply_views(cifar.repeat(2, 1, 1, 1), draw_views(40, 32, 32, ViewOptions(), gen(5)), 32)
    a, b = pair[:20], pair[20:]
    assert all(not torch.equal(a[i], b[i]) for i in range(20))  # SimCLR's two views of each image differ


# --- 3. draw_crops --------------------------------------------------------------------------------

@pytest.mark.parametrize("height,width", [(32, 32), (24, 40), (100, 30)])
def test_crop_boxes_are_whole_pixels_inside_the_image(height, width):
    boxes = draw_crops(2000, height, width, [0.08, 1.0], [3 / 4, 4 / 3], gen(0))
    assert boxes.shape == (2000, 4)
    top, left, h, w = boxes.unbind(1)
    assert torch.equal(boxes, boxes.round())
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= height).all() and (left + w <= width).all()


def test_crop_area_and_log_ratio_are_uniform_when_every_draw_fits():
    n, side, scale, ratio = 20000, 200, (0.08, 0.5), (3 / 4, 4 / 3)  # 0.5 * 4/3 < 1: nothing rejected
    top, left, h, w = draw_crops(n, side, side, scale, ratio, gen(11)).double().unbind(1)
    share, log_ratio = h * w / side ** 2, torch.log(w / h)
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    assert share.min() > scale[0] - 0.01 and share.max() < scale[1] + 0.01
    assert log_ratio.min() > lo - 0.025 and log_ratio.max() < hi + 0.025
    assert abs(share.mean().item() - sum(scale) / 2) < 0.005  # uniform scale: the midpoint, SE 0.001
    assert abs(share.var().item() - (scale[1] - scale[0]) ** 2 / 12) < 0.001
    quarters = torch.histc(log_ratio.clamp(lo, hi), bins=4, min=lo, max=hi) / n
    assert torch.allclose(quarters, torch.full((4,), 0.25, dtype=quarters.dtype), atol=0.02)
    centre = (top + h / 2) / side  # the box's position is uniform over where it fits: centred on average
    assert abs(centre.mean().item() - 0.5) < 0.005


@pytest.mark.parametrize("height,width", [(32, 32), (60, 30)])
def test_crop_distribution_matches_torchvisions_algorithm_with_rejections(height, width):
    n, scale, ratio = 20000, (0.08, 1.0), (3 / 4, 4 / 3)
    boxes = draw_crops(n, height, width, scale, ratio, gen(12)).double()
    rng = random.Random(12)
    ref = torch.tensor([ref_crop_params(height, width, scale, ratio, rng) for _ in range(n)], dtype=torch.float64)
    share, ref_share = (b[:, 2] * b[:, 3] / (height * width) for b in (boxes, ref))
    log_ratio, ref_log_ratio = (torch.log(b[:, 3] / b[:, 2]) for b in (boxes, ref))
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    torch.testing.assert_close(torch.quantile(share, q), torch.quantile(ref_share, q), rtol=0, atol=0.02)
    assert abs(share.mean() - ref_share.mean()) < 0.01
    assert abs(log_ratio.mean() - ref_log_ratio.mean()) < 0.01
    assert abs(log_ratio.std() - ref_log_ratio.std()) < 0.01
    for col, side in ((0, height), (1, width)):  # where the box sits: top and left, in pixels
        assert abs(boxes[:, col].mean() - ref[:, col].mean()) < 0.02 * side


@pytest.mark.parametrize("height,width,scale,ratio,box", [
    (32, 32, [0.9, 1.0], [3.0, 4.0], [10, 0, 11, 32]),     # wider than anything that fits: full width
    (32, 32, [0.9, 1.0], [0.2, 0.25], [0, 12, 32, 8]),     # taller: full height
    (20, 60, [1.0, 1.0], [0.9, 1.1], [0, 19, 20, 22]),     # wide image, square-ish ratios
])
def test_crop_falls_back_to_the_central_crop_of_the_clamped_ratio(height, width, scale, ratio, box):
    boxes = draw_crops(50, height, width, scale, ratio, gen(0))
    assert torch.equal(boxes, torch.tensor([box] * 50, dtype=boxes.dtype))
    assert list(ref_crop_params(height, width, scale, ratio, random.Random(0))) == box


# --- 4. crop_resize_flip --------------------------------------------------------------------------

def test_full_box_at_the_same_size_is_the_image_and_a_flip_is_torch_flip(cifar):
    x = cifar.double() / 255
    full = torch.tensor([[0.0, 0.0, 32, 32]]).repeat(len(x), 1)
    same = crop_resize_flip(x, full, torch.zeros(len(x), dtype=torch.bool), 32)
    torch.testing.assert_close(same, x, rtol=0, atol=1e-6)
    flip = torch.arange(len(x)) % 2 == 1
    flipped = crop_resize_flip(x, full, flip, 32)
    torch.testing.assert_close(flipped[flip], x[flip].flip(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(flipped[~flip], x[~flip], rtol=0, atol=1e-6)


def test_a_box_resized_to_its_own_size_is_the_slice(cifar):
    x = cifar[:3].float() / 255
    boxes = torch.tensor([[5.0, 7.0, 12, 12], [0.0, 20.0, 12, 12], [20.0, 0.0, 12, 12]])
    out = crop_resize_flip(x, boxes, torch.zeros(3, dtype=torch.bool), 12)
    for i, (t, l, _, _) in enumerate(boxes.int().tolist()):
        torch.testing.assert_close(out[i], x[i, :, t:t + 12, l:l + 12], rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [32, 20, 9])  # upsampling a half-size crop, a mild and a strong shrink
def test_crops_resize_like_bilinear_interpolation_of_the_sliced_region(cifar, size):
    x = cifar[:6].float() / 255
    boxes = torch.tensor([[0.0, 0, 16, 16], [16, 16, 16, 16], [8, 3, 16, 16], [2, 5, 20, 11], [0, 0, 32, 32],
                          [7, 1, 9, 27]])
    flip = torch.tensor([False, True, False, True, False, False])
    out = crop_resize_flip(x, boxes, flip, size)
    for i in range(6):
        expected = ref_resize(x[i], boxes[i].tolist(), bool(flip[i]), size)
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-5)


# --- 5. color_jitter ------------------------------------------------------------------------------

def test_identity_jitter_leaves_images_unchanged_in_any_order(cifar):
    x = cifar.float() / 255
    order = torch.argsort(torch.rand(len(x), 4, generator=gen(0)), 1)
    out = color_jitter(x, torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(len(x), 1), order)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)


def test_brightness_saturation_and_contrast_are_the_blends_of_torchvision(cifar):
    x = cifar[:4].double() / 255
    order = torch.arange(4).repeat(4, 1)
    bright = color_jitter(x, torch.tensor([[0.3, 1, 1, 0], [1.7, 1, 1, 0], [0.0, 1, 1, 0], [1.0, 1, 1, 0]]), order)
    factor = torch.tensor([0.3, 1.7, 0.0, 1.0], dtype=x.dtype).view(4, 1, 1, 1)
    torch.testing.assert_close(bright, (x * factor).clamp(0, 1), rtol=0, atol=1e-6)
    luma = torch.from_numpy(np.stack([ref_luma(img) for img in x.numpy()]))[:, None].expand_as(x)
    no_saturation = color_jitter(x, torch.tensor([[1.0, 1, 0, 0]]).repeat(4, 1), order)
    torch.testing.assert_close(no_saturation, luma, rtol=0, atol=1e-6)
    no_contrast = color_jitter(x, torch.tensor([[1.0, 0, 1, 0]]).repeat(4, 1), order)
    mean_gray = luma.mean((1, 2, 3), keepdim=True).expand_as(x)
    torch.testing.assert_close(no_contrast, mean_gray, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shift", [0.1, -0.1, 0.25, 0.45, -0.5, 0.5])
def test_hue_shift_matches_colorsys_per_pixel(cifar, shift):
    x = cifar[[0, 5, 9]].float() / 255
    x[0, :, :2] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)  # pure and gray pixels: hue's edge cases
    x[0, :, 2:4] = 0.5
    out = color_jitter(x, torch.tensor([[1.0, 1.0, 1.0, shift]]).repeat(3, 1), torch.tensor([[3, 0, 1, 2]] * 3))
    expected = torch.from_numpy(np.stack([ref_hue(img, shift) for img in x.double().numpy()]))
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-4)


def test_jitter_ops_follow_each_images_drawn_order(cifar):
    x = cifar[:1].repeat(2, 1, 1, 1).float() / 255
    factors = torch.tensor([[1.6, 0.4, 1.0, 0.0]] * 2)
    order = torch.tensor([[0, 1, 2, 3], [1, 0, 2, 3]])  # brightness then contrast; contrast then brightness
    out = color_jitter(x, factors, order)
    img = x[0].double().numpy()
    b_then_c, c_then_b = ref_jitter(img, factors[0], [0, 1, 2, 3]), ref_jitter(img, factors[0], [1, 0, 2, 3])
    assert np.abs(b_then_c - c_then_b).max() > 0.05
    torch.testing.assert_close(out[0].double(), torch.from_numpy(b_then_c), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1].double(), torch.from_numpy(c_then_b), rtol=0, atol=1e-5)


def test_random_jitter_matches_the_per_image_reference(cifar):
    x = cifar[:6].float() / 255
    views = draw_views(6, 32, 32, ViewOptions(jitter=1.0, strength=1.0), gen(9))
    out = color_jitter(x, views["jitter"], views["order"])
    expected = np.stack([ref_jitter(x[i].double().numpy(), views["jitter"][i], views["order"][i].tolist())
                         for i in range(6)])
    torch.testing.assert_close(out.double(), torch.from_numpy(expected), rtol=0, atol=1e-4)


# --- 6. grayscale ---------------------------------------------------------------------------------

def test_grayscale_is_the_601_luma_and_close_to_pils_convert_L(cifar):
    x = cifar.double() / 255
    gray = grayscale(x)
    assert gray.shape == (len(x), 1, 32, 32)
    expected = torch.from_numpy(np.stack([ref_luma(img) for img in x.numpy()]))[:, None]
    torch.testing.assert_close(gray, expected, rtol=0, atol=1e-12)
    pil = np.stack([np.asarray(Image.fromarray(img.permute(1, 2, 0).numpy()).convert("L")) for img in cifar])
    assert np.abs(gray[:, 0].numpy() * 255 - pil).max() <= 1.0  # PIL rounds in fixed point


# --- 7. gaussian_blur -----------------------------------------------------------------------------

def test_blur_with_sigma_zero_is_identity_and_a_constant_stays_constant(cifar):
    x = cifar[:4].float() / 255
    assert torch.equal(gaussian_blur(x, torch.zeros(4)), x)
    constant = torch.full((3, 3, 40, 24), 0.37)
    torch.testing.assert_close(gaussian_blur(constant, torch.tensor([0.3, 1.0, 5.0])), constant, rtol=0, atol=1e-6)


def test_blur_sigmas_act_per_image(cifar):
    x = cifar[:4].float() / 255
    sigma = torch.tensor([0.0, 0.5, 1.0, 2.0])
    together = gaussian_blur(x, sigma)
    for i in range(4):
        torch.testing.assert_close(together[i:i + 1], gaussian_blur(x[i:i + 1], sigma[i:i + 1]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("height,width,sigmas", [(32, 32, [0.1, 0.8, 2.0]), (64, 48, [1.5]), (40, 100, [3.0])])
def test_blur_matches_an_explicit_2d_convolution(height, width, sigmas):
    x = torch.rand(len(sigmas), 3, height, width, generator=gen(height), dtype=torch.float64)
    out = gaussian_blur(x, torch.tensor(sigmas))
    expected = torch.from_numpy(np.stack([ref_blur(img, s) for img, s in zip(x.numpy(), sigmas)]))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("height,width,k", [(32, 32, 3), (64, 64, 7), (47, 80, 5), (100, 100, 11), (224, 224, 23),
                                            (230, 240, 23), (36, 36, 3), (58, 58, 5), (10, 10, 3)])  # 36, 58: floored
def test_blur_kernel_is_a_tenth_of_the_side_odd_and_at_least_3(height, width, k):
    impulse = torch.zeros(1, 1, height, width, dtype=torch.float64)
    impulse[0, 0, height // 2, width // 2] = 1.0
    spread = gaussian_blur(impulse, torch.tensor([50.0]))[0, 0]  # a wide sigma: the kernel's box is visible
    rows, cols = spread.abs().sum(1) > 1e-12, spread.abs().sum(0) > 1e-12
    assert ref_kernel_size(height, width) == k
    assert int(rows.sum()) == k and int(cols.sum()) == k


# --- 8. solarize ----------------------------------------------------------------------------------

def test_solarize_turns_over_pixels_from_half_up_only_on_solarized_views():
    ramp = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(4, 3, 16, 16).contiguous()
    views = draw_views(4, 16, 16, ViewOptions(**IDENTITY), gen(0))
    views["solarize"] = torch.tensor([True, False, True, False])
    out = apply_views(ramp, views, 16)
    x = ramp.float() / 255
    turned = torch.where(x >= 0.5, 1 - x, x)
    torch.testing.assert_close(out[[0, 2]], turned[[0, 2]], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[[1, 3]], x[[1, 3]], rtol=0, atol=1e-5)
    assert out[0, 0, 8, 0] == pytest.approx(1 - 128 / 255, abs=1e-5)  # 128/255 >= 0.5 turns; 127/255 stays
    assert out[0, 0, 7, 15] == pytest.approx(127 / 255, abs=1e-5)


# --- 9. probabilities -----------------------------------------------------------------------------

def test_probability_zero_never_and_one_always_in_choices_and_pixels(cifar):
    n, x = len(cifar), cifar.float() / 255
    off = draw_views(n, 32, 32, ViewOptions(**IDENTITY), gen(0))
    assert not off["flip"].any() and not off["gray"].any() and not off["solarize"].any()
    assert (off["sigma"] == 0).all() and torch.equal(off["jitter"], torch.tensor([[1.0, 1, 1, 0]]).repeat(n, 1))
    assert torch.equal(off["crop"], torch.tensor([[0.0, 0, 32, 32]]).repeat(n, 1))
    torch.testing.assert_close(apply_views(cifar, off, 32), x, rtol=0, atol=1e-5)

    def only(**on):
        views = draw_views(n, 32, 32, ViewOptions(**{**IDENTITY, **on}), gen(1))
        return views, apply_views(cifar, views, 32)

    views, out = only(flip=1.0)
    assert views["flip"].all()
    torch.testing.assert_close(out, x.flip(-1), rtol=0, atol=1e-5)
    views, out = only(grayscale=1.0)
    assert views["gray"].all() and torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    views, out = only(jitter=1.0)
    assert (views["jitter"] != torch.tensor([1.0, 1, 1, 0])).all()
    assert all((out[i] - x[i]).abs().max() > 1e-3 for i in range(n))
    views, out = only(blur=1.0)
    assert (views["sigma"] >= 0.1).all() and (views["sigma"] <= 2.0).all()
    torch.testing.assert_close(out, gaussian_blur(x, views["sigma"]), rtol=0, atol=1e-5)
    views, out = only(solarize=1.0)
    assert views["solarize"].all() and out.max() < 0.5


def test_empirical_rates_and_factor_ranges_follow_the_options():
    n, options = 20000, ViewOptions(flip=0.5, jitter=0.8, grayscale=0.2, blur=0.5, solarize=0.2, strength=0.5)
    views = draw_views(n, 32, 32, options, gen(21))
    jittered = (views["jitter"] != torch.tensor([1.0, 1, 1, 0])).any(1)
    rates = {"flip": views["flip"], "jitter": jittered, "grayscale": views["gray"], "blur": views["sigma"] > 0,
             "solarize": views["solarize"]}
    for name, happened in rates.items():  # 4.5 standard errors at most (0.016 for p = 0.5)
        assert abs(happened.double().mean().item() - getattr(options, name)) < 0.016, name
    factors = views["jitter"][jittered].double()
    for i, half in enumerate([0.4, 0.4, 0.4, 0.1]):  # 0.8s for brightness, contrast, saturation; 0.2s hue
        centre = 0.0 if i == 3 else 1.0
        assert factors[:, i].min() >= centre - half and factors[:, i].max() <= centre + half
        assert abs(factors[:, i].mean().item() - centre) < 0.01 * half * 4
        assert abs(factors[:, i].var().item() - (2 * half) ** 2 / 12) < 0.05 * (2 * half) ** 2 / 12
    sigma = views["sigma"][views["sigma"] > 0].double()
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0 and abs(sigma.mean().item() - 1.05) < 0.02
    positions = torch.stack([(views["order"] == op).double().mean(0) for op in range(4)])  # (op, position)
    assert torch.allclose(positions, torch.full((4, 4), 0.25, dtype=torch.float64), atol=0.015)
    assert (views["order"].sort(1).values == torch.arange(4)).all()  # each order is a permutation


def test_strong_jitter_factors_are_clipped_at_zero_like_torchvision():
    # ColorJitter(brightness=0.8 * 2) draws from [max(0, 1 - 1.6), 2.6]: never a negative factor
    views = draw_views(20000, 32, 32, ViewOptions(jitter=1.0, strength=2.0), gen(22))
    factors = views["jitter"][:, :3].double()
    assert factors.min() >= 0.0 and factors.max() <= 2.6
    assert torch.allclose(factors.mean(0), torch.full((3,), 1.3, dtype=torch.float64), atol=0.03)
    hue = views["jitter"][:, 3]
    assert hue.min() >= -0.4 and hue.max() <= 0.4 and hue.abs().max() > 0.39
    capped = draw_views(2000, 32, 32, ViewOptions(jitter=1.0, strength=4.0), gen(23))["jitter"][:, 3]
    assert capped.abs().max() <= 0.5 and capped.abs().max() > 0.49  # hue's range caps at half a turn


# --- 10. ViewOptions.check ------------------------------------------------------------------------

@pytest.mark.parametrize("name,value", [
    ("flip", 1.5), ("jitter", -0.1), ("grayscale", 2.0), ("blur", float("nan")), ("solarize", -1.0),
    ("strength", -1.0), ("strength", 5.0), ("crop_scale", [0.5, 0.2]), ("crop_scale", [0.0, 1.0]),
    ("crop_scale", [0.5, 1.5]), ("crop_scale", [0.5]), ("crop_ratio", [4 / 3, 3 / 4]), ("crop_ratio", [-1.0, 1.0]),
    ("blur_sigma", [0.0, 1.0]), ("blur_sigma", [2.0, 1.0]),
])
def test_check_names_the_out_of_range_field(name, value):
    with pytest.raises(RecipeError, match=rf"objective\.views\.{name}\b"):
        ViewOptions(**{name: value}).check("objective.views")


def test_check_accepts_the_defaults_and_the_cifar_setting():
    ViewOptions().check("views")
    ViewOptions(strength=0.5, blur=0.0, crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0], solarize=1.0).check("views")


# --- 11. device, dtype and global RNG independence ------------------------------------------------

def test_views_do_not_depend_on_dtype_or_the_global_rng(cifar):
    views = draw_views(20, 32, 32, ViewOptions(solarize=0.3), gen(31))
    views["sigma"][:4] = torch.tensor([0.5, 1.0, 1.5, 2.0])
    torch.manual_seed(0)
    base = apply_views(cifar, views, 32)
    torch.manual_seed(12345)
    state = torch.get_rng_state()
    assert torch.equal(apply_views(cifar.clone(), views, 32), base)
    torch.testing.assert_close(apply_views(cifar.double(), views, 32), base, rtol=0, atol=1e-6)
    torch.manual_seed(999)
    assert all(torch.equal(v, w) for v, w in zip(draw_views(20, 32, 32, ViewOptions(solarize=0.3), gen(31)).values(),
                                                 draw_views(20, 32, 32, ViewOptions(solarize=0.3), gen(31)).values()))
    torch.set_rng_state(state)
    draw_views(20, 32, 32, ViewOptions(), gen(1))
    apply_views(cifar, views, 32)
    assert torch.equal(torch.get_rng_state(), state)  # neither step touched the global generator
    x32, x64 = cifar.float() / 255, cifar.double() / 255
    for f in (lambda x: crop_resize_flip(x, views["crop"], views["flip"], 24),
              lambda x: color_jitter(x, views["jitter"], views["order"]),
              lambda x: gaussian_blur(x, views["sigma"] + 0.3)):
        torch.testing.assert_close(f(x64).float(), f(x32), rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_views_on_cuda_equal_views_on_cpu(cifar):
    views = draw_views(20, 32, 32, ViewOptions(solarize=0.3), gen(41))
    on_gpu = apply_views(cifar.cuda(), {k: v.cuda() for k, v in views.items()}, 32)
    torch.testing.assert_close(on_gpu.cpu(), apply_views(cifar, views, 32), rtol=0, atol=1e-4)


def test_planned_views_read_nothing_back_from_the_device(cifar):
    """With plan_views' host entries (the collate adds them), apply_views runs on the meta device, where any
    read of a value raises: no branch, nonzero or copy waits for a GPU. Without them it must read the choices
    (and does: it raises there). The plan lists, per jitter position, the views of each step in index order."""
    from lmssl.data.views import jitter_plan, plan_views

    views = draw_views(20, 32, 32, ViewOptions(solarize=0.3), gen(43))
    perm, counts = jitter_plan(views["jitter"], views["order"])
    active = (views["jitter"] != torch.tensor([1.0, 1, 1, 0])).any(1)
    for position in range(4):
        start = 0
        for op in range(4):
            rows = (active & (views["order"][:, position] == op)).nonzero().squeeze(1)
            assert torch.equal(perm[position, start:start + counts[position][op]], rows)
            start += counts[position][op]
    planned = {**views, **plan_views(views)}
    assert planned["plan"]["steps"] == (True, True, True, True)
    meta = {k: v.to("meta") if torch.is_tensor(v) else v for k, v in planned.items()}
    out = apply_views(cifar.to("meta"), meta, 24, [0.5] * 3, [0.25] * 3)
    assert out.shape == (20, 3, 24, 24) and out.device.type == "meta"
    with pytest.raises((RuntimeError, NotImplementedError)):
        apply_views(cifar.to("meta"), {k: v.to("meta") for k, v in views.items()}, 24)
    torch.testing.assert_close(apply_views(cifar, planned, 24), apply_views(cifar, views, 24), rtol=0, atol=0)
    quiet = plan_views(draw_views(20, 32, 32, ViewOptions(jitter=0, grayscale=0, blur=0), gen(43)))
    assert quiet["plan"]["steps"] == (False, False, False, False)
