"""Offline default data, made by lmssl at run time from the documentation that ships with Python.

`builtin:pydocs` is an unlabeled English corpus (~2 MB): the docstrings of the standard library
(read with `ast`, nothing is imported) and the language-reference topics of `pydoc_data`.
`builtin:pydocs-topic` is a labeled task from the same kind of text: which area of the standard
library (GUI, networking, mail, testing, ...) does a docstring document? A quarter of the
docstrings of those areas are held out of the corpus for it, so pretraining never sees them.
`builtin:digits` is an image set: scikit-learn's bundled handwritten digits (1,797 8x8 images, 10
classes), split 80/20 by index; lmssl/data/images.py scales them up.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sys
import sysconfig
from pathlib import Path
from typing import Iterator, Optional

FORMAT = 5  # bump when the harvested text changes, so caches are rebuilt
SKIPPED_DIRS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"}


AREAS = {  # label -> the top-level standard-library modules that document it
    "gui": "tkinter turtle",
    "concurrency": "asyncio concurrent threading multiprocessing queue selectors sched",
    "mail": "email mailbox smtplib imaplib poplib nntplib mimetypes",
    "network": "http urllib xmlrpc socketserver wsgiref ftplib socket ssl",
    "markup": "xml html",
    "testing": "unittest doctest pdb bdb trace profile cProfile pstats timeit",
    "numbers": "decimal _pydecimal fractions statistics random numbers",
    "packaging": "importlib pkgutil zipimport modulefinder runpy distutils ensurepip venv",
    "files": "pathlib os shutil tarfile zipfile glob fnmatch tempfile filecmp _pyio gzip bz2 lzma",
    "text": "string textwrap re difflib codecs encodings",
}
AREA_OF = {module: area for area, modules in AREAS.items() for module in modules.split()}
LABELS = sorted(AREAS)


def _heldout(module: str, doc: str) -> bool:
    """A quarter of the docstrings of the labeled areas are held out of the corpus for the task."""
    return module in AREA_OF and hashlib.sha1(doc.encode()).digest()[0] % 4 == 0


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
        if not _heldout(module, doc):
            yield {"text": doc}
    for text in _topics():
        yield {"text": text}


def topic_rows() -> Iterator[dict]:
    """Held-out docstrings labeled with their area; one in five goes to the validation split."""
    for module, doc in _docstrings():
        if _heldout(module, doc):
            digest = hashlib.sha1(doc.encode()).digest()
            split = "validation" if digest[1] % 5 == 0 else "train"
            yield {"text": doc.replace("\n", " "), "label": LABELS.index(AREA_OF[module]), "split": split}


BUILTIN = {
    "pydocs": corpus_rows,
    "pydocs-topic": topic_rows,
}


def digits() -> dict:
    """scikit-learn's digits: images (N, 8, 8) uint8 0..255, labels (N,), split (N,) "train"/"test", label_names."""
    import numpy as np
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255 / 16)).astype(np.uint8)  # 17 gray levels 0..16 -> 0..255
    split = np.where(np.arange(len(images)) % 5 == 4, "test", "train")  # every 5th image: 1,438 / 359
    return {"images": images, "labels": bunch.target.astype(np.int64), "split": split,
            "label_names": [str(d) for d in range(10)]}


BUILTIN_IMAGES = {  # image sets, read by lmssl.data.images (not by the text loader)
    "digits": digits,
}


def modality_of(path: str) -> Optional[str]:
    """"text" or "image" for a builtin:NAME data path, None for anything else."""
    name = path.split(":", 1)[1] if path.startswith("builtin:") else None
    return "text" if name in BUILTIN else "image" if name in BUILTIN_IMAGES else None


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
