"""Image sources into `datasets`: builtin:digits, a folder of class folders, a zip of one (read in place), and
any `datasets` source with an Image column. Each image is decoded once to RGB uint8 (3, size, size) and the
result cached on disk. Augmentations live in views.py, not here.

A local path serves every split. For split S: the folder path/S, the members path.zip:S/, or the members S/
of a zip inside the folder; failing those, the class folders at the top of the path are the training split.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from lmssl.errors import LmsslError
from lmssl.recipe import LOADER_BUILDERS, DataConfig

if TYPE_CHECKING:  # imported where used, so that importing this module (and lmssl.recipe) stays fast
    import datasets
    import numpy as np

FORMAT = 1  # bump when decoding or the cached layout changes, so cached images are rebuilt
IMAGE_EXTENSIONS = frozenset("jpg jpeg png bmp gif webp tif tiff ppm pgm pbm".split())
PIXELS_PER_BATCH = 50_000_000  # decode ~50 MB of pixels per map batch: 1,000 CIFAR images, 330 at 224 px
MIN_STD = 1 / 255  # the smallest per-channel std channel_stats reports
IGNORED = "__MACOSX"  # macOS zip metadata; hidden (dot) files and folders are ignored too


class BadImage(Exception):
    """The bytes are not an image PIL can fully decode (truncated, not an image, a decompression bomb, ...)."""


@dataclass
class ImageSplits:
    """Decoded images. Datasets are formatted `with_format("numpy", dtype=None)`: pixels stay uint8 (plain
    "numpy" would widen them to int64)."""

    train: datasets.Dataset
    """pixels (uint8, (3, size, size)) and label (int64, -1 when unlabeled)."""
    eval: Optional[datasets.Dataset]
    """The same columns for evaluation (eval_split, or eval_fraction held out of train), or None."""
    label_names: Optional[list[str]]
    """Class names in label-id order; None when the data is unlabeled."""
    metrics: dict[str, float]
    """data/images and data/eval_images (kept), data/skipped_undecodable (in both splits)."""


@dataclass
class _Source:
    """One split before decoding: its items, their labels, how to read them and what identifies them."""

    items: list  # file paths, zip members, row numbers or array indices
    labels: np.ndarray  # int64, one per item; -1 for unlabeled
    read: Callable[[list], list]  # raw images of some items, in order: bytes, a path, an Image dict, a uint8 array
    identity: Any  # JSON-able; changes whenever the contents do (names, sizes, mtimes; a dataset fingerprint)
    origin: str  # where the images are, for messages


# --------------------------------------------------------------------------- decoding

def decode_image(data: bytes, size: int) -> np.ndarray:
    """(3, size, size) uint8 RGB from encoded image bytes, resized bilinearly; raises BadImage."""
    import numpy as np
    from PIL import Image, ImageOps

    try:
        image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
        image.load()  # the whole image, so a truncated file fails here and not later
        return np.ascontiguousarray(_chw(_rgb(image), size))
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error, DecompressionBombError...
        raise BadImage(f"{type(err).__name__}: {err}") from err


def _rgb(image):
    """Any PIL mode as 8-bit RGB: alpha composited onto white, 16-bit and float scaled (PIL would clip them)."""
    import numpy as np
    from PIL import Image

    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        if image.mode != "F":
            values = values * (255 / 65535)  # 16-bit range onto 8 bits
        elif values.max(initial=0.0) <= 1.0:
            values = values * 255  # float images in 0..1; others are read as 0..255
        return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _chw(image, size: int):
    """An RGB PIL image resized straight to size x size (bilinear, as ViTImageProcessorPil), as a CHW view."""
    import numpy as np
    from PIL import Image

    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image).transpose(2, 0, 1)


def _pixels(raw, size: int):
    """Decode one raw item of any source; BadImage when it cannot be read or decoded."""
    import numpy as np
    from PIL import Image

    if isinstance(raw, np.ndarray):  # builtin arrays: gray uint8, never malformed
        return _chw(Image.fromarray(raw).convert("RGB"), size)
    if isinstance(raw, dict):  # a datasets Image(decode=False) value
        raw = raw.get("bytes") or raw.get("path")
    if isinstance(raw, str):
        try:
            raw = Path(raw).read_bytes()
        except OSError as err:
            raise BadImage(f"{type(err).__name__}: {err}") from err
    return decode_image(raw, size)


# --------------------------------------------------------------------------- sources

def _layout(names: list[str], prefix: str) -> dict[Optional[str], list[str]]:
    """Image names under prefix by class folder; loose images under None when there is no class folder. A class
    folder holds images directly (so a zip's top-level `test/` with class folders inside is not a class)."""
    classes: dict[Optional[str], list[str]] = {}
    direct, loose = set(), []
    for name in names:
        if not name.startswith(prefix):
            continue
        parts = name[len(prefix):].split("/")
        extension = parts[-1].rsplit(".", 1)[-1].lower()
        if any(p.startswith(".") or p == IGNORED for p in parts) or extension not in IMAGE_EXTENSIONS:
            continue
        if len(parts) == 1:
            loose.append(name)
        else:
            classes.setdefault(parts[0], []).append(name)
            if len(parts) == 2:
                direct.add(parts[0])
    classes = {c: sorted(classes[c]) for c in sorted(direct)}  # rows in the same order from a folder or any zip
    return classes or ({None: sorted(loose)} if loose else {})


@dataclass
class _Tree:
    """A local folder or zip: its file names (relative, posix), a reader and an identity for some of them."""

    names: list[str]
    read: Callable[[list[str]], list]
    identity: Callable[[list[str]], Any]
    where: str


def _folder(root: Path) -> _Tree:
    names = []
    for top, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != IGNORED)
        rel = Path(top).relative_to(root).as_posix()
        names += [f if rel == "." else f"{rel}/{f}" for f in sorted(files)]

    def identity(members: list[str]) -> list:
        stats = [(root / m).stat() for m in members]
        return [str(root.resolve()), [(m, s.st_size, s.st_mtime_ns) for m, s in zip(members, stats)]]

    return _Tree(names, lambda members: [str(root / m) for m in members], identity, str(root))


def _zip(path: Path) -> _Tree:
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as err:
        raise zipfile.BadZipFile(f"{path} is not a readable zip ({type(err).__name__}: {err})") from None

    def read(members: list[str]) -> list:
        out = []
        for member in members:
            try:
                out.append(archive.read(member))
            except Exception:  # a corrupt member (bad CRC, bad compression): decoded as empty, so skipped and counted
                out.append(b"")
        return out

    stat = path.stat()
    return _Tree(archive.namelist(), read, lambda _: [str(path.resolve()), stat.st_size, stat.st_mtime_ns], str(path))


def _tree(path: Path) -> _Tree:
    return _folder(path) if path.is_dir() else _zip(path)


def _find(root: Path, split: str, training: bool) -> Optional[tuple[_Tree, dict]]:
    """The tree and class layout of one split of a local folder or zip (the order in the module doc), or None."""
    def candidates():
        if root.is_dir() and (root / split).is_dir():
            yield _folder(root / split), ""
        zips = sorted(p for p in root.glob("*.zip") if not p.name.startswith(".")) if root.is_dir() else [root]
        for archive in zips:
            yield _zip(archive), f"{split}/"
        if training:
            yield _tree(root), ""

    for tree, prefix in candidates():
        layout = _layout(tree.names, prefix)
        if layout:
            return tree, layout
    return None


def _labeled(layout: dict) -> bool:
    return bool(layout) and None not in layout


def _splits_found(root: Path) -> list[str]:
    """Names of the splits that hold class folders in a local folder or zip (for error messages)."""
    found = []
    if root.is_dir():
        found = [d.name for d in root.iterdir() if d.is_dir() and _labeled(_layout(_folder(d).names, ""))]
    for archive in sorted(root.glob("*.zip")) if root.is_dir() else [root]:
        names = _zip(archive).names
        tops = {n.split("/", 1)[0] for n in names if "/" in n}
        found += [top for top in tops if _labeled(_layout(names, f"{top}/"))]
    return sorted(set(found))


def _local_sources(cfg: DataConfig, where: str):
    root = Path(cfg.path).expanduser()
    if root.is_file() and not zipfile.is_zipfile(root):
        raise LmsslError(f"{where}.data.path: {cfg.path} is a file but not a zip; give a folder of class folders, "
                         f"a zip of one, or a builder such as imagefolder or parquet")
    found = {}
    for field, split in (("split", cfg.split), ("eval_split", cfg.eval_split)):
        if split is None:
            continue
        found[field] = _find(root, split, training=field == "split")
        if found[field] is None:
            others = _splits_found(root)
            if field == "split" and not others:
                raise LmsslError(f"{where}.data.path: no images in {cfg.path}: {_describe(root)}")
            listed = ", ".join(others) or "none"
            top = " (the class folders at the top of the path are the training split)" if _labeled(
                _layout(_tree(root).names, "")) else ""
            raise LmsslError(f"{where}.data.{field}: no split {split!r} in {cfg.path}; splits found: {listed}{top}")
    labeled = cfg.label_column is not None and all(_labeled(layout) for _, layout in found.values())
    names = sorted({c for _, layout in found.values() for c in layout}) if labeled else None

    def source(tree: _Tree, layout: dict) -> _Source:
        import numpy as np

        index = {c: i for i, c in enumerate(names or [])}
        items = [m for members in layout.values() for m in members]
        ids = [index.get(c, -1) for c, members in layout.items() for _ in members]
        return _Source(items, np.asarray(ids, dtype=np.int64), tree.read, tree.identity(items), tree.where)

    return names, source(*found["split"]), source(*found["eval_split"]) if "eval_split" in found else None


def _describe(root: Path) -> str:
    names = _tree(root).names
    if not names:
        return "it is empty"
    return (f"{len(names)} files (e.g. {', '.join(names[:3])}), none an image "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}) in class folders or at the top")


def _builtin_sources(cfg: DataConfig, where: str):
    import numpy as np

    from lmssl.data.builtin import BUILTIN_IMAGES

    name = cfg.path.split(":", 1)[1]
    if name not in BUILTIN_IMAGES:
        raise LmsslError(f"{where}.data.path: {cfg.path} is text, not images; image sets: "
                         + ", ".join(f"builtin:{n}" for n in sorted(BUILTIN_IMAGES)))
    data = BUILTIN_IMAGES[name]()

    def source(split: str, field: str) -> _Source:
        rows = np.flatnonzero(data["split"] == split)
        if not len(rows):
            raise LmsslError(f"{where}.data.{field}: {cfg.path} has no split {split!r}; "
                             f"splits: {', '.join(sorted(set(data['split'])))}")
        labels = data["labels"][rows] if cfg.label_column else np.full(len(rows), -1, dtype=np.int64)
        return _Source(rows.tolist(), labels, lambda items: [data["images"][i] for i in items], [cfg.path, split],
                       cfg.path)

    eval_source = source(cfg.eval_split, "eval_split") if cfg.eval_split else None
    return (data["label_names"] if cfg.label_column else None), source(cfg.split, "split"), eval_source


def _load_dataset(cfg: DataConfig, split: str, key: str):
    import datasets

    files = {"train": cfg.files} if isinstance(cfg.files, (str, list)) else cfg.files
    try:
        return datasets.load_dataset(cfg.path, name=cfg.config, data_files=files, data_dir=cfg.data_dir,
                                     split=split, **({"revision": cfg.revision} if cfg.revision else {}),
                                     **cfg.options)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetGenerationError) as err:
        cause = err.__cause__ or err
        raise LmsslError(f"{key}: could not load {cfg.path!r} split {split!r} from {cfg.files or cfg.data_dir or cfg.path}: "
                         f"{type(cause).__name__}: {' '.join(str(cause).split())[:300]}") from None


def _label_ids(splits: list, column: str, where: str):
    """(class names, one int64 id array per split): ClassLabel names, "0".."K-1" for ints, sorted strings."""
    import datasets
    import numpy as np

    feature = splits[0].features[column]
    values = [np.asarray(s.with_format("numpy")[column]) for s in splits]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names), [v.astype(np.int64) for v in values]
    if all(np.issubdtype(v.dtype, np.integer) for v in values):
        count = max((int(v.max()) + 1 for v in values if v.size), default=0)
        return [str(i) for i in range(count)], [np.maximum(v.astype(np.int64), -1) for v in values]
    if all(v.dtype.kind in "OUS" for v in values):
        names = sorted({str(x) for v in values for x in v if x is not None})
        index = {n: i for i, n in enumerate(names)}
        return names, [np.asarray([-1 if x is None else index[str(x)] for x in v], dtype=np.int64) for v in values]
    raise LmsslError(f"{where}.data.label_column: column {column!r} holds {feature}, neither class ids nor names")


def _dataset_sources(cfg: DataConfig, where: str):
    import datasets
    import numpy as np

    splits = [_load_dataset(cfg, cfg.split, f"{where}.data.split")]
    if cfg.eval_split:
        splits.append(_load_dataset(cfg, cfg.eval_split, f"{where}.data.eval_split"))
    columns = splits[0].column_names
    kinds = ", ".join(f"{n} ({type(f).__name__})" for n, f in splits[0].features.items())
    image = cfg.image_column or next((n for n, f in splits[0].features.items() if isinstance(f, datasets.Image)),
                                     None)
    if image not in columns:
        detail = f"no column {image!r}" if image else "no column of type Image (name the one with image bytes or paths)"
        raise LmsslError(f"{where}.data.image_column: the data has {detail}; columns: {kinds}")
    label = cfg.label_column if cfg.label_column in columns else None
    if cfg.label_column and label is None and cfg.label_column != "label":
        raise LmsslError(f"{where}.data.label_column: the data has no column {cfg.label_column!r}; columns: {kinds}")
    names, ids = (None, [np.full(len(s), -1, np.int64) for s in splits]) if label is None else _label_ids(
        splits, label, where)

    def source(data, labels) -> _Source:
        identity = [data._fingerprint, image, label]
        if isinstance(data.features[image], datasets.Image):
            data = data.cast_column(image, datasets.Image(decode=False))  # we decode, so bad files are counted
        data = data.select_columns([image])
        return _Source(list(range(len(data))), labels, lambda rows: data[rows][image], identity, cfg.path)

    sources = [source(s, i) for s, i in zip(splits, ids)]
    return names, sources[0], sources[1] if len(sources) > 1 else None


# --------------------------------------------------------------------------- sampling, decoding once, caching

def _draw(labels, count: int, seed: int):
    """`count` rows drawn with the seed, interleaving classes in proportion (each class gets its first row first)."""
    import numpy as np

    order = np.random.default_rng([seed % 2**32, 0]).permutation(len(labels))
    _, group, sizes = np.unique(labels[order], return_inverse=True, return_counts=True)
    within = np.empty(len(order))
    within[np.argsort(group, kind="stable")] = np.arange(len(order)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    return np.sort(order[np.argsort(within / sizes[group], kind="stable")[:count]])


def _decoded(src: _Source, size: int, split: str, max_samples: Optional[int], seed: int, names, where: str):
    """(dataset, skipped) for one split: loaded from the cache, or decoded once and saved atomically there."""
    import datasets
    import numpy as np

    from lmssl.data.builtin import cache_dir

    rows = np.arange(len(src.items))
    sample = None
    if max_samples is not None and max_samples < len(rows):
        rows, sample = _draw(src.labels, max_samples, seed), [max_samples, seed]
    identity = json.dumps([FORMAT, src.identity, size, split, sample, names], default=str)
    key = hashlib.sha256(identity.encode()).hexdigest()[:24]
    target = cache_dir().parent / "images" / key
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
        batch = max(1, min(1000, PIXELS_PER_BATCH // (3 * size * size)))

        def decode(batch_rows):
            pixels, labels = [], []
            for row, raw in zip(batch_rows["row"], src.read([src.items[r] for r in batch_rows["row"]])):
                try:
                    pixels.append(_pixels(raw, size))
                except BadImage:
                    continue
                labels.append(src.labels[row])
            return {"pixels": np.stack(pixels) if pixels else np.zeros((0, 3, size, size), np.uint8),
                    "label": np.asarray(labels, dtype=np.int64)}

        try:
            features = datasets.Features({"pixels": datasets.Array3D(shape=(3, size, size), dtype="uint8"),
                                          "label": datasets.Value("int64")})
            data = datasets.Dataset.from_dict({"row": rows}).map(
                decode, batched=True, batch_size=batch, writer_batch_size=batch, remove_columns=["row"],
                features=features, cache_file_name=str(scratch / "decoded.arrow"), new_fingerprint=key,
                desc=f"decoding {split} images at {size}px")
            if len(data) == 0:
                raise LmsslError(f"{where}.data.path: no decodable image in split {split!r} of {src.origin} "
                                 f"({len(rows)} undecodable files: truncated, empty or not images)")
            data.save_to_disk(str(scratch / "saved"))
            (scratch / "saved" / "lmssl.json").write_text(json.dumps({"skipped": len(rows) - len(data)}))
            try:
                os.rename(scratch / "saved", target)
            except OSError:
                if not target.exists():  # else another process saved the same images first: keep theirs
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    skipped = json.loads((target / "lmssl.json").read_text())["skipped"]
    return datasets.load_from_disk(str(target)).with_format("numpy", dtype=None), skipped


def load_image_splits(cfg: DataConfig, size: int, seed: int, where: str) -> ImageSplits:
    """Train and eval images of a DataConfig, decoded once to (3, size, size) uint8 and cached (module doc)."""
    import numpy as np

    if cfg.streaming:
        raise LmsslError(f"{where}.data.streaming: images are decoded once into an on-disk cache and read from "
                         f"there; set streaming: false")
    if cfg.path.startswith("builtin:"):
        sources = _builtin_sources(cfg, where)
    elif cfg.path not in LOADER_BUILDERS and Path(cfg.path).expanduser().exists():
        try:
            sources = _local_sources(cfg, where)
        except zipfile.BadZipFile as err:
            raise LmsslError(f"{where}.data.path: {err}") from None
    else:
        sources = _dataset_sources(cfg, where)
    names, train_source, eval_source = sources
    train, skipped = _decoded(train_source, size, cfg.split, cfg.max_samples, seed, names, where)
    evaluation = None
    if eval_source is not None:
        evaluation, eval_skipped = _decoded(eval_source, size, cfg.eval_split, None, seed, names, where)
        skipped += eval_skipped
    elif cfg.eval_fraction > 0 and len(train) >= 20:
        order = np.random.default_rng([seed % 2**32, 1]).permutation(len(train))
        held = min(len(train) - 1, max(1, round(len(train) * cfg.eval_fraction)))
        evaluation = train.select(np.sort(order[:held]), keep_in_memory=True)
        train = train.select(np.sort(order[held:]), keep_in_memory=True)
    metrics = {"data/images": float(len(train)), "data/skipped_undecodable": float(skipped)}
    if evaluation is not None:
        metrics["data/eval_images"] = float(len(evaluation))
    return ImageSplits(train, evaluation, names, metrics)


def channel_stats(dataset, max_images: int = 10_000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of pixels/255 over up to max_images images evenly spaced through the dataset."""
    import numpy as np

    data = dataset.select_columns(["pixels"]).with_format("numpy", dtype=None)
    rows = np.unique(np.linspace(0, len(data) - 1, min(len(data), max_images)).round().astype(np.int64))
    total, squares, count = np.zeros(3), np.zeros(3), 0
    for start in range(0, len(rows), 1000):
        pixels = data[rows[start:start + 1000].tolist()]["pixels"].astype(np.float64) / 255  # (n, 3, H, W)
        total += pixels.sum(axis=(0, 2, 3))
        squares += np.square(pixels).sum(axis=(0, 2, 3))
        count += pixels.shape[0] * pixels.shape[2] * pixels.shape[3]
    mean = total / count
    # a channel that never varies (all-black blue, say) would divide by zero: one gray level at least
    return mean.tolist(), np.maximum(np.sqrt(np.maximum(squares / count - mean ** 2, 0.0)), MIN_STD).tolist()


def labeled(dataset):
    """(the rows with a label, how many had none): unlabeled rows (-1) cannot vote in kNN or train a probe."""
    import numpy as np

    labels = np.asarray(dataset.with_format("numpy", dtype=None)[:]["label"])
    keep = np.nonzero(labels >= 0)[0]
    if len(keep) == len(labels):
        return dataset, 0
    return dataset.select(keep.tolist()), int(len(labels) - len(keep))
