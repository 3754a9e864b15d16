"""Every vision self-supervised method against scratch at one CPU budget (bench/ssl_methods_cifar.yaml:
the same tiny ViT, 300 steps of 64 CIFAR-10 images each), judged by one probe stage on the 10,000 test
images. Runs the recipe with lmssl (finished stages are skipped on a rerun) and prints a Markdown table:
linear-probe top-1, kNN top-1 and the pretraining wall time of each method.

    python bench/bench_ssl_methods.py [--data ../shared/data/cifar10] [--run-dir runs/ssl-methods-cifar]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    parser.add_argument("--run-dir", default=str(REPO / "runs" / "ssl-methods-cifar"))
    args = parser.parse_args()

    from lmssl import load_recipe, run_recipe

    recipe_file = REPO / "bench" / "ssl_methods_cifar.yaml"
    recipe = load_recipe(recipe_file, [f"stages.{name}.data.path={args.data}" for name in
                                       ("simclr", "moco_v3", "byol", "simsiam", "dino", "mae", "rotation", "probe")])
    started = time.time()
    run_recipe(recipe, run_dir=args.run_dir)
    run = Path(args.run_dir)
    rows = json.loads((run / "probe" / "results.json").read_text())["results"]
    print(f"\n{platform.machine()} CPU, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}, "
          f"total {time.time() - started:.0f} s (stages skipped as up to date count 0)\n")
    print("| method | linear probe top-1 | kNN top-1 | pretraining wall time | embedding_std (1 healthy, 0 collapsed) |")
    print("|---|---|---|---|---|")
    for row in rows:
        name = row["backbone"]
        stage = run / name / "stage.json"
        record = json.loads(stage.read_text()) if stage.exists() and name != "scratch" else {}
        spent = f"{record['seconds']:.0f} s" if record else "-"
        spread = record.get("metrics", {}).get("eval/embedding_std")
        print(f"| {name} | {100 * row['top1']:.1f} | {100 * row['knn_top1']:.1f} | {spent} | "
              f"{f'{spread:.2f}' if spread is not None else '-'} |")


if __name__ == "__main__":
    main()
