"""Image sources: builtin digits, class folders, zips read in place, split discovery, `datasets` sources, every
PIL mode to RGB, bad files skipped and counted, the decode cache, channel statistics and seeded subsets.
Expectations are computed here with PIL and numpy directly, not with lmssl's own helpers."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import shared_file
from lmssl.data import images
from lmssl.data.images import BadImage, channel_stats, decode_image, load_image_splits
from lmssl.errors import LmsslError
from lmssl.recipe import DataConfig

WHERE = "stages.pre"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def load(size: int = 16, seed: int = 0, **fields):
    return load_image_splits(DataConfig(**{"eval_fraction": 0.0, **fields}), size, seed, WHERE)


def png(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def pil_chw(data: bytes, size: int) -> np.ndarray:
    """The reference: PIL's own decode, RGB, a bilinear resize to size x size, as CHW."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image).transpose(2, 0, 1)


def solid(color, size=(6, 6)) -> bytes:
    return png(Image.new("RGB", size, color))


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def digest(pixels: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(pixels).tobytes()).hexdigest()


# --------------------------------------------------------------------------- builtin digits

def test_builtin_digits_are_sklearns_images_scaled_bilinearly_with_its_targets():
    from sklearn.datasets import load_digits

    reference = load_digits()
    splits = load(size=16, path="builtin:digits", split="train", eval_split="test")
    assert splits.label_names == [str(d) for d in range(10)]
    assert len(splits.train) + len(splits.eval) == 1797 and abs(len(splits.eval) - 1797 / 5) < 1
    train_rows = [i for i in range(1797) if i % 5 != 4]  # the documented split: every 5th image is test
    test_rows = [i for i in range(1797) if i % 5 == 4]
    np.testing.assert_array_equal(splits.train[:]["label"], reference.target[train_rows])
    np.testing.assert_array_equal(splits.eval[:]["label"], reference.target[test_rows])
    for position in (0, 700, len(train_rows) - 1):
        gray = np.round(reference.images[train_rows[position]] * 255 / 16).astype(np.uint8)
        expected = np.asarray(Image.fromarray(gray).resize((16, 16), Image.Resampling.BILINEAR))
        pixels = splits.train[position]["pixels"]
        assert pixels.dtype == np.uint8 and pixels.shape == (3, 16, 16)
        for channel in range(3):
            np.testing.assert_array_equal(pixels[channel], expected)
    assert splits.metrics == {"data/images": len(train_rows), "data/eval_images": len(test_rows),
                              "data/skipped_undecodable": 0.0}


def test_builtin_digits_unknown_split_names_the_key():
    with pytest.raises(LmsslError, match=r"stages\.pre\.data\.eval_split: .*no split 'validation'.*test, train"):
        load(path="builtin:digits", eval_split="validation")


def test_held_out_eval_fraction_is_disjoint_and_reproducible_for_a_seed():
    first = load_image_splits(DataConfig(path="builtin:digits", eval_fraction=0.1), 8, 3, WHERE)
    again = load_image_splits(DataConfig(path="builtin:digits", eval_fraction=0.1), 8, 3, WHERE)
    other = load_image_splits(DataConfig(path="builtin:digits", eval_fraction=0.1), 8, 4, WHERE)
    assert len(first.eval) == round(1438 * 0.1) and len(first.train) + len(first.eval) == 1438
    train = {digest(p) + str(l) for p, l in zip(first.train[:]["pixels"], first.train[:]["label"])}
    held = {digest(p) + str(l) for p, l in zip(first.eval[:]["pixels"], first.eval[:]["label"])}
    assert len(train | held) > 0.95 * 1438  # a few digits are pixel-identical; nearly all rows are distinct
    np.testing.assert_array_equal(first.eval[:]["pixels"], again.eval[:]["pixels"])
    assert not np.array_equal(first.eval[:]["label"], other.eval[:]["label"])


# --------------------------------------------------------------------------- CIFAR-10: folder, zip, discovery

def test_cifar_sample_folder_has_ten_sorted_classes_decoded_like_pil():
    root = shared_file("cifar10/sample")
    splits = load(size=24, path=str(root))
    assert splits.label_names == CIFAR_CLASSES
    assert len(splits.train) == 500 and splits.eval is None
    np.testing.assert_array_equal(np.bincount(splits.train[:]["label"]), [50] * 10)
    for row in (0, 137, 499):  # rows follow sorted classes, then sorted file names
        path = root / CIFAR_CLASSES[row // 50] / f"{row % 50:04d}.jpg"
        np.testing.assert_array_equal(splits.train[row]["pixels"], pil_chw(path.read_bytes(), 24))
        assert splits.train[row]["label"] == row // 50
    batch = splits.train[[0, 5, 9]]["pixels"]
    assert batch.shape == (3, 3, 24, 24) and batch.dtype == np.uint8


def test_cifar_test_zip_is_read_in_place_at_its_own_resolution(monkeypatch):
    path = shared_file("cifar10/cifar10_test_jpg.zip")

    def no_extracting(*args, **kwargs):
        raise AssertionError("images must be read from the zip, not extracted")

    monkeypatch.setattr(zipfile.ZipFile, "extract", no_extracting)
    monkeypatch.setattr(zipfile.ZipFile, "extractall", no_extracting)
    splits = load(size=32, path=str(path), split="test")
    assert len(splits.train) == 10_000 and splits.label_names == CIFAR_CLASSES
    np.testing.assert_array_equal(np.bincount(splits.train[:]["label"]), [1000] * 10)
    with zipfile.ZipFile(path) as archive:
        for row in (0, 4321, 9999):
            member = f"test/{CIFAR_CLASSES[row // 1000]}/{row % 1000:04d}.jpg"
            expected = np.asarray(Image.open(io.BytesIO(archive.read(member))).convert("RGB")).transpose(2, 0, 1)
            np.testing.assert_array_equal(splits.train[row]["pixels"], expected)
    # its top-level folder `test/` holds class folders, not images: it is a split, not a class
    with pytest.raises(LmsslError, match=r"stages\.pre\.data\.split: no split 'train'.*splits found: test"):
        load(path=str(path))


def test_one_cifar_folder_serves_train_from_one_zip_and_test_from_the_other():
    root = shared_file("cifar10")
    splits = load(size=32, path=str(root), split="train", eval_split="test", max_samples=500)
    assert len(splits.train) == 500 and len(splits.eval) == 10_000
    np.testing.assert_array_equal(np.bincount(splits.train[:]["label"]), [50] * 10)  # equal classes: 50 each
    with zipfile.ZipFile(root / "cifar10_train20k_jpg.zip") as archive:
        train_zip = {digest(pil_chw(archive.read(n), 32)): CIFAR_CLASSES.index(n.split("/")[1])
                     for n in archive.namelist() if n.endswith(".jpg")}
    drawn = zip(splits.train[:]["pixels"], splits.train[:]["label"])
    assert all(train_zip.get(digest(p)) == label for p, label in drawn)
    with zipfile.ZipFile(root / "cifar10_test_jpg.zip") as archive:
        expected = pil_chw(archive.read("test/truck/0999.jpg"), 32)
    np.testing.assert_array_equal(splits.eval[9999]["pixels"], expected)
    with pytest.raises(LmsslError, match=r"data\.eval_split: no split 'validation'.*: sample, test, train"):
        load(path=str(root), eval_split="validation")


def test_split_folders_and_a_zip_of_them_give_the_same_images(tmp_path):
    files = {f"{split}/{cls}/{i}.png": solid((40 * i, 80 if cls == "cat" else 200, 10 if split == "test" else 250))
             for split in ("train", "test") for cls in ("cat", "dog") for i in range(3)}
    files["train/README.txt"] = b"not an image"
    files["__MACOSX/train/cat/._0.png"] = b"resource fork"
    files["train/.thumbnails/0.png"] = solid((1, 2, 3))  # a hidden folder is no class, even holding images
    tree = write_tree(tmp_path / "tree", files)
    archive = tmp_path / "tree.zip"
    with zipfile.ZipFile(archive, "w") as out:
        for name, data in sorted(files.items()):
            out.writestr(name, data)
    for path in (tree, archive):
        splits = load(size=6, path=str(path), split="train", eval_split="test")
        assert splits.label_names == ["cat", "dog"] and len(splits.train) == 6 and len(splits.eval) == 6
        assert splits.metrics["data/skipped_undecodable"] == 0
        np.testing.assert_array_equal(splits.train[:]["label"], [0, 0, 0, 1, 1, 1])
        np.testing.assert_array_equal(splits.eval[4]["pixels"], pil_chw(files["test/dog/1.png"], 6))
        with pytest.raises(LmsslError, match=r"stages\.pre\.data\.eval_split: .*'val'.*splits found: test, train"):
            load(path=str(path), eval_split="val")


def test_a_zip_with_class_folders_at_the_top_is_the_training_split_and_loose_images_are_unlabeled(tmp_path):
    archive = tmp_path / "classes.zip"
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("zebra/0.png", solid((0, 0, 0)))
        out.writestr("ant/0.png", solid((9, 9, 9)))
        out.writestr("ant/1.png", solid((8, 8, 8)))
    splits = load(size=6, path=str(archive))
    assert splits.label_names == ["ant", "zebra"]
    np.testing.assert_array_equal(splits.train[:]["label"], [0, 0, 1])
    loose = write_tree(tmp_path / "loose", {"a.png": solid((1, 1, 1)), "b.jpg": solid((2, 2, 2)), "c.txt": b""})
    unlabeled = load(size=6, path=str(loose))
    assert unlabeled.label_names is None and len(unlabeled.train) == 2
    np.testing.assert_array_equal(unlabeled.train[:]["label"], [-1, -1])


def test_label_column_none_reads_class_folders_as_unlabeled(tmp_path):
    root = write_tree(tmp_path, {"a/1.png": solid((1, 2, 3)), "b/1.png": solid((4, 5, 6))})
    splits = load(path=str(root), label_column=None)
    assert splits.label_names is None
    np.testing.assert_array_equal(splits.train[:]["label"], [-1, -1])


# --------------------------------------------------------------------------- `datasets` sources

def test_imagefolder_through_datasets_matches_the_folder_reader():
    root = shared_file("cifar10/sample")
    through_datasets = load(size=32, path="imagefolder", data_dir=str(root))
    direct = load(size=32, path=str(root))
    assert through_datasets.label_names == CIFAR_CLASSES and len(through_datasets.train) == 500

    def pairs(data):
        return sorted(digest(p) + str(l) for p, l in zip(data[:]["pixels"], data[:]["label"]))

    assert pairs(through_datasets.train) == pairs(direct.train)


def test_parquet_image_column_with_string_labels_and_a_bad_row(tmp_path):
    import datasets

    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9)]
    table = datasets.Dataset.from_dict({
        "id": [0, 1, 2, 3, 4],
        "picture": [{"bytes": solid(c), "path": None} for c in colors] + [{"bytes": b"not an image", "path": None}],
        "kind": ["warm", "cold", "cold", "gray", "warm"],
    }).cast_column("picture", datasets.Image())
    table.to_parquet(str(tmp_path / "images.parquet"))
    splits = load(size=6, path="parquet", files=str(tmp_path / "images.parquet"), label_column="kind")
    assert splits.label_names == ["cold", "gray", "warm"]
    np.testing.assert_array_equal(splits.train[:]["label"], [2, 0, 0, 1])
    np.testing.assert_array_equal(splits.train[1]["pixels"], pil_chw(solid(colors[1]), 6))
    assert splits.metrics["data/skipped_undecodable"] == 1 and splits.metrics["data/images"] == 4
    unlabeled = load(size=6, path="parquet", files=str(tmp_path / "images.parquet"))  # default "label": absent
    assert unlabeled.label_names is None and set(unlabeled.train[:]["label"].tolist()) == {-1}
    with pytest.raises(LmsslError, match=r"stages\.pre\.data\.label_column: .*'class'.*columns: id .*picture.*kind"):
        load(path="parquet", files=str(tmp_path / "images.parquet"), label_column="class")
    with pytest.raises(LmsslError, match=r"stages\.pre\.data\.image_column: .*'photo'"):
        load(path="parquet", files=str(tmp_path / "images.parquet"), image_column="photo")
    with pytest.raises(LmsslError, match=r"stages\.pre\.data\.eval_split: could not load 'parquet' split 'test'"):
        load(path="parquet", files=str(tmp_path / "images.parquet"), eval_split="test")


def test_integer_labels_are_named_by_their_ids(tmp_path):
    import datasets

    datasets.Dataset.from_dict({
        "image": [{"bytes": solid((i, i, i)), "path": None} for i in range(3)], "label": [2, 0, 2],
    }).cast_column("image", datasets.Image()).to_parquet(str(tmp_path / "ints.parquet"))
    splits = load(size=6, path="parquet", files=str(tmp_path / "ints.parquet"))
    assert splits.label_names == ["0", "1", "2"]
    np.testing.assert_array_equal(splits.train[:]["label"], [2, 0, 2])


# --------------------------------------------------------------------------- decoding every mode

def test_grayscale_bilevel_and_cmyk_become_rgb():
    gray = np.array([[0, 50], [200, 255]], dtype=np.uint8)
    assert (decode_image(png(Image.fromarray(gray)), 2) == gray).all()  # every channel equals the gray value
    bits = Image.fromarray(np.array([[0, 255], [255, 0]], dtype=np.uint8)).convert("1")
    np.testing.assert_array_equal(decode_image(png(bits), 2)[1], [[0, 255], [255, 0]])
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # no black, full magenta and yellow: red
    np.testing.assert_array_equal(decode_image(png(cmyk, "TIFF"), 2)[:, 0, 0], [255, 0, 0])


def test_palette_with_transparency_and_alpha_are_composited_onto_white():
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putdata([0, 1])
    np.testing.assert_array_equal(decode_image(png(palette, transparency=0), 2)[:, 0, :2].T,
                                  [[255, 255, 255], [0, 255, 0]])  # index 0 is transparent: white
    np.testing.assert_array_equal(decode_image(png(palette), 2)[:, 0, 0], [255, 0, 0])  # opaque palette
    rgba = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 255, 255))
    rgba.putpixel((0, 1), (0, 0, 0, 128))
    out = decode_image(png(rgba), 2)
    np.testing.assert_array_equal(out[:, 0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[:, 0, 1], [0, 0, 255])
    assert np.abs(out[:, 1, 0].astype(int) - round(255 * 127 / 255)).max() <= 1  # half black over white
    la = Image.fromarray(np.array([[[10, 0], [10, 255]]], dtype=np.uint8), "LA")
    np.testing.assert_array_equal(decode_image(png(la), 2)[0, 0, :2], [255, 10])


def test_sixteen_bit_images_are_scaled_not_clipped():
    values = np.array([[0, 256, 1000], [32768, 40000, 65535], [300, 512, 65000]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    expected = [[0, 1, 4], [128, 156, 255], [1, 2, 253]]  # round(v * 255 / 65535), worked out by hand
    for data in (png(image), png(image, "TIFF")):
        out = decode_image(data, 3)
        np.testing.assert_array_equal(out[0], expected)
        np.testing.assert_array_equal(out[2], expected)
    wide = Image.fromarray(values.astype(np.int32))  # mode "I": the same 16-bit range
    assert wide.mode == "I"
    np.testing.assert_array_equal(decode_image(png(wide, "TIFF"), 3)[1], expected)


def test_float_images_in_zero_to_one_are_scaled_to_bytes():
    image = Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32))
    assert image.mode == "F"
    np.testing.assert_array_equal(decode_image(png(image, "TIFF"), 2)[0], [[0, 128], [255, 64]])


def test_exif_orientation_is_applied_before_resizing():
    stored = np.arange(4 * 2 * 3, dtype=np.uint8).reshape(2, 4, 3) * 10  # 4 wide, 2 tall
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    upright = Image.fromarray(np.ascontiguousarray(np.rot90(stored, k=-1)))  # 2 wide, 4 tall
    expected = np.asarray(upright.resize((4, 4), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    np.testing.assert_array_equal(decode_image(png(Image.fromarray(stored), exif=exif), 4), expected)


def test_images_of_mixed_sizes_are_resized_bilinearly(tmp_path):
    rng = np.random.default_rng(0)
    files = {f"x/{i}.png": png(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
             for i, (h, w) in enumerate([(10, 20), (64, 64), (7, 7), (16, 16)])}
    splits = load(size=16, path=str(write_tree(tmp_path, files)))
    assert splits.train[:]["pixels"].shape == (4, 3, 16, 16)
    for i in range(4):
        np.testing.assert_array_equal(splits.train[i]["pixels"], pil_chw(files[f"x/{i}.png"], 16))


def test_decode_failures_raise_bad_image(monkeypatch):
    jpeg = png(Image.new("RGB", (40, 40), (1, 2, 3)), "JPEG")
    for data in (b"", b"plain text, not an image", jpeg[: len(jpeg) // 2], zipfile.__doc__.encode()):
        with pytest.raises(BadImage):
            decode_image(data, 8)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 64x64 image is now a decompression bomb (> 2x)
    with pytest.raises(BadImage, match="DecompressionBomb"):
        decode_image(png(Image.new("RGB", (64, 64))), 8)


# --------------------------------------------------------------------------- bad data and user mistakes

def test_undecodable_files_are_skipped_and_counted_and_other_files_ignored(tmp_path):
    jpeg = png(Image.new("RGB", (40, 40), (1, 2, 3)), "JPEG")
    root = write_tree(tmp_path, {
        "a/good1.png": solid((1, 1, 1)), "a/good2.jpg": jpeg, "b/good3.png": solid((3, 3, 3)),
        "a/truncated.jpg": jpeg[: len(jpeg) // 2], "b/text.jpg": b"hello", "b/empty.png": b"",
        "README.txt": b"about", "a/.DS_Store": b"\0\0", "SHA256SUMS": b"abc  a/good1.png",
    })
    splits = load(size=8, path=str(root))
    assert splits.metrics["data/skipped_undecodable"] == 3 and splits.metrics["data/images"] == 3
    np.testing.assert_array_equal(splits.train[:]["label"], [0, 0, 1])


def test_folders_without_usable_images_are_errors_naming_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmsslError, match=r"stages\.pre\.data\.path: no images .*empty"):
        load(path=str(tmp_path / "empty"))
    write_tree(tmp_path / "docs", {"README.txt": b"x", "notes/a.md": b"y"})
    with pytest.raises(LmsslError, match=r"stages\.pre\.data\.path: no images .*README\.txt"):
        load(path=str(tmp_path / "docs"))
    write_tree(tmp_path / "bad", {"a/1.jpg": b"text", "b/2.png": b""})
    with pytest.raises(LmsslError, match=r"stages\.pre\.data\.path: no decodable image.*2 undecodable"):
        load(path=str(tmp_path / "bad"))


def test_a_file_that_is_not_a_zip_and_a_broken_zip_are_errors_naming_the_path(tmp_path):
    (tmp_path / "images.tar").write_bytes(b"not a zip")
    with pytest.raises(LmsslError, match=r"stages\.pre\.data\.path: .*not a zip"):
        load(path=str(tmp_path / "images.tar"))
    write_tree(tmp_path / "folder", {"train.zip": b"PK\x05\x06" + b"\0" * 10, "a/1.png": solid((1, 1, 1))})
    with pytest.raises(LmsslError, match=r"stages\.pre\.data\.path: .*train\.zip is not a readable zip"):
        load(path=str(tmp_path / "folder"))


# --------------------------------------------------------------------------- cache, statistics, subsets

def test_second_call_decodes_nothing_and_a_changed_file_invalidates_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSSL_CACHE", str(tmp_path / "cache"))
    root = write_tree(tmp_path / "data", {f"c{i % 2}/{i}.png": solid((i, 2 * i, 3 * i)) for i in range(6)})
    first = load(size=8, path=str(root))

    def must_not_decode(data, size):
        raise AssertionError("decoded again")

    monkeypatch.setattr(images, "decode_image", must_not_decode)
    again = load(size=8, path=str(root))
    np.testing.assert_array_equal(again.train[:]["pixels"], first.train[:]["pixels"])
    assert again.metrics == first.metrics
    assert [p.name for p in (tmp_path / "cache" / "images").iterdir() if p.name.startswith(".")] == []
    with pytest.raises(AssertionError, match="decoded again"):  # another size is another cache entry
        load(size=4, path=str(root))
    changed = root / "c1" / "3.png"
    changed.write_bytes(solid((200, 100, 50), size=(7, 7)))
    os.utime(changed, ns=(10**18, 10**18))
    with pytest.raises(AssertionError, match="decoded again"):
        load(size=8, path=str(root))


def test_channel_stats_equal_a_numpy_computation():
    splits = load(size=32, path=str(shared_file("cifar10/sample")))
    mean, std = channel_stats(splits.train)
    pixels = splits.train[:]["pixels"].astype(np.float64) / 255
    np.testing.assert_allclose(mean, pixels.mean(axis=(0, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(std, pixels.std(axis=(0, 2, 3)), rtol=1e-8)
    assert all(type(v) is float for v in mean + std)
    few_mean, _ = channel_stats(splits.train, max_images=50)
    assert np.abs(np.array(few_mean) - mean).max() < 0.05 and few_mean != mean


def test_max_samples_keeps_every_class_and_is_reproducible_for_a_seed():
    root = str(shared_file("cifar10/sample"))
    first, again, other = (load(size=8, seed=s, path=root, max_samples=30) for s in (1, 1, 2))
    np.testing.assert_array_equal(np.bincount(first.train[:]["label"], minlength=10), [3] * 10)
    np.testing.assert_array_equal(first.train[:]["pixels"], again.train[:]["pixels"])
    assert not np.array_equal(first.train[:]["pixels"], other.train[:]["pixels"])
    few = load(size=8, seed=5, path=root, max_samples=10)
    assert sorted(few.train[:]["label"].tolist()) == list(range(10))


def test_importing_the_module_loads_no_heavy_library():
    code = ("import sys, lmssl.data.images\n"
            "print([m for m in ('torch', 'datasets', 'PIL', 'numpy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "[]"
