"""lmssl: self-supervised pretraining on the HF stack, from one recipe file.

The public entry points: `load_recipe` (read and check a recipe) and `run_recipe` (run it).
"""

from __future__ import annotations

__version__ = "0.1.0"

from lmssl.errors import LmsslError, RecipeError  # noqa: E402


def load_recipe(path, overrides=None, check: bool = True, rewrite=None):
    """Read a recipe file with `--set`-style overrides and check it (lmssl.recipe.load_recipe with
    every stage kind this package has)."""
    from lmssl.recipe import load_recipe as load
    from lmssl.stages import CONFIGS

    return load(path, CONFIGS, overrides, check, rewrite)


def run_recipe(recipe, run_dir=None, force=(), accelerator=None):
    """Run every stage of a loaded recipe in order (lmssl.runner.run_recipe)."""
    from lmssl.runner import run_recipe as run

    return run(recipe, run_dir=run_dir, force=force, accelerator=accelerator)


__all__ = ["LmsslError", "RecipeError", "__version__", "load_recipe", "run_recipe"]
