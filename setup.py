"""Native tokenizer trainers (C, no dependencies beyond CPython).

They are optional: where no C compiler is available the build skips them (optional=True) and the
tokenizer stage trains with the `tokenizers` library's own trainers instead, saying so once.
Metadata and dependencies live in setup.cfg.
"""

from pathlib import Path

from setuptools import Extension, setup

HERE = Path(__file__).resolve().parent
FLAGS = ["-O3", "-std=c99", "-Wall", "-Wno-unused-function"]
SOURCES = {"lmssl._bpe": "lmssl/_bpe.c", "lmssl._unigram": "lmssl/_unigram.c"}

setup(ext_modules=[Extension(name, [source], extra_compile_args=FLAGS, optional=True)
                   for name, source in SOURCES.items() if (HERE / source).is_file()])
