"""Training FLOPs and model FLOPs utilization (MFU), for the progress bar, the metrics and the summary.

FLOPs of one training token, in the usual form (Kaplan et al. 2020; Chowdhery et al. 2022, appendix B):
6 N for the weight matmuls, forward and backward, where N counts every parameter but the position
embeddings (a tied output head is counted once, as its embedding, which is what its matmul costs), plus
12 L d T for attention's score and value products over a sequence of T tokens (L layers of width d). A
masked-LM objective that runs its vocabulary head on the masked tokens only is still counted as the full
sequence, so the saving shows up as a higher MFU, as in ../shared/GPU.md. An image is its T patch tokens
(plus the class token) times the per-token count, over the whole model: for MAE (whose encoder sees a
quarter of the patches, and whose decoder layers are not in L) that is an upper bound, not a count.

MFU = achieved FLOP/s / the device's peak: a table of known accelerators (dense, per precision) or a
measured large matmul for others. CPUs report FLOP/s only (their peak depends on cores, SIMD and clocks).
"""

from __future__ import annotations

from typing import Optional

import torch

# Dense peak FLOP/s per precision (no structured sparsity), from the vendors' datasheets. "fp32" is plain
# fp32; "tf32" the tensor-core rate fp32 matmuls run at when TF32 is allowed.
PEAKS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12},  # SXM; the PCIe card is ~25% lower
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
}
POSITION_NAMES = ("position_embeddings", "wpe", "embed_positions", "position_embedding")


def counted_parameters(model: torch.nn.Module) -> int:
    """N: the model's parameters (shared ones once) without position embeddings."""
    seen, total = set(), 0
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen or any(part in POSITION_NAMES for part in name.split(".")):
            continue
        seen.add(id(param))
        total += param.numel()
    return total


def _shape(config) -> tuple[int, int]:
    """(layers, width) of a transformers config, encoder side."""
    get = lambda *names: next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)  # noqa: E731
    layers = get("num_hidden_layers", "n_layer", "num_layers")
    width = get("hidden_size", "n_embd", "d_model")
    if layers is None or width is None:
        raise ValueError(f"{type(config).__name__} does not say its layers and width")
    return int(layers), int(width)


def flops_per_token(model: torch.nn.Module, sequence: int) -> float:
    """Training FLOPs of one token in a sequence of `sequence` tokens: 6 N + 12 L d T."""
    layers, width = _shape(model.config)
    return 6.0 * counted_parameters(model) + 12.0 * layers * width * sequence


def tokens_per_image(config) -> int:
    """Patch tokens of one image, plus the class token."""
    image, patch = config.image_size, config.patch_size
    image = image if isinstance(image, int) else image[0]
    patch = patch if isinstance(patch, int) else patch[0]
    return (image // patch) ** 2 + 1


def flops_per_unit(model: torch.nn.Module, unit: str, sequence: Optional[int]) -> Optional[float]:
    """Training FLOPs per throughput unit (a token, or an image); None where the model says too little."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    try:
        if unit == "images":
            tokens = tokens_per_image(config)
            return tokens * flops_per_token(model, tokens)
        if sequence is None:
            return None
        return flops_per_token(model, sequence)
    except (AttributeError, TypeError, ValueError):
        return None


def precision_of(mixed_precision: str) -> str:
    if mixed_precision in ("bf16", "fp16"):
        return mixed_precision
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def known_peak(device_name: str, precision: str) -> Optional[float]:
    """The table's peak for a device name such as 'NVIDIA H100 80GB HBM3', or None."""
    upper = device_name.upper()
    for chip, peaks in PEAKS.items():
        if chip in upper:
            return peaks.get(precision)
    return None


def measured_peak(device: torch.device, precision: str, size: int = 8192, repeats: int = 10) -> float:
    """FLOP/s of a large square matmul on `device` (the practical ceiling of an unknown accelerator)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    return 2.0 * size**3 * repeats / (start.elapsed_time(end) / 1000.0)


def device_peak(device: torch.device, mixed_precision: str) -> Optional[float]:
    """The MFU denominator for a training device; None on CPU (FLOP/s only there)."""
    if device.type != "cuda":
        return None
    precision = precision_of(mixed_precision)
    return known_peak(torch.cuda.get_device_name(device), precision) or measured_peak(device, precision)
