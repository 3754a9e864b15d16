"""Saving what a stage made so it loads back with `from_pretrained`, the model card that says how
it was made (the recipe and the results), and pushing to the Hub when a recipe asks for it.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from lmssl.redact import redact


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("lmssl", "torch", "transformers", "tokenizers", "accelerate", "datasets", "evaluate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def save_model(accelerator, model, folder: Path, preprocessor=None,
               extra: Optional[Callable[[Path], None]] = None) -> None:
    """Weights as safetensors plus config (and the tokenizer or image processor), from the main process
    only; `extra(folder)` then writes anything else the folder should hold, on the main process too."""
    folder = Path(folder)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(folder, safe_serialization=True)
        if preprocessor is not None:
            preprocessor.save_pretrained(folder)
        if extra is not None:
            extra(folder)
    accelerator.wait_for_everyone()


def _results_table(metrics: dict[str, Any]) -> str:
    rows = [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(metrics.items())]
    return "\n".join(["| metric | value |", "|---|---|", *rows]) if rows else "_no metrics_"


def write_model_card(folder: Path, *, title: str, summary: str, recipe_raw: dict, stage_name: str,
                     metrics: dict[str, Any], pipeline_tag: Optional[str] = None, tags: tuple[str, ...] = (),
                     extra_sections: tuple[str, ...] = ()) -> Path:
    """README.md with Hub metadata, the recipe that made the model and what it scored."""
    meta: dict[str, Any] = {"library_name": "transformers", "tags": ["lmssl", "self-supervised", *tags]}
    if pipeline_tag:
        meta["pipeline_tag"] = pipeline_tag
    recipe_yaml = yaml.safe_dump(redact(recipe_raw), sort_keys=False, allow_unicode=True).strip()
    versions = library_versions()
    text = "\n".join([
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# {title}", "", summary, "",
        "## How it was made", "",
        f"Stage `{stage_name}` of the lmssl recipe below. Re-run it with `lmssl run recipe.yaml`.", "",
        "```yaml", recipe_yaml, "```", "",
        "## Results", "", _results_table(metrics), "",
        *[s + "\n" for s in extra_sections],
        "## Software", "", ", ".join(f"{k} {v}" for k, v in versions.items()), "",
    ])
    path = Path(folder) / "README.md"
    path.write_text(text, encoding="utf-8")
    return path


def push_folder(folder: Path, repo_id: str, private: bool = True, commit_message: str = "lmssl upload") -> str:
    """Upload a finished stage folder (model, tokenizer, card) to the Hub; the token comes from the
    environment or the HF login, never from the recipe, and is never printed."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    ignore = ["checkpoints/*", "tensorboard/*", "*.jsonl"]
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message,
                             ignore_patterns=ignore)
    return str(getattr(info, "commit_url", repo_id))


def write_json(path: Path, data: dict) -> None:
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)
