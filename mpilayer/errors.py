"""User-facing errors of mpilayer.

The CLI catches :class:`MpilayerError`, prints ``mpilayer: error: <message>``
and exits with status 2, so a message must be one line that names the problem
and the file or dataset involved. Anything else that escapes is a bug and keeps
its traceback.
"""

__all__ = ["MpilayerError", "InputError", "OutputError", "one_line"]


def one_line(text) -> str:
    """Collapse ``text`` to a single line (HDF5 messages can span several)."""
    return " ".join(str(text).split())


class MpilayerError(Exception):
    """A problem the user can fix; ``str()`` is one line naming file/dataset."""

    def __init__(self, message):
        super().__init__(one_line(message))


class InputError(MpilayerError):
    """Bad input file, dataset, values or options."""


class OutputError(MpilayerError):
    """The output cannot be written (directory missing, exists without --force, ...)."""
