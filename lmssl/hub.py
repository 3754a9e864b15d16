"""Saving what a stage made so it loads back with `from_pretrained`, the model card that says how
it was made (the recipe and the results), and pushing to the Hub when a recipe asks for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from lmssl.redact import redact, redact_text

LOADER_BUILDERS = ("text", "csv", "json", "parquet", "arrow", "imagefolder", "webdataset")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# License ids the Hub accepts in a model card's metadata.
LICENSES = (
    "apache-2.0", "mit", "openrail", "bigscience-openrail-m", "creativeml-openrail-m", "bigscience-bloom-rail-1.0",
    "bigcode-openrail-m", "afl-3.0", "artistic-2.0", "bsl-1.0", "bsd", "bsd-2-clause", "bsd-3-clause",
    "bsd-3-clause-clear", "c-uda", "cc", "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0", "cc-by-sa-3.0",
    "cc-by-sa-4.0", "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0", "cc-by-nc-nd-3.0",
    "cc-by-nc-nd-4.0", "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0", "cdla-sharing-1.0",
    "cdla-permissive-1.0", "cdla-permissive-2.0", "wtfpl", "ecl-2.0", "epl-1.0", "epl-2.0", "etalab-2.0", "eupl-1.1",
    "eupl-1.2", "agpl-3.0", "gfdl", "gpl", "gpl-2.0", "gpl-3.0", "lgpl", "lgpl-2.1", "lgpl-3.0", "isc", "h-research",
    "intel-research", "lppl-1.3c", "ms-pl", "apple-ascl", "apple-amlr", "mpl-2.0", "odc-by", "odbl", "openrail++",
    "osl-3.0", "postgresql", "ofl-1.1", "ncsa", "unlicense", "zlib", "pddl", "lgpl-lr", "deepfloyd-if-license",
    "llama2", "llama3", "llama3.1", "llama3.2", "llama3.3", "llama4", "gemma", "unknown", "other",
)


def check_license(license_id: str, where: str) -> None:
    import difflib

    from lmssl.errors import RecipeError

    if license_id not in LICENSES:
        near = difflib.get_close_matches(license_id.lower(), LICENSES, n=1)
        raise RecipeError(f"{where}: {license_id!r} is not a license id the Hub knows"
                          + (f"; did you mean {near[0]!r}?" if near else "; use other and describe it in the card"))


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
    unwrapped = accelerator.unwrap_model(model)
    whole = _gathered_state(unwrapped)     # a collective under FSDP: every process takes part
    if accelerator.is_main_process:
        unwrapped.save_pretrained(folder, safe_serialization=True, **({"state_dict": whole} if whole else {}))
        if preprocessor is not None:
            preprocessor.save_pretrained(folder)
        if extra is not None:
            extra(folder)
    accelerator.wait_for_everyone()


def _gathered_state(model) -> Optional[dict]:
    """Under FSDP2 (parameters are DTensor shards) the whole weights, gathered to the CPU, so one safetensors
    folder holds them all; None when every process holds them whole already."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _results_table(metrics: dict[str, Any]) -> str:
    rows = [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(metrics.items())]
    return "\n".join(["| metric | value |", "|---|---|", *rows]) if rows else "_no metrics_"


def is_hub_id(value: Optional[str]) -> bool:
    """A value that names a Hub repository rather than a local path, a builder or a builtin dataset."""
    if not value or value.startswith(("builtin:", ".", "/", "~")) or value in LOADER_BUILDERS:
        return False
    return bool(HUB_ID.match(split_revision(value)[0])) and not Path(value).expanduser().exists()


def split_revision(reference: str) -> tuple[str, Optional[str]]:
    """'org/name@rev' -> ('org/name', 'rev'); without '@', the revision is None."""
    name, _, revision = reference.partition("@")
    return name, revision or None


def dataset_ref(data) -> tuple[str, str]:
    """(dataset type, dataset name) of a DataConfig for a card's model-index: the hub id, or what the
    local data is (builtin:NAME, a builder, a folder's name)."""
    if is_hub_id(data.path):
        return data.path, data.path
    if data.path.startswith("builtin:"):
        return data.path.replace(":", "-"), data.path
    if data.path in LOADER_BUILDERS:
        return data.path, data.path + " files"
    return "local", Path(data.path).name


def base_model_of(reference: Optional[str], recipe_raw: dict) -> Optional[str]:
    """The card's base_model: a hub id given as *_from, or the repo an earlier stage pushes to."""
    if reference is None:
        return None
    for stage in recipe_raw.get("stages", []):
        if isinstance(stage, dict) and stage.get("name", stage.get("kind")) == reference:
            push = stage.get("push_to_hub") or {}
            repo = push.get("repo_id") if isinstance(push, dict) else None
            return repo if repo and "{name}" not in repo else None
    return split_revision(reference)[0] if is_hub_id(reference) else None


def eval_result(task_type: str, dataset_type: str, dataset_name: str, metric_type: str, value: float,
                dataset_config: Optional[str] = None, dataset_split: Optional[str] = None,
                metric_name: Optional[str] = None) -> dict[str, Any]:
    """One model-index entry (the fields of huggingface_hub.EvalResult)."""
    out = {"task_type": task_type, "dataset_type": dataset_type, "dataset_name": dataset_name,
           "metric_type": metric_type, "metric_value": float(value), "dataset_config": dataset_config,
           "dataset_split": dataset_split, "metric_name": metric_name}
    return {k: v for k, v in out.items() if v is not None}


def card_metadata(*, model_name: str, license_id: str, tags: tuple[str, ...], pipeline_tag: Optional[str],
                  datasets: tuple[str, ...] = (), base_model: Optional[str] = None,
                  eval_results: tuple[dict, ...] = (), library_name: str = "transformers") -> str:
    """The card's YAML block, built with huggingface_hub's own ModelCardData (so the Hub reads it)."""
    from huggingface_hub import EvalResult, ModelCardData

    data = ModelCardData(
        license=license_id, library_name=library_name, tags=list(dict.fromkeys(["lmssl", *tags])),
        pipeline_tag=pipeline_tag, datasets=list(dict.fromkeys(datasets)) or None, base_model=base_model,
        model_name=model_name if eval_results else None,
        eval_results=[EvalResult(**r) for r in eval_results] or None)
    return data.to_yaml()


def write_model_card(folder: Path, *, title: str, summary: str, recipe_raw: dict, stage_name: str,
                     metrics: dict[str, Any], pipeline_tag: Optional[str] = None, tags: tuple[str, ...] = (),
                     extra_sections: tuple[str, ...] = (), license_id: str = "other", datasets: tuple[str, ...] = (),
                     base_model: Optional[str] = None, eval_results: tuple[dict, ...] = (),
                     library_name: str = "transformers") -> Path:
    """README.md with Hub metadata (license, datasets, base model, tags, pipeline tag, model-index), the
    recipe section that made the model, what it scored and, when present, its loss curve. The runner adds
    the usage snippet, data fingerprints, hardware and wall time when the stage is complete."""
    meta = card_metadata(model_name=title, license_id=license_id, tags=("self-supervised", *tags),
                         pipeline_tag=pipeline_tag, datasets=datasets, base_model=base_model,
                         eval_results=eval_results, library_name=library_name)
    recipe = redact(recipe_raw)
    own = [s for s in recipe.get("stages", []) if isinstance(s, dict) and s.get("name", s.get("kind")) == stage_name]
    section = {k: v for k, v in recipe.items() if k != "stages"} | {"stages": own or recipe.get("stages", [])}
    recipe_yaml = yaml.safe_dump(section, sort_keys=False, allow_unicode=True).strip()
    versions = library_versions()
    curve = ["## Training curve", "", "![training and evaluation curves](loss.png)", ""] \
        if (Path(folder) / "loss.png").exists() else []
    text = "\n".join([
        "---", meta.strip(), "---", "",
        f"# {title}", "", summary, "",
        "## How it was made", "",
        f"Stage `{stage_name}` of an lmssl recipe; the part that made this folder is below (secrets hidden).", "",
        "```yaml", recipe_yaml, "```", "",
        "## Results", "", _results_table(metrics), "",
        *curve,
        *[s + "\n" for s in extra_sections],
        "## Software", "", ", ".join(f"{k} {v}" for k, v in versions.items()), "",
    ])
    path = Path(folder) / "README.md"
    path.write_text(redact_text(text), encoding="utf-8")
    return path


# Auto classes by the architecture a folder's config names, most specific first.
AUTO_CLASSES = (("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
                ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
                ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
                ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
                ("AutoModelForPreTraining", "MODEL_FOR_PRETRAINING_MAPPING_NAMES"),
                ("AutoModel", "MODEL_MAPPING_NAMES"))


def usage_snippet(folder: Path, repo: str) -> str:
    """Python that loads `folder` (pushed as `repo`) with the Auto classes that fit what it holds."""
    from transformers.models.auto import modeling_auto

    folder = Path(folder)
    lines = []
    if (folder / "tokenizer_config.json").exists():
        lines.append(f'tokenizer = AutoTokenizer.from_pretrained("{repo}")')
    if (folder / "preprocessor_config.json").exists():
        lines.append(f'processor = AutoImageProcessor.from_pretrained("{repo}")')
    imports = [n.split(" = ")[1].split(".")[0] for n in lines]
    if (folder / "config.json").exists():
        architecture = (json.loads((folder / "config.json").read_text()).get("architectures") or [""])[0]
        auto = next((name for name, table in AUTO_CLASSES
                     if architecture in getattr(modeling_auto, table, {}).values()), "AutoModel")
        lines.append(f'model = {auto}.from_pretrained("{repo}")')
        imports.append(auto)
    return "\n".join(["```python", f"from transformers import {', '.join(imports)}", "", *lines, "```"])


def complete_card(folder: Path, repo: str, facts: dict[str, Any]) -> None:
    """Add the usage snippet and the run's facts (hardware, processes, wall time, data fingerprints) to
    the model card in `folder`, once the stage is complete."""
    path = Path(folder) / "README.md"
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8")
    marker = "## Usage"
    if marker in text:  # a rerun's push: the card is complete already
        return
    facts_table = "\n".join(["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in facts.items()]])
    addition = "\n".join([marker, "", usage_snippet(folder, repo), "", "## Training run", "", facts_table, ""])
    software = text.find("## Software")
    text = text[:software] + addition + "\n" + text[software:] if software >= 0 else text + "\n" + addition
    path.write_text(redact_text(text), encoding="utf-8")


# What a pushed folder leaves out: resumable state, logs, per-seed runs and lmssl's own bookkeeping.
PUSH_IGNORE = ["checkpoints/*", "tensorboard/*", "*.jsonl", "runs/*", ".*", ".*/*", "stage.json"]


def push_targets(folder: Path, repo_id: str) -> list[tuple[Path, str]]:
    """(folder, repo id) for each model a stage folder holds: the folder itself when it is one model or
    tokenizer; else each subfolder that is one (finetune tasks, probe backbones), to repo_id with {name}
    replaced by the subfolder's name, or to <repo_id>-<name>."""
    folder = Path(folder)

    def loadable(p: Path) -> bool:
        return (p / "config.json").exists() or (p / "tokenizer_config.json").exists()

    if loadable(folder):
        return [(folder, repo_id.replace("{name}", folder.name))]
    subs = sorted(p for p in folder.iterdir() if p.is_dir() and p.name != "runs" and loadable(p)) \
        if folder.is_dir() else []
    return [(p, repo_id.replace("{name}", p.name) if "{name}" in repo_id else f"{repo_id}-{p.name}") for p in subs]


def push_folder(folder: Path, repo_id: str, private: bool = True, revision: Optional[str] = None,
                commit_message: str = "lmssl upload", what: str = "push") -> str:
    """Upload a finished folder (model, tokenizer, card) to repo_id at branch `revision` (made from main
    when missing). The token comes from HF_TOKEN or the HF login, never from the recipe, and is never
    printed. Any failure is an LmsslError that says what to do; returns the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    with hub_errors(f"{what} {folder} to {repo_id}" + (f"@{revision}" if revision else "")):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message,
                                 revision=revision, ignore_patterns=PUSH_IGNORE)
    return str(getattr(info, "commit_url", repo_id))


@contextlib.contextmanager
def hub_errors(doing: str):
    """Turn what the Hub client raises (HTTP errors, an unreachable server, offline mode) into one
    LmsslError naming what failed and how to fix it; credentials never appear in it."""
    import httpx
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    from lmssl.errors import LmsslError

    try:
        yield
    except OfflineModeIsEnabled:
        raise LmsslError(f"could not {doing}: HF_HUB_OFFLINE=1 is set; unset it to reach the Hub") from None
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        hint = {401: "the Hub refused the token: set HF_TOKEN (or run `hf auth login`) with a write token",
                403: "the token may not write there: check the namespace and the token's permissions",
                404: "no such repository or branch, or the token cannot see it"}.get(status, "the Hub answered an error")
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LmsslError(redact_text(f"could not {doing}: HTTP {status}: {hint} ({first})")) from None
    except (httpx.HTTPError, OSError) as err:
        raise LmsslError(redact_text(f"could not {doing}: the Hub cannot be reached ({type(err).__name__}: "
                                     f"{err}); check HF_ENDPOINT and the network")) from None


def write_json(path: Path, data: dict) -> None:
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


class CheckpointPusher:
    """strategy: checkpoints. After each checkpoint the loop saves the model as a loadable folder (fast,
    local) and this uploads it to branch step-<N> in a background thread, so training never waits on the
    network; finish() waits for the uploads and returns the failures (the final push still happens)."""

    def __init__(self, push, scratch: Path, is_main: bool, log: Callable[[str], None]):
        from concurrent.futures import ThreadPoolExecutor

        self.push, self.scratch, self.is_main, self.log = push, Path(scratch), is_main, log
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmssl-push") if is_main else None
        self.futures: list = []
        self.pushed: list[str] = []
        self.failed: list[str] = []

    def on_save(self, step: int, save_to: Callable[[Path], None]) -> None:
        folder = self.scratch / f"step-{step}"
        save_to(folder)                     # every process takes part (gathers), the main one writes
        if self.is_main:
            self.futures.append(self.pool.submit(self._upload, folder, f"step-{step}"))

    def _upload(self, folder: Path, branch: str) -> None:
        import shutil

        from lmssl.errors import LmsslError

        try:
            push_folder(folder, self.push.repo_id, self.push.private, branch, f"lmssl checkpoint {branch}",
                        what="push checkpoint")
            self.pushed.append(branch)
            self.log(f"pushed {branch} to {self.push.repo_id}")
        except LmsslError as err:
            self.failed.append(f"{branch}: {err}")
            self.log(str(err))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def finish(self) -> list[str]:
        import shutil

        for future in self.futures:
            future.result()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        shutil.rmtree(self.scratch, ignore_errors=True)
        return self.failed
