"""Text sources into `datasets`: one DataConfig -> a training split and an evaluation split.

Every source goes through `datasets.load_dataset` (local files and folders, hub ids when
online); `builtin:` sets are harvested by lmssl (data/builtin.py) and read as JSON lines.
"""

from __future__ import annotations

from typing import Optional

from lmssl.errors import LmsslError
from lmssl.recipe import DataConfig


def _load(cfg: DataConfig, split: str):
    import datasets

    kwargs = dict(cfg.options)
    if cfg.path.startswith("builtin:"):
        from lmssl.data.builtin import builtin_file

        return datasets.load_dataset("json", data_files={"train": str(builtin_file(cfg.path.split(":", 1)[1]))},
                                     split="train")
    files = cfg.files
    if isinstance(files, str) or isinstance(files, list):
        files = {"train": files}
    if cfg.encoding:
        kwargs["encoding"] = cfg.encoding
    try:
        return datasets.load_dataset(cfg.path, name=cfg.config, data_files=files, data_dir=cfg.data_dir,
                                     split=split, streaming=cfg.streaming, **kwargs)
    except (FileNotFoundError, ValueError) as err:
        raise LmsslError(f"could not load {cfg.path!r} split {split!r}: {err}") from None


def load_splits(cfg: DataConfig, seed: int, where: str):
    """(train, eval) datasets for a DataConfig; eval is held out of train when no eval_split is named."""
    data = _load(cfg, cfg.split)
    if cfg.column not in data.column_names:
        raise LmsslError(f"{where}.data.column: the data has no column {cfg.column!r}; "
                         f"columns: {', '.join(data.column_names)}")
    eval_data: Optional[object] = None
    if cfg.eval_split:
        eval_data = _load(cfg, cfg.eval_split)
    if cfg.max_samples is not None:
        data = data.select(range(min(cfg.max_samples, len(data))))
    if eval_data is None and cfg.eval_fraction > 0 and len(data) >= 20:
        parts = data.train_test_split(test_size=cfg.eval_fraction, seed=seed, shuffle=True)
        data, eval_data = parts["train"], parts["test"]
    if len(data) == 0:
        raise LmsslError(f"{where}.data: the training split is empty")
    return data, eval_data
