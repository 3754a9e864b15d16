"""lmssl: self-supervised pretraining on the HF stack, from one recipe file.

The public entry points are `load_recipe` (recipe.py) and `run_recipe` (runner.py).
"""

__version__ = "0.1.0"

from lmssl.errors import LmsslError, RecipeError  # noqa: E402

__all__ = ["LmsslError", "RecipeError", "__version__"]
