"""Vision pretraining throughput: lmssl's training loop with the `mae` and `simclr` objectives against
plain PyTorch loops over the same transformers models (ViTMAEForPreTraining; ViTModel + projection
MLP + NT-Xent), same images, batch, views and optimizer, in one process. Prints a Markdown table.

Two plain baselines per method: views made per image with PIL (what a torchvision-style pipeline
does: RandomResizedCrop, flip, ColorJitter, RandomGrayscale on each PIL image), and views made with
lmssl's batched plain-torch augmentations (which isolates the loop itself).

    python bench/bench_vision.py [--size mini] [--steps 30] [--batch 128] [--image 32] [--patch 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def cifar(size: int):
    """The CIFAR-10 test images (10,000, read from the zip in place) decoded at `size`."""
    from lmssl.data.images import load_image_splits
    from lmssl.recipe import DataConfig

    root = Path(os.environ.get("LMSSL_DATA_DIR", REPO.parent / "shared" / "data")) / "cifar10"
    if not root.exists():
        sys.exit(f"{root} is absent: set LMSSL_DATA_DIR to the shared data folder")
    return load_image_splits(DataConfig(path=str(root), split="test", eval_fraction=0), size, 0, "bench").train


# --------------------------------------------------------------------------- per-image PIL views

def pil_view(image, size: int, rng: random.Random, color: bool):
    """One SimCLR view of a PIL image, per image as torchvision's PIL transforms make it: random resized
    crop (scale 0.08-1, ratio 3/4-4/3), flip, color jitter 0.4/0.4/0.4/0.1 with p=0.8 in random order,
    grayscale with p=0.2 (color=False: crop and flip only, as MAE)."""
    import math

    from PIL import Image, ImageEnhance, ImageOps

    width, height = image.size
    for _ in range(10):
        area = width * height * rng.uniform(0.08 if color else 0.2, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            break
    else:
        left, top, w, h = 0, 0, width, height
    view = image.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
    if rng.random() < 0.5:
        view = ImageOps.mirror(view)
    if color and rng.random() < 0.8:
        ops = [lambda v: ImageEnhance.Brightness(v).enhance(rng.uniform(0.6, 1.4)),
               lambda v: ImageEnhance.Contrast(v).enhance(rng.uniform(0.6, 1.4)),
               lambda v: ImageEnhance.Color(v).enhance(rng.uniform(0.6, 1.4)),
               lambda v: shift_hue(v, rng.uniform(-0.1, 0.1))]
        rng.shuffle(ops)
        for op in ops:
            view = op(view)
    if color and rng.random() < 0.2:
        view = view.convert("L").convert("RGB")
    return view


def shift_hue(image, shift: float):
    """Hue rotation of a PIL image through HSV (as torchvision's adjust_hue on PIL images)."""
    import numpy as np
    from PIL import Image

    hsv = np.asarray(image.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(shift * 255)) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def to_tensor(views, mean, std):
    import numpy as np
    import torch

    array = np.stack([np.asarray(v) for v in views]).transpose(0, 3, 1, 2)
    x = torch.from_numpy(array).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# --------------------------------------------------------------------------- the runs

def lmssl_run(method: str, data, args, out: Path) -> float:
    """images/s of lmssl's train() between the first logged step after warm-up and the last."""
    from accelerate import Accelerator

    from lmssl.objectives import OBJECTIVES
    from lmssl.objectives.vision import image_processor
    from lmssl.recipe import TrainingConfig
    from lmssl.schema import parse_dataclass
    from lmssl.training import train

    cls = OBJECTIVES[method]
    options = parse_dataclass(cls.Options, method_options(method), "bench")
    objective = cls(options, image_processor(args.image, MEAN, STD))
    model = objective.build_model(model_config(args))
    cfg = TrainingConfig(name="bench", kind="pretrain", batch_size=args.batch, max_steps=args.steps, log_every=5,
                         save_every=None, learning_rate=1e-3, warmup_steps=0)
    train(objective, model, data, None, cfg, Accelerator(), out, None, seed=0, accumulation=1, desc=f"lmssl {method}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["step"], r["time"]) for r in records if "train/loss" in r and r["step"] >= args.warmup]
    (first_step, first_time), (last_step, last_time) = logged[0], logged[-1]
    return (last_step - first_step) * args.batch / (last_time - first_time)


def method_options(method: str) -> dict:
    if method == "mae":
        return {"decoder_width": 128, "decoder_depth": 2}
    return {"views": {"strength": 0.5, "blur": 0.0}}


def model_config(args):
    from lmssl.models import ModelConfig

    return ModelConfig(family="vit", size=args.size, image_size=args.image, patch_size=args.patch)


def plain_run(method: str, data, args, pil: bool) -> float:
    """images/s of a plain loop over the same transformers model: views per image with PIL (pil=True)
    or with lmssl's batched augmentations, then forward, loss, backward, clipping, AdamW."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from transformers import ViTConfig, ViTMAEConfig, ViTMAEForPreTraining, ViTModel

    from lmssl.data.views import ViewOptions, apply_views, draw_views
    from lmssl.models import build_vit_config

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = model_config(args)
    if method == "mae":
        model = ViTMAEForPreTraining(build_vit_config(cfg, ViTMAEConfig, decoder_hidden_size=128,
                                                      decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
                                                      decoder_intermediate_size=512, norm_pix_loss=True))
        params = list(model.parameters())
    else:
        model = ViTModel(build_vit_config(cfg, ViTConfig), add_pooling_layer=False)
        head = torch.nn.Sequential(torch.nn.Linear(model.config.hidden_size, 2048), torch.nn.ReLU(),
                                   torch.nn.Linear(2048, 128)).to(device)
        params = list(model.parameters()) + list(head.parameters())
    model.to(device).train()
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    rng, generator = random.Random(0), torch.Generator().manual_seed(0)
    views_per_image = 1 if method == "mae" else 2
    options = (ViewOptions(crop_scale=[0.2, 1.0], jitter=0.0, grayscale=0.0, blur=0.0) if method == "mae"
               else ViewOptions(strength=0.5, blur=0.0))
    times = []
    for step in range(args.steps):
        start = time.perf_counter()  # making the views counts, as it does in lmssl's loop
        index = [(step * args.batch + i) % len(data) for i in range(args.batch)]
        images = data[index]["pixels"]                                     # (batch, 3, S, S) uint8
        if pil:
            pictures = [Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0))) for img in images]
            views = [pil_view(p, args.image, rng, color=method == "simclr") for p in pictures * views_per_image]
            pixels = to_tensor(views, MEAN, STD).to(device)
        else:
            batch = torch.from_numpy(images).repeat(views_per_image, 1, 1, 1)
            drawn = draw_views(batch.shape[0], args.image, args.image, options, generator)
            pixels = apply_views(batch.to(device), drawn, args.image, MEAN, STD)
        if method == "mae":
            loss = model(pixel_values=pixels).loss
        else:
            z = F.normalize(head(model(pixel_values=pixels).last_hidden_state[:, 0]), dim=1)
            logits = z @ z.T / 0.2
            logits.fill_diagonal_(float("-inf"))
            n = args.batch
            loss = F.cross_entropy(logits, torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return args.batch * len(times) / sum(times)


MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="mini", help="vit size preset (tiny, mini, vit-ti, vit-s, ...)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128, help="images per step (SimCLR makes two views of each)")
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument("--patch", type=int, default=4)
    parser.add_argument("--methods", default="mae,simclr")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of each loop; the best is reported")
    args = parser.parse_args()

    import datasets
    import torch

    datasets.disable_progress_bars()
    data = cifar(args.image)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            warm = argparse.Namespace(**{**vars(args), "steps": args.warmup + 2})
            plain_run(method, data, warm, pil=False)           # the allocator and kernels warm up once
            runs = {"pil": [], "batched": [], "lmssl": []}
            for repeat in range(args.repeats):                  # interleaved, best of the repeats
                runs["pil"].append(plain_run(method, data, args, pil=True))
                runs["batched"].append(plain_run(method, data, args, pil=False))
                runs["lmssl"].append(lmssl_run(method, data, args, Path(tmp) / f"{method}-{repeat}"))
            rows.append((method, max(runs["pil"]), max(runs["batched"]), max(runs["lmssl"])))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {device}, torch {torch.__version__}; "
          f"command: python bench/bench_vision.py --size {args.size} --steps {args.steps} --batch {args.batch} "
          f"--image {args.image} --patch {args.patch} --repeats {args.repeats}\n")
    print("| method | plain loop, PIL views per image | plain loop, batched views | lmssl train() | "
          "lmssl / PIL loop | lmssl / batched loop |\n|---|---:|---:|---:|---:|---:|")
    for method, pil, batched, ours in rows:
        print(f"| {method} | {pil:,.0f} img/s | {batched:,.0f} img/s | {ours:,.0f} img/s | {ours / pil:.2f}x | "
              f"{ours / batched:.2f}x |")


if __name__ == "__main__":
    main()
