"""Offline default data, made by lmssl at run time from the documentation that ships with Python.

`builtin:pydocs` is an unlabeled English corpus (~2 MB): every docstring of the standard library
(read with `ast`, nothing is imported) and the language-reference topics of `pydoc_data`.
`builtin:pydocs-wordorder` is a labeled task built from the same kind of text: is this sentence as
written (1), or were two of its words swapped (0)? Word order is what masked-LM pretraining learns
and what a bag of words cannot see, so pretraining measurably helps it.
The task's sentences come from modules held out of the corpus, so pretraining never sees them.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import re
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

FORMAT = 2  # bump when the harvested text changes, so caches are rebuilt
SKIPPED_DIRS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"}
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _heldout(module: str) -> bool:
    """About one module in eight is held out of the corpus for the downstream task."""
    return hashlib.sha1(module.encode()).digest()[0] % 8 == 0


def _clean(doc: str) -> str:
    """Unwrap hard-wrapped docstring paragraphs; keep blank lines as document structure."""
    paragraphs = [" ".join(line.strip() for line in block.splitlines()) for block in re.split(r"\n\s*\n", doc)]
    return "\n".join(p for p in paragraphs if p)


def _docstrings() -> Iterator[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIPPED_DIRS.intersection(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = rel.parts[0].removesuffix(".py")
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= 8:
                    yield module, _clean(doc)


def _topics() -> Iterator[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return
    for key in sorted(topics):
        yield _clean(topics[key])


def corpus_rows() -> Iterator[dict]:
    for module, doc in _docstrings():
        if not _heldout(module):
            yield {"text": doc}
    for text in _topics():
        yield {"text": text}


def _sentences() -> Iterator[str]:
    for module, doc in _docstrings():
        if not _heldout(module):
            continue
        for paragraph in doc.splitlines():
            for sentence in SENTENCE_END.split(paragraph):
                words = sentence.split()
                if 6 <= len(words) <= 40 and sentence.endswith(".") and re.match(r"^[A-Z][a-z]", sentence):
                    yield sentence


def wordorder_rows() -> Iterator[dict]:
    """Half the sentences as written (label 1), half with two words at distance 1-3 swapped (label 0)."""
    rng = random.Random(1234)
    sentences = sorted(set(_sentences()))
    rng.shuffle(sentences)
    for i, sentence in enumerate(sentences):
        words = sentence.split()
        split = "validation" if i % 5 == 0 else "train"
        if i % 2 == 0:
            yield {"sentence": sentence, "label": 1, "split": split}
            continue
        for _ in range(10):  # find two different words to swap
            a = rng.randrange(len(words) - 1)
            b = min(len(words) - 1, a + rng.randint(1, 3))
            if words[a].lower() != words[b].lower():
                break
        words[a], words[b] = words[b], words[a]
        yield {"sentence": " ".join(words), "label": 0, "split": split}


BUILTIN = {
    "pydocs": corpus_rows,
    "pydocs-wordorder": wordorder_rows,
}


def cache_dir() -> Path:
    base = os.environ.get("LMSSL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lmssl")
    return Path(base) / "builtin"


def builtin_file(name: str) -> Path:
    """The JSONL file of a builtin dataset, harvested on first use and cached per Python version."""
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    target = cache_dir() / f"{name}-{version}-v{FORMAT}.jsonl"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as out:
        for row in BUILTIN[name]():
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, target)
    return target
