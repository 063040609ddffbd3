"""User-facing errors of mpilayer.

The CLI catches :class:`MpilayerError`, prints ``mpilayer: error: <message>``
and exits with status 2, so a message must be one line that names the problem
and the file or dataset involved. Anything else that escapes is a bug and keeps
its traceback.
"""

__all__ = ["MpilayerError", "InputError", "OutputError", "one_line"]


def one_line(text) -> str:
    """Collapse ``text`` to a single line (HDF5 messages can span several). An HDF5 I/O failure
    (its message holds ``error message = '...'``, e.g. 'No space left on device') is cut to
    its first clause and that reason."""
    text = " ".join(str(text).split())
    marker = "error message = '"
    if marker in text:
        reason = text.split(marker, 1)[1].split("'", 1)[0]
        text = f"{text.split(' (', 1)[0]}: {reason}"
    return text


class MpilayerError(Exception):
    """A problem the user can fix; ``str()`` is one line naming file/dataset."""

    def __init__(self, message):
        super().__init__(one_line(message))


class InputError(MpilayerError):
    """Bad input file, dataset, values or options."""


class OutputError(MpilayerError):
    """The output cannot be written (directory missing, exists without --force, ...)."""
