"""The recipe layer's error, in a module of its own: everything that reports a bad recipe imports it without
importing the trainers."""


class RecipeError(ValueError):
    """A recipe that cannot run, with a message naming the file, the key, the value and the fix."""


class NotAvailableYet(RecipeError):
    """Something a recipe names that is well formed but not on this machine yet: a model not downloaded, an adapter
    or data that an earlier step produces. `kd-train validate` notes it; running the recipe refuses it."""
