"""Exception types. The CLI turns these into one-line messages in one place (``cli.main``).

``InputError`` and its subclasses mean the user gave something unusable (exit code 2).
``StageError`` means a pipeline stage failed on valid input (exit code 1).
"""


class EdgestarError(Exception):
    """Base class for every error edgestar reports without a traceback."""

    exit_code = 1


class InputError(EdgestarError):
    """Bad user input: a path, option value, image, or checkpoint we cannot use."""

    exit_code = 2


class CheckpointError(InputError):
    """A checkpoint that cannot be read, is unsafe, or does not fit the variant."""


class DataError(InputError):
    """An image folder, image file or array we cannot use."""


class StageError(EdgestarError):
    """A pipeline stage (export, conversion, validation) failed on valid input."""
