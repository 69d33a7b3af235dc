"""The recipe layer's error, in a module of its own: everything that reports a bad recipe imports it without
importing the trainers."""


class RecipeError(ValueError):
    """A recipe that cannot run, with a message naming the file, the key, the value and the fix."""
