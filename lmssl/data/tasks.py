"""Downstream tasks by name (GLUE, builtin) or described in the recipe (any CSV/JSON/parquet with
text and label columns), loaded into one layout: columns text, [text_pair], label, idx.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Optional, Union

from lmssl.data.glue import AX, GLUE_TASKS, GlueTask, TaskDefaults, has_training_data, load_split, local_file
from lmssl.errors import LmsslError, RecipeError
from lmssl.recipe import DataConfig, check_path_name
from lmssl.schema import Range

ALL_GLUE = "glue"  # in `tasks:`, every GLUE task whose training data is present
HELD_OUT = 0.1     # share of the training rows used for validation when a task has no validation split


@dataclass
class TaskSpec:
    """A labeled task for fine-tuning: its data and which columns are texts and labels."""

    name: str = "custom"
    """The task's name: its output folder and its row in the results table."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data (split), validation data (eval_split; else 10% of the training rows are held out)."""
    text_column: str = "sentence"
    """The (first) text column."""
    pair_column: Optional[str] = None
    """The second text column for pair tasks (entailment, paraphrase)."""
    label_column: str = "label"
    """The label column: class ids or names, or a float for regression."""
    num_labels: Optional[Annotated[int, Range(1, 100_000)]] = None
    """Number of classes (1 for regression); None infers it from the labels (a float column is regression)."""
    labels: Optional[list[str]] = None
    """Class names in id order, saved as the model's id2label; None takes the sorted training labels."""
    test_split: Optional[str] = None
    """An unlabeled split to predict; predictions are written as submission/<name>.tsv (index, prediction)."""
    metrics: Optional[list[str]] = None
    """Scores to report (accuracy, f1, matthews_correlation, pearson, spearmanr); None: accuracy for classes,
    pearson and spearmanr for regression. The first (or the mean of several) picks the best seed."""

    def check(self, where: str) -> None:
        from lmssl.evaluation import METRIC_FUNCTIONS

        self.data.check(f"{where}.data")
        if self.labels is not None:
            if len(set(self.labels)) != len(self.labels) or len(self.labels) < 2:
                raise RecipeError(f"{where}.labels: list at least two distinct class names, got {self.labels!r}")
            if self.num_labels is not None and self.num_labels != len(self.labels):
                raise RecipeError(f"{where}.num_labels: {self.num_labels} disagrees with the {len(self.labels)} "
                                  f"names in labels; drop one of the two")
        if self.num_labels is not None and self.num_labels < 1:
            raise RecipeError(f"{where}.num_labels: must be 1 (regression) or more, got {self.num_labels}")
        for name in self.metrics or []:
            if name not in METRIC_FUNCTIONS:
                raise RecipeError(f"{where}.metrics: unknown metric {name!r}; known: {', '.join(METRIC_FUNCTIONS)}")
        self._check_columns(where)

    def _check_columns(self, where: str) -> None:
        """Named columns must be in each local CSV/parquet file's header (read without loading the rows)."""
        files = {"train": self.data.files} if isinstance(self.data.files, (str, list)) else self.data.files or {}
        needs = {self.data.split: ("text_column", "pair_column", "label_column"),
                 self.data.eval_split: ("text_column", "pair_column", "label_column"),
                 self.test_split: ("text_column", "pair_column")}
        for split, keys in needs.items():
            paths = files.get(split) if split else None
            for path in [paths] if isinstance(paths, str) else paths or []:
                header = _header(self.data, path)
                for key in keys:
                    column = getattr(self, key)
                    if header is not None and column is not None and column not in header:
                        raise RecipeError(f"{where}.{key}: {path} ({split} split) has no column {column!r}; "
                                          f"its columns are: {', '.join(header)}")


def _header(data: DataConfig, path: str) -> Optional[list[str]]:
    """Column names of a local, uncompressed CSV or parquet file; None when that cannot be known cheaply."""
    import csv
    import glob

    if "://" in path or any(ch in path for ch in "*?[") or not glob.glob(os.path.expanduser(path)):
        return None
    if data.path == "parquet" or path.endswith(".parquet"):
        import pyarrow.parquet

        return list(pyarrow.parquet.read_schema(os.path.expanduser(path)).names)
    if data.path == "csv" and path.endswith((".csv", ".tsv", ".txt")):
        delimiter = data.options.get("delimiter", data.options.get("sep", "\t" if path.endswith(".tsv") else ","))
        with open(os.path.expanduser(path), newline="", encoding=data.encoding or "utf-8-sig") as f:
            return next(csv.reader(f, delimiter=delimiter), None)
    return None


# ---------------------------------------------------------------------------------------------------
# Builtin tasks (offline, made by lmssl). Keep every builtin task in this block.
from lmssl.data.builtin import LABELS as TOPIC_LABELS  # noqa: E402

BUILTIN_TASKS = {
    "pydocs-topic": TaskSpec(
        name="pydocs-topic",
        data=DataConfig(path="builtin:pydocs-topic", column="text"),
        text_column="text", label_column="label", num_labels=len(TOPIC_LABELS), labels=list(TOPIC_LABELS),
    ),
}
# End of builtin tasks.
# ---------------------------------------------------------------------------------------------------

KNOWN_NAMES = [ALL_GLUE, *GLUE_TASKS, *BUILTIN_TASKS]


@dataclass
class Task:
    """A task ready to fine-tune: its splits in lmssl's layout and how to score and submit it."""

    name: str
    train: Any
    evals: dict[str, Any]
    """Evaluation splits by name; the first one picks the best seed."""
    label_names: Optional[list[str]]
    """Class names in id order; None for regression."""
    metrics: tuple[str, ...]
    defaults: TaskDefaults = TaskDefaults()
    tests: dict[str, Any] = field(default_factory=dict)
    submission: dict[str, str] = field(default_factory=dict)
    """Test split -> submission file name (without .tsv)."""
    predict_names: bool = True
    """Write class names (not ids) into the submission files."""

    @property
    def has_pair(self) -> bool:
        return "text_pair" in self.train.column_names


def offline() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def check_tasks(tasks: list, glue_dir: Optional[str], where: str) -> None:
    """Recipe-time checks: known names, GLUE data present for the GLUE tasks named, no duplicate names."""
    seen: set[str] = set()
    if glue_dir is not None and not os.path.isdir(os.path.expanduser(glue_dir)):
        raise RecipeError(f"{where}.glue_dir: folder {glue_dir!r} does not exist (relative paths start at {os.getcwd()})")
    for i, task in enumerate(tasks):
        at = f"{where}.tasks[{i}]"
        if isinstance(task, TaskSpec):
            task.check(at)
            name = task.name
        elif task in GLUE_TASKS or task == ALL_GLUE:
            name = task
            if glue_dir is None and offline():
                raise RecipeError(f"{at}: GLUE task {task!r} needs `glue_dir` (a local glue_data folder) while "
                                  "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set; without it nyu-mll/glue is downloaded")
            if glue_dir is not None and task == ALL_GLUE and not any(
                    has_training_data(glue_dir, t) for t in GLUE_TASKS.values()):
                raise RecipeError(f"{at}: no GLUE task has a train.tsv[.xz] under {glue_dir!r}")
            if glue_dir is not None and task in GLUE_TASKS and not has_training_data(glue_dir, GLUE_TASKS[task]):
                folder = os.path.join(glue_dir, GLUE_TASKS[task].folder)
                raise RecipeError(f"{at}: GLUE task {task!r} has no training data ({folder}/train.tsv or .tsv.xz is "
                                  f"missing); remove it, or list `{ALL_GLUE}` to run every task whose data is present")
        elif task in BUILTIN_TASKS:
            name = task
        else:
            near = difflib.get_close_matches(str(task), KNOWN_NAMES, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise RecipeError(f"{at}: unknown task {task!r}{hint} Known: {', '.join(KNOWN_NAMES)}, or a mapping "
                              "with data, text_column and label_column for your own data")
        check_path_name(name, f"{at}.name" if isinstance(task, TaskSpec) else at)  # it names folders and files
        if name in seen:
            raise RecipeError(f"{at}: task {name!r} is listed twice")
        seen.add(name)


def expand_tasks(tasks: list, glue_dir: Optional[str], notice: Callable[[str], None]) -> list:
    """`glue` becomes every GLUE task whose training data is present (a notice for each one skipped)."""
    out: list = []
    for task in tasks:
        if task != ALL_GLUE:
            out.append(task)
            continue
        for name, glue in GLUE_TASKS.items():
            if name in tasks:
                continue
            if glue_dir is None or has_training_data(glue_dir, glue):
                out.append(name)
            else:
                notice(f"skipping GLUE task {name}: no training data in {os.path.join(glue_dir, glue.folder)}")
    return out


def load_task(task: Union[str, TaskSpec], glue_dir: Optional[str], seed: int, where: str) -> Task:
    if isinstance(task, str) and task in GLUE_TASKS:
        return _load_glue(GLUE_TASKS[task], glue_dir, where)
    return _load_custom(BUILTIN_TASKS[task] if isinstance(task, str) else task, seed, where)


def _load_glue(glue: GlueTask, glue_dir: Optional[str], where: str) -> Task:
    evals = {split: load_split(glue, split, glue_dir) for split in glue.evals}
    tests, submission = {}, {}
    for split in glue.tests:
        if glue_dir is None or local_file(glue_dir, glue, glue.tests[split]) is not None:
            tests[split] = load_split(glue, split, glue_dir)
            submission[split] = glue.submission[split]
    if glue.name == "mnli" and (glue_dir is None or local_file(glue_dir, AX, "diagnostic") is not None):
        tests["ax"] = load_split(AX, "test", glue_dir)  # the diagnostic set is scored with the MNLI model
        submission["ax"] = AX.submission["test"]
    task = Task(glue.name, load_split(glue, "train", glue_dir), evals,
                list(glue.label_names) if glue.label_names else None, glue.metrics, glue.defaults,
                tests, submission, glue.predict_names)
    for split, data in [("train", task.train), *evals.items()]:
        if len(data) == 0:
            raise LmsslError(f"{where}: GLUE task {glue.name!r} has an empty {split} split")
    return task


# --------------------------------------------------------------------------- custom tasks

def _read(spec: TaskSpec, split: str, where: str):
    import datasets

    data = spec.data
    if data.path.startswith("builtin:"):
        from lmssl.data.builtin import builtin_file

        return datasets.load_dataset("json", data_files={"train": str(builtin_file(data.path.split(":", 1)[1]))},
                                     split="train")
    files = {"train": data.files} if isinstance(data.files, (str, list)) else data.files
    if isinstance(files, dict) and split in files:  # read this split's files alone: splits may differ in columns
        files = {split: files[split]}
    kwargs = dict(data.options, **({"encoding": data.encoding} if data.encoding else {}),
                  **({"revision": data.revision} if data.revision else {}))
    try:
        return datasets.load_dataset(data.path, name=data.config, data_files=files, data_dir=data.data_dir,
                                     split=split, **kwargs)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetsError) as err:
        cause = err.__cause__ or err.__context__ or err  # datasets wraps the parser's own message
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        if "corresponds to no data" in reason or "No columns to parse" in reason:
            raise LmsslError(f"{where}: the {split!r} split of task {spec.name!r} is empty "
                             f"({files or data.data_dir}); it needs labeled rows") from None
        raise LmsslError(f"{where}: could not read the {split!r} split of task {spec.name!r} from "
                         f"{data.path} {files or data.data_dir or ''}: {reason}") from None


def _layout(data, spec: TaskSpec, split: str, labeled: bool, where: str):
    """Select and rename the named columns to text, [text_pair], label and add idx (the row number)."""
    wanted = {spec.text_column: "text", **({spec.pair_column: "text_pair"} if spec.pair_column else {})}
    if labeled:
        wanted[spec.label_column] = "label"
    for column, role in wanted.items():
        if column not in data.column_names:
            key = {"text": "text_column", "text_pair": "pair_column", "label": "label_column"}[role]
            raise LmsslError(f"{where}: the {split!r} split of task {spec.name!r} has no column {column!r} "
                             f"(named by {key}); its columns are: {', '.join(data.column_names)}")
    if len(data) == 0:
        raise LmsslError(f"{where}: the {split!r} split of task {spec.name!r} is empty; it needs labeled rows")
    data = data.select_columns(list(wanted)).rename_columns(wanted)
    for role in ("text", "text_pair"):
        if role in data.column_names:
            blank = [i for i, t in enumerate(data[role]) if not isinstance(t, str) or not t.strip()]
            if blank:
                column = spec.text_column if role == "text" else spec.pair_column
                raise LmsslError(f"{where}: the {split!r} split of task {spec.name!r} has {len(blank)} rows without "
                                 f"text in column {column!r} (first: row {blank[0] + 1}); fill or drop them")
    return data.add_column("idx", list(range(len(data))))


def _label_names(spec: TaskSpec, train, where: str) -> Optional[list[str]]:
    """Class names in id order, or None for regression."""
    dtype = str(train.features["label"].dtype) if hasattr(train.features["label"], "dtype") else ""
    values = set(train["label"])
    if spec.num_labels == 1 or (spec.num_labels is None and spec.labels is None and dtype.startswith("float")):
        return None  # regression: _encode_labels checks that every label is a number
    if spec.labels is not None:
        return list(spec.labels)
    if len(values) < 2:
        raise LmsslError(f"{where}: task {spec.name!r} has one class only ({', '.join(sorted(map(repr, values)))}) in its "
                         "training split; a classifier needs two or more (list them in `labels:`), or set "
                         "num_labels: 1 for regression")
    if all(isinstance(v, str) for v in values):
        return sorted(values)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise LmsslError(f"{where}: task {spec.name!r}: labels must be class names or class ids 0..N-1, got "
                         f"{sorted(map(repr, values))[:5]}; set num_labels: 1 for regression")
    return [str(i) for i in range(spec.num_labels or max(values) + 1)]


def _is_number(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def _encode_labels(data, names: Optional[list[str]], spec: TaskSpec, split: str, where: str):
    import datasets

    if names is None:
        wrong = [i for i, v in enumerate(data["label"]) if not _is_number(v)]
        if wrong:
            raise LmsslError(f"{where}: task {spec.name!r}, {split!r} split, row {wrong[0] + 1}: label "
                             f"{data[wrong[0]]['label']!r} is not a number, and the task is a regression")
        return data.cast_column("label", datasets.Value("float32"))
    ids = {name: i for i, name in enumerate(names)}

    def encode(batch, indices):
        out = []
        for value, row in zip(batch["label"], indices):
            if isinstance(value, str) and value in ids:
                out.append(ids[value])
            elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
                out.append(value)
            else:
                hint = "" if spec.labels is not None else " (the label set comes from the training split; " \
                                                           "list every class in `labels:`)"
                raise LmsslError(f"{where}: task {spec.name!r}, {split!r} split, row {row + 1}: label {value!r} is "
                                 f"outside the label set {names} (ids 0..{len(names) - 1}){hint}")
        return {"label": out}

    features = data.features.copy()
    features["label"] = datasets.Value("int64")
    return data.map(encode, batched=True, with_indices=True, features=features, desc="labels")


def _load_custom(spec: TaskSpec, seed: int, where: str) -> Task:
    data = spec.data
    train = _read(spec, data.split, where)
    if "split" in train.column_names and not data.eval_split:  # builtin sets carry their split in a column
        valid = train.filter(lambda r: r["split"] == "validation")
        train = train.filter(lambda r: r["split"] == "train")
    elif data.eval_split:
        valid = _read(spec, data.eval_split, where)
    else:
        valid = None
    train = _layout(train, spec, data.split, True, where)
    if data.max_samples is not None:
        train = train.select(range(min(data.max_samples, len(train))))
    if valid is None:
        parts = train.train_test_split(test_size=HELD_OUT, seed=seed)
        train, valid = parts["train"], parts["test"]
    else:
        valid = _layout(valid, spec, data.eval_split or "validation", True, where)
    names = _label_names(spec, train, where)
    train = _encode_labels(train, names, spec, data.split, where)
    valid = _encode_labels(valid, names, spec, data.eval_split or "validation", where)
    tests, submission = {}, {}
    if spec.test_split:
        test = _layout(_read(spec, spec.test_split, where), spec, spec.test_split, False, where)
        tests[spec.test_split] = test.add_column("label", [-1.0 if names is None else -1] * len(test))
        submission[spec.test_split] = spec.name
    metrics = tuple(spec.metrics or (("pearson", "spearmanr") if names is None else ("accuracy",)))
    return Task(spec.name, train, {"validation": valid}, names, metrics, TaskDefaults(), tests, submission, True)
