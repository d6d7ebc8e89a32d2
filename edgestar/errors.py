"""Exception types. The CLI turns these into one-line messages in one place (``cli.main``).

``InputError`` and its subclasses mean the user gave something unusable (exit code 2).
``StageError`` means a pipeline stage failed on valid input (exit code 1).
``Terminated`` is SIGTERM, raised like Ctrl-C's KeyboardInterrupt (exit codes 143 and 130).
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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread by the CLI's handler; a KeyboardInterrupt, so every
    clean-up that runs for Ctrl-C (converter ended, run directory marked interrupted) runs."""


_received: list[str] = []  # signals the CLI's handlers saw in this process, in order


def note_signal(name: str) -> None:
    _received.append(name)


def clear_signals() -> None:
    _received.clear()


def interrupt_name(exc: BaseException) -> str | None:
    """The signal that ended the work, or None when ``exc`` is an ordinary error. A signal's
    exception raised inside library code can come out as another exception (numpy's file
    writer turns it into a TypeError): a signal seen by the CLI's handler still counts."""
    if isinstance(exc, Terminated):
        return "SIGTERM"
    if _received:
        return _received[-1]
    return "SIGINT" if isinstance(exc, KeyboardInterrupt) else None
