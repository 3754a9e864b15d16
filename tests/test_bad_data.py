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
