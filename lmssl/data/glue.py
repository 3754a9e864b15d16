"""The nine GLUE tasks (Wang et al., 2018): from a local folder in the original glue_data layout, or
from the hub's `nyu-mll/glue` when online. Every split comes out as columns text, [text_pair], label, idx.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import lzma
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from lmssl.errors import LmsslError


@dataclass(frozen=True)
class TaskDefaults:
    """Fine-tuning hyperparameters a task gets unless the recipe sets them."""

    learning_rate: float = 2e-5  # BERT's grid {2,3,5}e-5; 2e-5 is run_glue's and most papers' pick
    epochs: float = 3.0          # BERT: 3 epochs suffice on the large tasks
    batch_size: int = 32         # BERT's default fine-tuning batch
    max_length: int = 128        # BERT's fine-tuning sequence length


SMALL = TaskDefaults(epochs=5.0, batch_size=16)  # few thousand rows: more, smaller steps (RoBERTa uses bs 16 here)
SHORT = TaskDefaults(max_length=64)              # single short sentences: 64 tokens cover >99%


@dataclass(frozen=True)
class GlueTask:
    """Where one GLUE task's files are and how its columns map to text, text_pair, label and idx."""

    name: str
    folder: str
    """Folder under glue_dir, and the hub configuration is `name`."""
    text: tuple[str, str]
    """(local column, hub column) of the first text."""
    pair: Optional[tuple[str, str]]
    """(local column, hub column) of the second text, for pair tasks."""
    label: str
    """Local label column (the hub's is always `label`)."""
    label_names: Optional[tuple[str, ...]]
    """Label names in the hub's id order; None for regression (STS-B)."""
    metrics: tuple[str, ...]
    defaults: TaskDefaults = TaskDefaults()
    evals: dict[str, str] = field(default_factory=lambda: {"validation": "dev"})
    """Evaluation splits: hub split -> local file stem. The first one chooses the best run."""
    tests: dict[str, str] = field(default_factory=lambda: {"test": "test"})
    """Test splits: hub split -> local file stem."""
    submission: dict[str, str] = field(default_factory=dict)
    """Test split -> file name (without .tsv) in the GLUE submission zip."""
    headerless: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Local file stems without a header row (CoLA train/dev) -> the column names they would have."""
    index: str = "index"
    """Local column with the test row's id, as the submission format wants it."""
    predict_names: bool = False
    """Submit label names (entailment) rather than ids, as the GLUE server expects for NLI tasks."""


COLA_COLUMNS = ("source", "label", "original_mark", "sentence")
GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("cola", "CoLA", ("sentence", "sentence"), None, "label", ("unacceptable", "acceptable"),
                     ("matthews_correlation",), SMALL, headerless=dict.fromkeys(("train", "dev"), COLA_COLUMNS),
                     submission={"test": "CoLA"}),
    "sst2": GlueTask("sst2", "SST-2", ("sentence", "sentence"), None, "label", ("negative", "positive"),
                     ("accuracy",), SHORT, submission={"test": "SST-2"}),
    "mrpc": GlueTask("mrpc", "MRPC", ("#1 String", "sentence1"), ("#2 String", "sentence2"), "Quality",
                     ("not_equivalent", "equivalent"), ("f1", "accuracy"), SMALL, submission={"test": "MRPC"}),
    "qqp": GlueTask("qqp", "QQP", ("question1", "question1"), ("question2", "question2"), "is_duplicate",
                    ("not_duplicate", "duplicate"), ("f1", "accuracy"), index="id", submission={"test": "QQP"}),
    "stsb": GlueTask("stsb", "STS-B", ("sentence1", "sentence1"), ("sentence2", "sentence2"), "score", None,
                     ("pearson", "spearmanr"), SMALL, submission={"test": "STS-B"}),
    "mnli": GlueTask("mnli", "MNLI", ("sentence1", "premise"), ("sentence2", "hypothesis"), "gold_label",
                     ("entailment", "neutral", "contradiction"), ("accuracy",),
                     evals={"validation_matched": "dev_matched", "validation_mismatched": "dev_mismatched"},
                     tests={"test_matched": "test_matched", "test_mismatched": "test_mismatched"},
                     submission={"test_matched": "MNLI-m", "test_mismatched": "MNLI-mm"}, predict_names=True),
    "qnli": GlueTask("qnli", "QNLI", ("question", "question"), ("sentence", "sentence"), "label",
                     ("entailment", "not_entailment"), ("accuracy",), submission={"test": "QNLI"},
                     predict_names=True),
    "rte": GlueTask("rte", "RTE", ("sentence1", "sentence1"), ("sentence2", "sentence2"), "label",
                    ("entailment", "not_entailment"), ("accuracy",), SMALL, submission={"test": "RTE"},
                    predict_names=True),
    "wnli": GlueTask("wnli", "WNLI", ("sentence1", "sentence1"), ("sentence2", "sentence2"), "label",
                     ("not_entailment", "entailment"), ("accuracy",), SMALL, submission={"test": "WNLI"}),
}
# The diagnostic set: unlabeled pairs scored with the MNLI model and submitted as AX.tsv.
AX = GlueTask("ax", "AX", ("sentence1", "premise"), ("sentence2", "hypothesis"), "label",
              GLUE_TASKS["mnli"].label_names, ("matthews_correlation",), evals={},
              tests={"test": "diagnostic"}, submission={"test": "AX"}, predict_names=True)

COMPRESSED = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}


def local_file(glue_dir: Union[str, Path], task: GlueTask, stem: str) -> Optional[Path]:
    """<glue_dir>/<Folder>/<stem>.tsv, plain or compressed (.xz, .gz, .bz2); None when absent."""
    folder = Path(glue_dir).expanduser() / task.folder
    for suffix in ("", *COMPRESSED):
        path = folder / f"{stem}.tsv{suffix}"
        if path.is_file():
            return path
    return None


def has_training_data(glue_dir: Union[str, Path], task: GlueTask) -> bool:
    return local_file(glue_dir, task, "train") is not None


def read_tsv(path: Path, header: bool = True) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a GLUE TSV: tabs, no quoting (texts hold bare quotes), a BOM tolerated (MRPC)."""
    opener = COMPRESSED.get(path.suffix)
    raw = opener(path, "rb") if opener else open(path, "rb")
    with raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as text:
        rows = list(csv.reader(text, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = [r for r in rows if r]
    return (rows[0], rows[1:]) if header else ([], rows)


def _label(value: str, task: GlueTask, where: str) -> Union[int, float]:
    if task.label_names is None:
        return float(value)
    if value in task.label_names:
        return task.label_names.index(value)
    if value.isdigit() and int(value) < len(task.label_names):
        return int(value)
    raise LmsslError(f"{where}: label {value!r} is not one of {', '.join(task.label_names)} "
                     f"(or 0..{len(task.label_names) - 1})")


def load_local(glue_dir: Union[str, Path], task: GlueTask, stem: str, labeled: bool):
    """One local split as a datasets.Dataset with text, [text_pair], label (-1 when unlabeled) and idx."""
    import datasets

    path = local_file(glue_dir, task, stem)
    if path is None:
        raise LmsslError(f"GLUE task {task.name!r}: no {stem}.tsv (or .tsv.xz/.gz/.bz2) in "
                         f"{Path(glue_dir) / task.folder}")
    header, rows = read_tsv(path, header=stem not in task.headerless)
    header = list(task.headerless.get(stem, header))

    def position(column: str) -> int:
        if column not in header:
            raise LmsslError(f"{path}: no column {column!r} in the header ({', '.join(header)}); "
                             "is this the original glue_data layout?")
        return header.index(column)

    text = position(task.text[0])
    pair = position(task.pair[0]) if task.pair else None
    label = position(task.label) if labeled else None
    index = position(task.index) if not labeled and task.index in header else None
    width = max(filter(lambda p: p is not None, (text, pair, label, index))) + 1
    columns: dict[str, list] = {"text": [], **({"text_pair": []} if pair is not None else {}), "label": [], "idx": []}
    skipped = 0
    for number, row in enumerate(rows):
        if len(row) < width:  # a broken line (QQP has a few); the official loaders drop them too
            skipped += 1
            continue
        columns["text"].append(row[text])
        if pair is not None:
            columns["text_pair"].append(row[pair])
        columns["label"].append(_label(row[label], task, f"{path}, row {number + 1}") if labeled
                                else (-1.0 if task.label_names is None else -1))
        columns["idx"].append(int(row[index]) if index is not None else number)
    features = datasets.Features({
        "text": datasets.Value("string"),
        **({"text_pair": datasets.Value("string")} if pair is not None else {}),
        "label": datasets.Value("float32" if task.label_names is None else "int64"),
        "idx": datasets.Value("int64"),
    })
    return datasets.Dataset.from_dict(columns, features=features)


def load_hub(task: GlueTask, split: str):
    """One split of `nyu-mll/glue` (needs a network or a filled HF cache), renamed to lmssl's columns."""
    import datasets

    data = datasets.load_dataset("nyu-mll/glue", task.name, split=split)
    renames = {task.text[1]: "text", **({task.pair[1]: "text_pair"} if task.pair else {})}
    return data.rename_columns(renames)


def load_split(task: GlueTask, split: str, glue_dir: Optional[Union[str, Path]]):
    """A hub-named split (train, validation, validation_matched, test, ...) from glue_dir or the hub."""
    if glue_dir is None:
        return load_hub(task, split)
    stem = {"train": "train", **task.evals, **task.tests}[split]
    return load_local(glue_dir, task, stem, labeled=split not in task.tests)


def label_counts(data) -> dict:
    """How often each label occurs (for balance checks and the majority-class baseline)."""
    counts: dict = {}
    for value in data["label"]:
        counts[value] = counts.get(value, 0) + 1
    return counts
