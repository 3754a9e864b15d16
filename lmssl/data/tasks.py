"""Downstream tasks by name: where the labeled data is and which columns hold texts and labels.

A recipe names a task (`pydocs-replaced`) or describes its own with the same fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from lmssl.recipe import DataConfig


@dataclass
class TaskSpec:
    """A labeled task for fine-tuning: its data and which columns are texts and labels."""

    name: str = "custom"
    """The task's name: its output folder and its row in the results table."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data (and eval_split for the validation data)."""
    text_column: str = "sentence"
    """The (first) text column."""
    pair_column: Optional[str] = None
    """The second text column for pair tasks (entailment, paraphrase)."""
    label_column: str = "label"
    """The label column: class ids or names, or a float for regression."""
    num_labels: Optional[int] = None
    """Number of classes (1 for regression); None infers it from the training labels."""


BUILTIN_TASKS = {
    "pydocs-topic": TaskSpec(
        name="pydocs-topic",
        data=DataConfig(path="builtin:pydocs-topic", column="text"),
        text_column="text", label_column="label", num_labels=10,
    ),
}


def task_spec(task) -> TaskSpec:
    if isinstance(task, TaskSpec):
        return task
    return BUILTIN_TASKS[task]
