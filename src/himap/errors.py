"""The one error type for mistakes in what a user gave himap (a flag, a file, a setting, a model).

It subclasses ``ValueError`` so callers that catch ``ValueError`` keep working. The command line prints a
``UserError`` as one line and exits non-zero; every other exception is an internal error and keeps its traceback.
"""


class UserError(ValueError):
    """A mistake in the user's input, reported as one line naming the problem."""
