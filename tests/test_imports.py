"""The repo's tokenizers/ folder holds YAML specs; it must never shadow the HF library."""

import importlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_import_tokenizers_resolves_to_the_hf_library():
    module = importlib.import_module("tokenizers")
    assert hasattr(module, "Tokenizer"), module
    assert Path(module.__file__).resolve().parent != (REPO / "tokenizers").resolve()
    assert not (REPO / "tokenizers" / "__init__.py").exists()


def test_every_stage_field_has_a_docstring():
    from lmssl.recipe import Recipe
    from lmssl.schema import field_docs
    import dataclasses
    from lmssl.stages import STAGES

    for cls in [Recipe, *(m.Config for m in STAGES.values())]:
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in docs]
        assert not missing, f"{cls.__module__}.{cls.__name__}: fields without a docstring: {missing}"
