"""The package's errors that the command lines report, in a module that imports nothing heavy."""


class NonFiniteTrainingError(RuntimeError):
    """The loss or the gradient norm stopped being finite; nothing is saved after it."""
