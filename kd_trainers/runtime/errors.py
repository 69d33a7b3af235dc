"""The package's errors that the command lines report, in a module that imports nothing heavy."""


class NonFiniteTrainingError(RuntimeError):
    """The loss or the gradient norm stopped being finite; nothing is saved after it."""


class TeacherServerError(RuntimeError):
    """A served teacher gave no valid answer within its bound (down, too slow, or answering garbage); no step was
    trained on the missing targets."""
