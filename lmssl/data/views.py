"""Image augmentations in plain torch, batched: random resized crop, horizontal flip, color jitter,
random grayscale, Gaussian blur and solarize, with the defaults of SimCLR (Chen et al. 2020, "A Simple
Framework for Contrastive Learning of Visual Representations", arXiv:2002.05709, appendix A).

Two steps, so that views are exact on resume and can be made on any device:
`draw_views` draws every random choice of a batch on the CPU from one torch.Generator (the loop's
per-batch seed), as small tensors; `apply_views` turns uint8 images and those choices into float
views, deterministically, on whatever device the images are on (the training GPU, or the CPU in
the collate function). torchvision is not needed (it does not import beside every torch build).

Nothing is read back from the device: which steps run, and on which views each color-jitter step runs,
is decided on the host from the CPU choices (`plan_views`, added to the batch by the collate), so
making views on a GPU never waits for it (tests/test_views.py runs them on the meta device to show it).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Annotated

import torch
import torch.nn.functional as F

from lmssl.schema import Range, check_ranges

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights, as PIL's convert("L") and torchvision's rgb_to_grayscale
NO_JITTER = (1.0, 1.0, 1.0, 0.0)  # brightness, contrast, saturation factors and hue shift that change nothing


@dataclass
class ViewOptions:
    """How one view of an image is made (SimCLR's augmentation family). Probabilities are per view."""

    crop_scale: list[Annotated[float, Range(0, 1, low_open=True)]] = field(default_factory=lambda: [0.08, 1.0])
    """Random resized crop: range of the crop's share of the image area (SimCLR/Inception: 0.08 to 1)."""
    crop_ratio: list[Annotated[float, Range(0, 100, low_open=True)]] = field(default_factory=lambda: [3 / 4, 4 / 3])
    """Random resized crop: range of the crop's aspect ratio, width over height."""
    flip: Annotated[float, Range(0, 1)] = 0.5
    """Probability of a horizontal flip (0 for data where left and right matter, such as digits)."""
    jitter: Annotated[float, Range(0, 1)] = 0.8
    """Probability of color jitter (brightness, contrast, saturation, hue in random order)."""
    strength: Annotated[float, Range(0, 4)] = 1.0
    """Color distortion strength s: jitter of 0.8s brightness, contrast, saturation and 0.2s hue
    (SimCLR: 1.0 on ImageNet, 0.5 on CIFAR-10)."""
    grayscale: Annotated[float, Range(0, 1)] = 0.2
    """Probability of turning the view gray (SimCLR: 0.2)."""
    blur: Annotated[float, Range(0, 1)] = 0.5
    """Probability of a Gaussian blur with a kernel of a tenth of the image side (SimCLR on ImageNet: 0.5;
    its CIFAR-10 runs use none)."""
    blur_sigma: list[Annotated[float, Range(0, 100, low_open=True)]] = field(default_factory=lambda: [0.1, 2.0])
    """Range of the blur's standard deviation in pixels."""
    solarize: Annotated[float, Range(0, 1)] = 0.0
    """Probability of solarizing (pixels above half turned over; BYOL uses 0.2 on its second view)."""

    def check(self, where: str) -> None:
        from lmssl.errors import RecipeError

        check_ranges(self, where)
        for name, ceiling in (("crop_scale", 1.0), ("crop_ratio", math.inf), ("blur_sigma", math.inf)):
            pair = getattr(self, name)
            if len(pair) != 2 or not 0.0 < pair[0] <= pair[1] <= ceiling:
                bound = " <= 1" if ceiling == 1.0 else ""
                raise RecipeError(f"{where}.{name}: two numbers [low, high] with 0 < low <= high{bound}, got {pair!r}")


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def draw_crops(n: int, height: int, width: int, scale, ratio, generator: torch.Generator, tries: int = 10):
    """(n, 4) crop boxes (top, left, crop height, crop width) in pixels, as torchvision's
    RandomResizedCrop draws them: up to `tries` (area, log-ratio) draws per image, the first that
    fits wins; when none fits, the central crop of the clamped ratio."""
    area = height * width
    target = area * _uniform(n * tries, scale[0], scale[1], generator).view(n, tries)
    log_ratio = _uniform(n * tries, math.log(ratio[0]), math.log(ratio[1]), generator).view(n, tries)
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((n,), -1))
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    boxes = torch.empty(n, 4, dtype=torch.float64)
    for i in range(n):  # n is a batch of views: a short loop over scalars, no pixels
        j = int(first[i])
        if j >= 0:
            ch, cw = h[i, j].item(), w[i, j].item()
        else:  # the central crop, with the aspect ratio clamped into range
            in_ratio = width / height
            if in_ratio < ratio[0]:
                cw, ch = width, round(width / ratio[0])
            elif in_ratio > ratio[1]:
                ch, cw = height, round(height * ratio[1])
            else:
                cw, ch = width, height
            boxes[i] = torch.tensor([(height - ch) // 2, (width - cw) // 2, ch, cw], dtype=torch.float64)
            continue
        top = math.floor(u[i, 0].item() * (height - ch + 1))
        left = math.floor(u[i, 1].item() * (width - cw + 1))
        boxes[i] = torch.tensor([top, left, ch, cw], dtype=torch.float64)
    return boxes


def draw_views(n: int, height: int, width: int, options: ViewOptions, generator: torch.Generator) -> dict:
    """Every random choice for `n` views of images of height x width, as CPU tensors:
    crop boxes, flips, jitter factors and their order, grayscale, blur sigma (0 = none), solarize."""
    s = options.strength
    low = max(0.0, 1.0 - 0.8 * s)  # ColorJitter's range [max(0, 1 - 0.8s), 1 + 0.8s]: a negative factor would invert
    factors = low + (1.0 + 0.8 * s - low) * torch.rand(n, 3, generator=generator, dtype=torch.float64)
    hue = (2.0 * torch.rand(n, generator=generator, dtype=torch.float64) - 1.0) * min(0.5, 0.2 * s)
    jitter_on = torch.rand(n, generator=generator) < options.jitter
    order = torch.argsort(torch.rand(n, 4, generator=generator), dim=1)
    blur_on = torch.rand(n, generator=generator) < options.blur
    sigma = _uniform(n, options.blur_sigma[0], options.blur_sigma[1], generator)
    return {
        "crop": draw_crops(n, height, width, options.crop_scale, options.crop_ratio, generator).float(),
        "flip": torch.rand(n, generator=generator) < options.flip,
        "jitter": torch.where(jitter_on[:, None], torch.cat([factors, hue[:, None]], 1),
                              torch.tensor(NO_JITTER, dtype=torch.float64)).float(),
        "order": order,
        "gray": torch.rand(n, generator=generator) < options.grayscale,
        "sigma": torch.where(blur_on, sigma, torch.zeros_like(sigma)).float(),
        "solarize": torch.rand(n, generator=generator) < options.solarize,
    }


def crop_resize_flip(images: torch.Tensor, crop: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """(n, C, H, W) float -> (n, C, size, size): each image's crop box resized bilinearly, flipped
    where asked. One affine grid and one grid_sample for the whole batch."""
    n, _, height, width = images.shape
    top, left, ch, cw = crop.to(images.device, images.dtype).unbind(1)
    # grid_sample coordinates run from -1 (first pixel's outer edge) to 1 (last pixel's outer edge)
    sx, sy = cw / width, ch / height
    cx = (2 * left + cw) / width - 1
    cy = (2 * top + ch) / height - 1
    sx = torch.where(flip.to(images.device), -sx, sx)
    theta = torch.zeros(n, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, sy, cy
    grid = F.affine_grid(theta, [n, images.shape[1], size, size], align_corners=False)  # (n, size, size, xy)
    # clamp to the crop's outer pixel centres, so that nothing outside the box leaks in at its edges:
    # bilinear resizing of the cut-out crop repeats its edge pixels (as torchvision's crop-then-resize)
    low = torch.stack([(2 * left + 1) / width, (2 * top + 1) / height], 1) - 1
    high = torch.stack([(2 * (left + cw) - 1) / width, (2 * (top + ch) - 1) / height], 1) - 1
    grid = grid.clamp(low[:, None, None], high[:, None, None])
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) -> (n, 1, H, W) luminance."""
    return (x * _constant(LUMA, x.device, x.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)


@functools.lru_cache(maxsize=64)
def _constant(values: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small constant tensor on `device`, made once: copying it from the host on every batch would wait
    for the device (a synchronous copy) each time."""
    return torch.tensor(values, dtype=dtype).to(device)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    high, low = x.max(1).values, x.min(1).values
    delta = high - low
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(high == r, ((g - b) / safe) % 6, torch.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    s = torch.where(high > 0, delta / torch.where(high > 0, high, torch.ones_like(high)), torch.zeros_like(high))
    return torch.stack([h, s, high], 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], 1)   # (n, 3, H, W)
    return v[:, None] - v[:, None] * s[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _jitter_op(op: int, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """One color-jitter step on images x (m, 3, H, W) with per-image factors (m, 1, 1, 1)."""
    if op == 0:                                                   # brightness: blend with black
        return x * factor
    gray = grayscale(x)
    if op == 1:                                                   # contrast: blend with the mean gray
        mean = gray.mean((2, 3), keepdim=True)
        return (x - mean) * factor + mean
    if op == 2:                                                   # saturation: blend with the gray image
        return gray + (x - gray) * factor
    hsv = _rgb_to_hsv(x.clamp(0, 1))                              # hue: rotate, in turns
    return _hsv_to_rgb(torch.cat([(hsv[:, :1] + factor) % 1.0, hsv[:, 1:]], 1))


def jitter_plan(jitter: torch.Tensor, order: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """Which views each color-jitter step runs on, read from the (CPU) choices: per position in the order,
    the views sorted by their step there ((4, n) indices, views without jitter last) and how many take each
    of the four steps (4 x 4 Python ints). With these, color_jitter reads nothing back from the device."""
    active = (jitter != torch.tensor(NO_JITTER, dtype=jitter.dtype)).any(1)
    group = torch.where(active[:, None], order, 4)                                # (n, 4): step per position, 4 = none
    perm = torch.argsort(group.T, dim=1, stable=True)                             # (4, n)
    counts = tuple(tuple(torch.bincount(group[:, position], minlength=5)[:4].tolist()) for position in range(4))
    return perm, counts


def color_jitter(x: torch.Tensor, jitter: torch.Tensor, order: torch.Tensor, plan=None) -> torch.Tensor:
    """Brightness, contrast, saturation (multiplicative factors) and hue (a shift in turns) per image,
    applied in each image's own random order, clamped to [0, 1] after each step. A factor of 1 and a
    shift of 0 leave the image as it is. Each step runs only on the images whose turn it is, and only
    images with a jitter at all are touched. `plan` is jitter_plan's (computed here when not given, which
    reads the choices: free on the CPU, a stall on an accelerator)."""
    perm, counts = plan if plan is not None else jitter_plan(jitter.cpu(), order.cpu())
    jitter, perm = jitter.to(x.device, x.dtype), perm.to(x.device)
    x = x.clone()
    for position in range(4):
        start = 0
        for op, count in enumerate(counts[position]):
            if count:
                rows = perm[position, start:start + count]
                x[rows] = _jitter_op(op, x[rows], jitter[rows, op].view(-1, 1, 1, 1)).clamp(0, 1)
            start += count
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur, one sigma per image (0 leaves it unblurred), kernel side about a
    tenth of the image (odd, at least 3), reflected at the borders."""
    n, c, height, width = x.shape
    k = max(3, int(0.1 * min(height, width)) // 2 * 2 + 1)
    offsets = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    sigma = sigma.to(x.device, x.dtype).view(-1, 1)
    weights = torch.exp(-0.5 * (offsets / sigma.clamp_min(1e-6)) ** 2)
    weights = torch.where(sigma > 0, weights, (offsets == 0).to(x.dtype).expand_as(weights))
    weights = weights / weights.sum(1, keepdim=True)                      # (n, k)
    weights = weights.repeat_interleave(c, 0)                             # (n*c, k)
    flat = x.reshape(1, n * c, height, width)
    pad = k // 2
    flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode="reflect"), weights.view(n * c, 1, 1, k), groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode="reflect"), weights.view(n * c, 1, k, 1), groups=n * c)
    return flat.view(n, c, height, width)


def plan_views(views: dict) -> dict:
    """What apply_views must know on the host, from draw_views' CPU choices: `plan` (which of jitter, gray,
    blur and solarize any view takes, and color_jitter's counts, all Python values) and `jitter_perm`
    (a tensor, moved with the batch). The collate adds these (flatten_views), so making views on the
    training device never reads a value back from it (no host sync in the step)."""
    perm, counts = jitter_plan(views["jitter"], views["order"])
    steps = (any(sum(c) for c in counts), bool(views["gray"].any()), bool((views["sigma"] > 0).any()),
             bool(views["solarize"].any()))
    return {"plan": {"steps": steps, "jitter_counts": counts}, "jitter_perm": perm}


def apply_views(images: torch.Tensor, views: dict, size: int, mean=None, std=None) -> torch.Tensor:
    """uint8 (n, 3, H, W) images and the choices of `draw_views` for n views -> float (n, 3, size,
    size), normalized with `mean` and `std` when given (else in [0, 1]). Deterministic. Steps no view takes
    are skipped, as `plan_views` says; without its entries they are computed here from the choices (which
    reads them back when they are on an accelerator)."""
    if "plan" not in views:
        views = {**views, **plan_views({k: v.cpu() for k, v in views.items()})}
    jittered, gray, blurred, solarized = views["plan"]["steps"]
    x = images.float() / 255.0
    x = crop_resize_flip(x, views["crop"], views["flip"], size).clamp(0, 1)
    if jittered:
        x = color_jitter(x, views["jitter"], views["order"], (views["jitter_perm"], views["plan"]["jitter_counts"]))
    if gray:
        x = torch.where(views["gray"].to(x.device).view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)
    if blurred:
        x = gaussian_blur(x, views["sigma"])
    if solarized:
        solar = views["solarize"].to(x.device).view(-1, 1, 1, 1)
        x = torch.where(solar & (x >= 0.5), 1.0 - x, x)
    return normalize(x, mean, std)


def normalize(x: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """Per-channel (x - mean) / std for float images in [0, 1]; unchanged when mean is None."""
    if mean is None:
        return x
    mean = _constant(tuple(float(m) for m in mean), x.device, x.dtype).view(1, -1, 1, 1)
    std = _constant(tuple(float(s) for s in std), x.device, x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def to_pixels(images: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """The evaluation view: uint8 (n, 3, S, S) images as they are, scaled to [0, 1] and normalized."""
    return normalize(images.float() / 255.0, mean, std)


def draw_crop_sets(n: int, height: int, width: int, sets, generator: torch.Generator) -> list[dict]:
    """Multi-crop (Caron et al. 2020, SwAV; DINO): for each (count, ViewOptions) of `sets`, the choices
    of `count` views of every one of n images of height x width, drawn in order from one generator.
    Set j's choices are those of draw_views for count * n views, crop-major: row c * n + i is crop c
    of image i. Crop boxes are in the source image's pixels, whatever size a set is later made at."""
    return [draw_views(count * n, height, width, options, generator) for count, options in sets]


def apply_crop_sets(images: torch.Tensor, drawn: list[dict], sizes, mean=None, std=None) -> list[torch.Tensor]:
    """uint8 (n, 3, H, W) images and the choices of `draw_crop_sets` -> one float batch per set,
    (count * n, 3, size, size) at that set's size: views of one resolution come out as one batch, so
    an encoder runs one forward pass per resolution rather than one per crop."""
    n = images.shape[0]
    out = []
    for views, size in zip(drawn, sizes, strict=True):
        count = views["flip"].shape[0] // n
        out.append(apply_views(images.repeat(count, 1, 1, 1), views, size, mean, std))  # (count*n, 3, size, size)
    return out
