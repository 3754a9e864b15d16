"""The two exception types a user can cause. The CLI turns both into a one-paragraph
message and exit code 2; everything else is a bug and keeps its traceback."""


class LmsslError(Exception):
    """A user mistake found while running: bad data, a bad path, an impossible setting."""


class RecipeError(LmsslError):
    """A mistake in the recipe itself, found before anything runs."""
