"""Recipes: YAML into strict dataclasses, `--set` overrides, and the checks `lmssl validate` runs.

Stage-kind configs live beside their stage (stages/<kind>.py); this module holds what they share
(StageConfig, DataConfig, TrainingConfig) and loads recipes; schema.py fills dataclasses from
mappings. Nothing here trains.
"""

from __future__ import annotations

import difflib
import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Literal, Optional, Union

import yaml

from lmssl.errors import RecipeError
from lmssl.hub import HUB_ID, LOADER_BUILDERS
from lmssl.schema import Range, parse_dataclass

# Names lmssl itself writes in a run directory and in a stage folder: no stage, task or backbone may take one.
RUN_DIR_FILES = frozenset({"summary.md", ".partial", ".lmssl.lock"})
STAGE_DIR_FILES = frozenset({"stage.json", "metrics.jsonl", "tensorboard", "checkpoints", "loss.png", "README.md",
                             "runs", "submission", "results.json", "results.md", "report.json", "report.md",
                             "pretraining", "scratch", "results.png", ".hub-snapshots"})
MAX_NAME = 128  # leaves room for what lmssl adds (-<fingerprint>, -scratch-seed<N>, .tsv) within 255 bytes
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
WINDOWS_DEVICES = frozenset({"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))})


def check_path_name(name: str, where: str, reserved: frozenset = STAGE_DIR_FILES) -> None:
    """The one rule for every name that becomes a folder or file name (stage, task, probed backbone): a
    plain relative name of letters, digits and . _ - (no separator, no leading dot, so never '..'), at most
    MAX_NAME characters, and none of the names lmssl writes beside it."""
    if not NAME.match(name) or len(name.encode("utf-8")) > MAX_NAME:
        raise RecipeError(f"{where}: {name!r} must be a plain folder name: letters, digits and . _ - (not first), "
                          f"at most {MAX_NAME} characters, no path separators")
    if name.lower() in {r.lower() for r in reserved} or name.split(".")[0].lower() in WINDOWS_DEVICES:
        raise RecipeError(f"{where}: {name!r} is a name lmssl (or the file system) reserves; choose another")


@dataclass
class DataConfig:
    """Where a stage's examples come from: the arguments of `datasets.load_dataset`."""

    path: str = "builtin:pydocs"
    """A builder (text, csv, json, parquet, imagefolder), a local folder, a hub id, or builtin:NAME (offline, made by lmssl)."""
    files: Union[str, list[str], dict[str, Union[str, list[str]]], None] = None
    """data_files: a path or glob, a list, or {split: paths}; .xz/.gz are read as they are. Relative to the working directory."""
    data_dir: Optional[str] = None
    """data_dir for folder builders such as imagefolder."""
    config: Optional[str] = None
    """The dataset's configuration name (load_dataset's `name`), e.g. wikitext-2-raw-v1."""
    split: str = "train"
    """Split to train on."""
    eval_split: Optional[str] = None
    """Split to evaluate on; when absent, eval_fraction of the training split is held out."""
    eval_fraction: Annotated[float, Range(0, 1, high_open=True)] = 0.02
    """Share of the training split held out for evaluation when there is no eval_split (2%: enough for a stable loss)."""
    column: str = "text"
    """The text column (text stages)."""
    image_column: Optional[str] = None
    """The image column of a `datasets` source (vision stages); None takes the first column of type Image."""
    label_column: Optional[str] = "label"
    """Class labels for the kNN monitor and the probe stage: a column of a `datasets` source (class ids or
    names); folders and zips take the class subfolder. None reads the data as unlabeled."""
    max_samples: Optional[Annotated[int, Range(1)]] = None
    """Keep only N training rows (quick experiments): the first N of a text source, N drawn with the
    run's seed from an image source (so every class stays); None keeps all."""
    streaming: bool = False
    """Stream instead of downloading/reading everything first (corpora larger than memory or disk). Pretraining
    (mlm, causal_lm) then tokenizes and packs on the fly in DataLoader workers and needs max_steps; other
    stages read the stream into an on-disk table first."""
    shuffle_buffer: Annotated[int, Range(0, 10_000_000)] = 1000
    """Streaming pretraining: blocks are handed out in a seeded random order within windows of this many
    (0: in stream order). A resume re-tokenizes at most one window, so larger windows resume slower."""
    encoding: Optional[str] = None
    """Text encoding of local files (latin-1 for some Gutenberg books); None means UTF-8."""
    revision: Optional[str] = None
    """A hub dataset's branch, tag or commit (pin it for a reproducible run); None reads main."""
    max_chars: Annotated[int, Range(1)] = 1_000_000
    """Rows longer than this many characters are skipped and counted (a 10 MB line is broken data, not a document)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Further load_dataset keyword arguments, e.g. {delimiter: "\\t", quoting: 3} for TSV."""

    def check(self, where: str) -> None:
        """Fail early, offline: local files must exist, a hub id must at least look like one."""
        if self.path.startswith("builtin:"):
            from lmssl.data.builtin import BUILTIN, BUILTIN_IMAGES

            name = self.path.split(":", 1)[1]
            if name not in BUILTIN and name not in BUILTIN_IMAGES:
                known = ", ".join(sorted([*BUILTIN, *BUILTIN_IMAGES]))
                raise RecipeError(f"{where}.path: unknown builtin dataset {name!r}; known: {known}")
            return
        patterns: list[str] = []
        if isinstance(self.files, str):
            patterns = [self.files]
        elif isinstance(self.files, list):
            patterns = list(self.files)
        elif isinstance(self.files, dict):
            for value in self.files.values():
                patterns += [value] if isinstance(value, str) else list(value)
        for pattern in patterns:
            if "://" in pattern:
                continue
            if not glob.glob(os.path.expanduser(pattern)):
                raise RecipeError(f"{where}.files: no file matches {pattern!r} (relative paths start at {os.getcwd()})")
        if self.data_dir and not Path(self.data_dir).expanduser().exists() and self.path in LOADER_BUILDERS:
            raise RecipeError(f"{where}.data_dir: folder {self.data_dir!r} does not exist")
        if self.path in LOADER_BUILDERS:
            if not patterns and not self.data_dir:
                raise RecipeError(f"{where}: the {self.path!r} builder needs `files` or `data_dir`")
            return
        if Path(self.path).expanduser().exists():
            return
        if self.path.startswith((".", "/", "~")) or not HUB_ID.match(self.path):
            raise RecipeError(
                f"{where}.path: {self.path!r} is neither an existing local path, a builder "
                f"({', '.join(LOADER_BUILDERS)}), builtin:NAME, nor a hub id like 'org/name'"
            )


REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.{}-]{0,95}$")


@dataclass
class PushConfig:
    """Where a stage's outputs go on the Hub. The token comes from HF_TOKEN or `hf auth login`, never from
    the recipe; it is never printed or written."""

    repo_id: str = ""
    """namespace/name. A stage that makes several models (a finetune stage's tasks, a probe's backbones)
    pushes each to repo_id with {name} replaced by the task or backbone, or to <repo_id>-<name>."""
    private: bool = True
    """Create the repository private (an existing repository keeps its visibility)."""
    revision: Optional[str] = None
    """The branch to push to (created from main when missing); None pushes to main."""
    strategy: Literal["end", "checkpoints"] = "end"
    """end: push the finished folder. checkpoints (pretrain): also push the model of every saved checkpoint
    as branch step-<N>, in the background while training goes on."""

    def check(self, where: str, kind: str) -> None:
        if not REPO_ID.match(self.repo_id) or ".." in self.repo_id or "--" in self.repo_id:
            raise RecipeError(f"{where}.repo_id: {self.repo_id!r} is not a Hub repository id like 'me/my-model'")
        if self.revision is not None and (not re.match(r"^[\w.-]{1,128}$", self.revision) or ".." in self.revision
                                          or self.revision.startswith("-")):
            raise RecipeError(f"{where}.revision: {self.revision!r} is not a branch name (letters, digits, . _ -)")
        if self.strategy == "checkpoints" and kind != "pretrain":
            raise RecipeError(f"{where}.strategy: checkpoints are pushed from pretrain stages only; use end for {kind}")


@dataclass
class StageConfig:
    """Fields every stage has. Fields ending in `_from` name an earlier stage (or a folder/hub id)."""

    name: str = ""
    """The stage's name: its output folder under the run directory and how later stages refer to it."""
    kind: str = ""
    """The stage kind: tokenizer, pretrain, finetune, probe, perplexity."""
    push_to_hub: Optional[PushConfig] = None
    """Push what the stage made to the Hub: {repo_id, private, revision, strategy}; None keeps it local."""

    # Which stage kinds each *_from field may name; a value that is no stage name is a folder or hub id.
    REFERENCES: ClassVar[dict[str, tuple[str, ...]]] = {}

    def check(self, recipe: "Recipe", earlier: dict[str, "StageConfig"], where: str) -> None:
        """Kind-specific checks that need no training (files exist, objective fits model)."""

    def fingerprint_inputs(self) -> list[str]:
        """Contents beyond the config that decide the output (e.g. a spec file); part of the fingerprint."""
        return []

    def references(self) -> list[tuple[str, str]]:
        """(field, value) for every earlier stage, folder or hub id a *_from field names (one, or a list)."""
        pairs = []
        for ref in self.REFERENCES:
            value = getattr(self, ref)
            for item in value if isinstance(value, list) else [value]:
                if item is not None:
                    pairs.append((ref, item))
        return pairs


@dataclass
class TrainingConfig(StageConfig):
    """The knobs of the one training loop (training.py), shared by every training stage."""

    batch_size: Annotated[int, Range(1)] = 32
    """Examples per device per micro-batch."""
    learning_rate: Annotated[float, Range(0, 10, low_open=True)] = 5e-4
    """Peak learning rate after warmup (5e-4 suits small models trained from scratch)."""
    weight_decay: Annotated[float, Range(0, 10)] = 0.01
    """AdamW decoupled weight decay; never applied to biases and norm weights."""
    adam_betas: list[Annotated[float, Range(0, 1, high_open=True)]] = field(default_factory=lambda: [0.9, 0.98])
    """AdamW betas; 0.98 as in RoBERTa keeps large-batch pretraining stable."""
    adam_eps: Annotated[float, Range(0, 1, low_open=True)] = 1e-6
    """AdamW epsilon (RoBERTa's 1e-6)."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup."""
    warmup_ratio: Annotated[float, Range(0, 1, high_open=True)] = 0.06
    """Share of the steps spent warming up linearly from zero (6% as in RoBERTa)."""
    warmup_steps: Optional[Annotated[int, Range(0)]] = None
    """Warmup in steps; overrides warmup_ratio when set."""
    min_lr_ratio: Annotated[float, Range(0, 1)] = 0.0
    """Linear and cosine decay alike end at this share of the peak: 0 as in BERT, RoBERTa and the HF Trainer
    (0.1 is the lr/10 floor of Chinchilla-style cosine runs)."""
    max_steps: Optional[Annotated[int, Range(1)]] = None
    """Optimizer steps to train; when None, `epochs` decides."""
    epochs: Annotated[float, Range(0, low_open=True)] = 1.0
    """Passes over the training data when max_steps is None (fractions allowed)."""
    max_grad_norm: Optional[Annotated[float, Range(0, low_open=True)]] = 1.0
    """Clip the global gradient norm (1.0 is the BERT/GPT default); None disables clipping."""
    gradient_accumulation_steps: Optional[Annotated[int, Range(1, 4096)]] = None
    """Micro-batches per optimizer step; None takes the recipe's value."""
    eval_every: Optional[Annotated[int, Range(1)]] = None
    """Evaluate every N optimizer steps (and always at the end); None evaluates only at the end."""
    eval_batches: Optional[Annotated[int, Range(1)]] = None
    """Cap evaluation at N batches per process; None evaluates the whole eval set."""
    save_every: Optional[Annotated[int, Range(1)]] = 500
    """Write a resumable checkpoint every N optimizer steps; None only at interruptions."""
    keep_checkpoints: Annotated[int, Range(1)] = 2
    """How many recent checkpoints to keep (the newest valid one is used on resume)."""
    log_every: Annotated[int, Range(1)] = 10
    """Write metrics every N optimizer steps."""
    max_nonfinite_steps: Annotated[int, Range(1)] = 5
    """A non-finite loss skips the step; this many in a row stop the run with an error."""
    compile: bool = False
    """torch.compile the training module (inductor; on CPU it needs a C compiler, as gcc on Linux): the first
    steps compile, later ones run fused kernels. Sequence lengths that vary are compiled once as dynamic
    shapes; evaluation runs the eager module, so it never recompiles."""
    num_workers: Annotated[int, Range(0, 256)] = 0
    """DataLoader worker processes (0 collates in the training process; fine for tokenized text)."""
    checkpoint_format: Literal["auto", "safetensors", "dcp"] = "auto"
    """Training checkpoints: safetensors written by the main process, or torch.distributed.checkpoint (dcp),
    each process writing its own shard; auto takes dcp under FSDP (sharded weights) and safetensors otherwise."""
    defaults: Literal["lmssl", "trainer"] = "lmssl"
    """The defaults of the optimization fields left unset: lmssl's (above, each with its reason) or the HF
    Trainer's (TrainingArguments: lr 5e-5, betas 0.9/0.999, eps 1e-8, no weight decay, no warmup, linear decay
    to 0, 3 epochs of batch 8), for a setup ported from the Trainer."""

    def fill_defaults(self, written: set[str]) -> None:
        """Called by the parser with the keys the recipe wrote: `defaults: trainer` fills the others."""
        if self.defaults == "trainer":
            for key, value in TRAINER_DEFAULTS.items():
                if key not in written:
                    setattr(self, key, list(value) if isinstance(value, list) else value)


# transformers.TrainingArguments' defaults (5.x), for the fields lmssl's loop shares with it.
TRAINER_DEFAULTS = {"learning_rate": 5e-5, "weight_decay": 0.0, "adam_betas": [0.9, 0.999], "adam_eps": 1e-8,
                    "max_grad_norm": 1.0, "schedule": "linear", "warmup_ratio": 0.0, "warmup_steps": None,
                    "min_lr_ratio": 0.0, "epochs": 3.0, "batch_size": 8}


@dataclass
class Recipe:
    """A whole run: global settings and the stages in order."""

    name: str = "run"
    """The run's name; the default run directory is runs/<name>."""
    seed: Annotated[int, Range(0, 2**32 - 1)] = 0
    """Seeds every RNG; with the same seed a run is reproducible bit for bit on CPU."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Precision of the run's one Accelerator (bf16 on Ampere+ GPUs; no on CPU)."""
    gradient_accumulation_steps: Annotated[int, Range(1, 4096)] = 1
    """Default micro-batches per optimizer step for every training stage."""
    run_dir: Optional[str] = None
    """Where stage folders go; default runs/<name>. The CLI's --run-dir wins."""
    license: str = "other"
    """The license written into every model card (a Hub license id: apache-2.0, mit, cc-by-4.0, ...; other
    when you have not decided: mind the licenses of the data you trained on)."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers for every training stage, through Accelerate: tensorboard, wandb, mlflow, comet_ml,
    aim, clearml, dvclive, swanlab, trackio; [] or [none] for none. metrics.jsonl is always written."""
    stages: list[Any] = field(default_factory=list)
    """The stages, run in order; each is a mapping with name, kind and that kind's fields."""
    source: Optional[str] = None
    """The recipe file this came from (filled by load_recipe)."""
    raw: dict[str, Any] = field(default_factory=dict)
    """The recipe as loaded, after --set overrides (written into stage.json and model cards)."""

    def stage(self, name: str) -> StageConfig:
        return {stage.name: stage for stage in self.stages}[name]  # KeyError for an unknown name


# --------------------------------------------------------------------------- loading

def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `--set a.b.c=value` to the raw recipe mapping; stages are addressed by name."""
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r}: expected KEY=VALUE, e.g. stages.pretrain.max_steps=100")
    key, text = assignment.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if node is raw and part == "stages" and i == 0:
            continue
        if i == 1 and parts[0] == "stages":
            stages = raw.get("stages") or []
            match = [s for s in stages if isinstance(s, dict) and s.get("name", s.get("kind")) == part]
            if not match:
                names = [s.get("name", s.get("kind")) for s in stages if isinstance(s, dict)]
                raise RecipeError(f"--set {key}: no stage named {part!r}; stages: {', '.join(map(str, names))}")
            node = match[0]
            continue
        if not isinstance(node, dict):
            raise RecipeError(f"--set {key}: {'.'.join(parts[:i])} is not a mapping")
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
    if not isinstance(node, dict):
        raise RecipeError(f"--set {key}: cannot set a field inside {node!r}")
    node[parts[-1]] = value


def _line_of(text: str, where: str) -> Optional[int]:
    """1-based line of the key at `where` (stages.NAME.a.b) in the YAML text, if it can be found."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    parts = [p for p in re.split(r"[.\[\]]", where) if p]
    line = None
    for part in parts:
        if isinstance(node, yaml.MappingNode):
            hit = [(k, v) for k, v in node.value if getattr(k, "value", None) == part]
            if not hit:
                break
            line = hit[0][0].start_mark.line + 1
            node = hit[0][1]
        elif isinstance(node, yaml.SequenceNode):
            chosen = None
            for item in node.value:
                if isinstance(item, yaml.MappingNode):
                    for k, v in item.value:
                        if k.value in ("name", "kind") and v.value == part:
                            chosen = chosen or item
            if part.isdigit() and int(part) < len(node.value):
                chosen = node.value[int(part)]
            if chosen is None:
                break
            line = chosen.start_mark.line + 1
            node = chosen
        else:
            break
    return line


def load_recipe(path: Union[str, Path], kinds: dict[str, type], overrides: Optional[list[str]] = None,
                check: bool = True, rewrite: Optional[Callable[[dict], dict]] = None) -> Recipe:
    """Read, override, parse and (by default) check a recipe; every mistake is a RecipeError.
    `kinds` maps each stage kind to its Config class (the stage registry, passed down from above);
    `rewrite` maps the mapping after the overrides (`lmssl results --data-dir` moves data paths)."""
    path = Path(path)
    if not path.is_file():
        what = "is not a file (a folder or a device)" if path.exists() else "does not exist"
        raise RecipeError(f"recipe {str(path)!r} {what}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(f"recipe {str(path)!r} is not a UTF-8 text file (byte {err.start} does not decode); "
                          "a recipe is YAML") from None
    if "\x00" in text:
        raise RecipeError(f"recipe {str(path)!r} holds NUL bytes: a binary file, not a YAML recipe")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(f"{path}: YAML syntax error{at}: {problem}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with at least `stages:`, got {type(raw).__name__}")
    for assignment in overrides or []:
        apply_override(raw, assignment)
    if rewrite is not None:
        raw = rewrite(raw)
    try:
        recipe = parse_raw(raw, kinds)
        recipe.source = str(path)
        if check:
            check_recipe(recipe)
    except RecipeError as err:
        message = str(err)
        key = message.split(":", 1)[0].split(" ")[0]
        line = _line_of(text, key)
        where = f"{path}, line {line}" if line else str(path)
        raise RecipeError(f"{where}: {message}") from None
    return recipe


def parse_raw(raw: dict, kinds: dict[str, type]) -> Recipe:
    """A Recipe from a loaded mapping; `kinds` maps stage kinds to their Config kinds."""
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise RecipeError("stages: a recipe needs a non-empty list of stages")
    top = {k: v for k, v in raw.items() if k != "stages"}
    if "hub" in top:
        raise RecipeError("hub: a recipe-level hub section pushes nothing; give each stage to share "
                          "push_to_hub: {repo_id: me/name} (the token comes from HF_TOKEN or `hf auth login`)")
    if isinstance(top.get("report_to"), str):  # report_to: wandb, as TrainingArguments takes it
        top["report_to"] = [top["report_to"]]
    recipe = parse_dataclass(Recipe, top, "")
    for index, entry in enumerate(stages_raw):
        if not isinstance(entry, dict):
            raise RecipeError(f"stages[{index}]: each stage is a mapping with `kind`, got {entry!r}")
        kind = entry.get("kind")
        name = entry.get("name", kind)
        where = f"stages.{name}" if isinstance(name, str) and name else f"stages[{index}]"
        if kind not in kinds:
            near = difflib.get_close_matches(str(kind), list(kinds), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise RecipeError(f"{where}.kind: unknown stage kind {kind!r} (known: {', '.join(kinds)}){hint}")
        entry = dict(entry, name=name)
        recipe.stages.append(parse_dataclass(kinds[kind], entry, where))
    recipe.raw = raw
    return recipe


def check_recipe(recipe: Recipe) -> None:
    """Cross-stage checks: unique names, references to earlier stages of the right kind, files."""
    from lmssl.hub import check_license
    from lmssl.tracking import check_trackers  # noqa: I001

    check_license(recipe.license, "license")
    check_trackers(recipe.report_to, "report_to")
    seen: dict[str, StageConfig] = {}
    order = {s.name: i for i, s in enumerate(recipe.stages)}
    for stage in recipe.stages:
        where = f"stages.{stage.name}"
        if stage.name in seen:
            raise RecipeError(f"{where}.name: two stages are named {stage.name!r}; names must be unique")
        check_path_name(stage.name, f"{where}.name", RUN_DIR_FILES)
        if stage.push_to_hub is not None:
            stage.push_to_hub.check(f"{where}.push_to_hub", stage.kind)
        for ref, value in stage.references():
            kinds = stage.REFERENCES[ref]
            if value in seen:
                if seen[value].kind not in kinds:
                    raise RecipeError(
                        f"{where}.{ref}: stage {value!r} is a {seen[value].kind} stage; {ref} needs one of: {', '.join(kinds)}"
                    )
            elif value in order:
                raise RecipeError(
                    f"{where}.{ref}: stage {value!r} comes later in the recipe; a stage can only use earlier stages"
                )
            elif Path(value).expanduser().exists():
                continue
            elif value.startswith((".", "/", "~")) or not HUB_ID.match(value.split("@")[0]) or "/" not in value \
                    or value.count("@") > 1 or value.endswith("@"):
                raise RecipeError(
                    f"{where}.{ref}: {value!r} names no earlier stage ({', '.join(seen) or 'none'}), "
                    "no existing folder, and is not a hub id like 'org/name' (or 'org/name@revision')"
                )
        stage.check(recipe, dict(seen), where)
        seen[stage.name] = stage
