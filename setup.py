"""Native tokenizer trainers (C, no dependencies beyond CPython).

They are optional: where no C compiler is available the build skips them (optional=True) and the
tokenizer stage trains with the `tokenizers` library's own trainers instead, saying so once.
Metadata and dependencies live in setup.cfg.
"""

import os

from setuptools import Extension, setup

POSIX = os.name == "posix"  # gcc/clang flags; elsewhere the compiler's defaults (or no native trainers)
FLAGS = ["-O3", "-std=c99", "-Wall", "-Wno-unused-function", "-pthread"] if POSIX else []
SOURCES = {"lmssl._bpe": "lmssl/_bpe.c", "lmssl._unigram": "lmssl/_unigram.c"}

setup(ext_modules=[Extension(name, [source], extra_compile_args=FLAGS, extra_link_args=["-pthread"] if POSIX else [],
                             libraries=["m"] if POSIX else [], optional=True)
                   for name, source in SOURCES.items()])
