"""Bad rows in a corpus are skipped and counted in the stage's metrics and summary, never a
crash mid-run; a corpus with nothing usable is a clear error (exit 2) before training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


from lmssl import load_recipe
from lmssl.runner import run_recipe

REPO = Path(__file__).resolve().parent.parent


def _recipe(tmp_path: Path, files: str, path: str = "text", column: str = "text") -> Path:
    text = f"""\
name: bad
stages:
  - {{name: tok, kind: tokenizer, vocab_size: 500, data: {{path: "builtin:pydocs", max_samples: 300}}}}
  - name: pre
    kind: pretrain
    tokenizer_from: tok
    model: {{family: bert, size: tiny}}
    data: {{path: {path}, files: "{files}", column: {column}, eval_fraction: 0}}
    max_length: 32
    batch_size: 4
    max_steps: 3
"""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    return recipe


def test_bad_rows_are_skipped_and_counted(tmp_path):
    good = "The quick brown fox jumps over the lazy dog and keeps running.\n"
    corpus = tmp_path / "corpus.txt"
    with open(corpus, "wb") as out:
        out.write(good.encode() * 30)
        out.write(b"\n\n   \n")                                   # empty documents
        out.write(b"broken \xff\xfe bytes in the middle\n")       # invalid UTF-8
        out.write(b"x" * (10 * 1024 * 1024) + b"\n")              # a 10 MB line
        out.write(good.encode() * 10)
    outputs = run_recipe(load_recipe(_recipe(tmp_path, str(corpus))), run_dir=tmp_path / "run")
    metrics = outputs["pre"].metrics
    assert metrics["data/skipped_empty"] == 3
    assert metrics["data/skipped_invalid_utf8"] == 1
    assert metrics["data/skipped_too_long"] == 1
    assert metrics["steps"] == 3
    assert "data/skipped_too_long" in (tmp_path / "run" / "summary.md").read_text()


def test_json_rows_missing_the_column_are_skipped_and_counted(tmp_path):
    rows = [{"text": "A sentence with enough words to be a document of its own."}] * 20
    rows += [{"other": "no text column here"}, {"text": None}, {"text": 12}]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    outputs = run_recipe(load_recipe(_recipe(tmp_path, str(corpus), path="json")), run_dir=tmp_path / "run")
    metrics = outputs["pre"].metrics
    assert metrics["data/skipped_missing"] == 2
    assert metrics["data/skipped_not_text"] == 1


def test_a_corpus_with_nothing_usable_is_a_clear_error(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"\n   \n\xff\xfe\xfd\n\n")
    proc = subprocess.run([sys.executable, "-m", "lmssl", "run", str(_recipe(tmp_path, str(corpus))),
                           "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no usable text" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "pre").exists()


# --------------------------------------------------------------------------- images

def _image_recipe(tmp_path: Path, folder: Path) -> Path:
    recipe = tmp_path / "images.yaml"
    recipe.write_text(f"""\
name: bad-images
stages:
  - name: pre
    kind: pretrain
    objective: mae
    objective_args: {{decoder_width: 32, decoder_depth: 1}}
    model: {{family: vit, size: tiny, image_size: 16, patch_size: 4}}
    data: {{path: "{folder}", eval_fraction: 0}}
    batch_size: 4
    max_steps: 2
""")
    return recipe


def test_images_that_do_not_decode_are_skipped_and_counted_in_the_stage(tmp_path):
    import io

    from PIL import Image

    folder = tmp_path / "images"
    for label, color in (("red", (200, 10, 10)), ("blue", (10, 10, 200))):
        (folder / label).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (20 + i, 12), color).save(folder / label / f"{i}.jpg")
    Image.new("L", (9, 9), 80).save(folder / "red" / "gray.png")                   # grayscale: converted, kept
    Image.new("RGBA", (9, 9), (0, 255, 0, 128)).save(folder / "blue" / "alpha.png")  # alpha: converted, kept
    jpeg = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(jpeg, format="JPEG")
    (folder / "red" / "truncated.jpg").write_bytes(jpeg.getvalue()[:200])
    (folder / "blue" / "notes.jpg").write_text("this is a text file with an image's name")
    (folder / "README.txt").write_text("not an image, not counted")
    outputs = run_recipe(load_recipe(_image_recipe(tmp_path, folder)), run_dir=tmp_path / "run")
    metrics = outputs["pre"].metrics
    assert metrics["data/skipped_undecodable"] == 2
    assert metrics["data/images"] == 14
    assert metrics["steps"] == 2
    assert "data/skipped_undecodable=2" in (tmp_path / "run" / "summary.md").read_text()


def test_an_empty_image_folder_and_one_with_nothing_decodable_are_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    (empty / "cats").mkdir(parents=True)
    broken = tmp_path / "broken"
    (broken / "cats").mkdir(parents=True)
    for i in range(3):
        (broken / "cats" / f"{i}.png").write_bytes(b"\x89PNG not really")
    for folder, words in ((empty, "no image"), (broken, "decod")):
        run_dir = tmp_path / f"run-{folder.name}"
        proc = subprocess.run([sys.executable, "-m", "lmssl", "run", str(_image_recipe(tmp_path, folder)),
                               "--run-dir", str(run_dir)], capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "stages.pre.data" in proc.stderr and words in proc.stderr.lower(), proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (run_dir / "pre").exists()
