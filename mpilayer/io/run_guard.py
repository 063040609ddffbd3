"""Safety of a run around its output: one run per output, no input overwritten or changed
under the run, no scratch left behind, and signals turned into an early, clean stop.

- :class:`OutputLock`: an exclusive ``flock`` on ``<output>.lock`` (the file names its holder,
  ``pid host``), taken before anything touches the output's scratch files and held for the
  run's life. A second run on the same output fails with one line; the first is untouched.
  While it is held no other run uses the output's scratch files, so leftovers of killed runs
  (``.<name>.work.h5``, ``.<name>.acc.h5``, ``.<name>.tmp-<pid>.h5``) are removed then.
- :func:`check_not_input`: the output must not be (or link to) an input file.
- Inputs changed under the run are caught by h5io.MatrixSource.check_unchanged (at every
  read and before every publish).
- :class:`StopSignals`: SIGTERM/SIGINT/SIGUSR1 on the master; during the set-up they raise
  :class:`Interrupted`, during the run they cut the deadline short (the run then publishes every
  tile at its best resolution and stops the workers). Workers ignore these signals (the master
  stops them), but end themselves ``WORKER_GRACE_S`` seconds later in case the master is gone.
"""
from __future__ import annotations

import errno
import fcntl
import glob
import os
import signal
import socket

from mpilayer.errors import MpilayerError, OutputError, one_line

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
WORKER_GRACE_S = 20  # a signalled worker not stopped by the master within this long ends itself


class Interrupted(MpilayerError):
    """A stop signal arrived before the run started (nothing computed yet)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} before the run started")
        self.signum = signum


def exit_status(signum: int) -> int:
    """The documented exit status of a run stopped by ``signum``: 128 + its number."""
    return 128 + int(signum)


# --------------------------------------------------------------------------- scratch files


def scratch_paths(output) -> list:
    """Existing scratch files of ``output``: working file, spilled accumulators, publish copies."""
    directory, name = os.path.split(os.path.abspath(os.fspath(output)))
    prefix = os.path.join(glob.escape(directory), glob.escape(f".{name}."))
    return sorted(glob.glob(prefix + "work.h5") + glob.glob(prefix + "acc.h5") + glob.glob(prefix + "tmp-*.h5"))


def benchmark_directory(prefix: str, parent=None) -> str:
    """A new temporary directory for a benchmark's generated files, in ``parent`` (its
    ``--tmpdir``) or the system's; OutputError (one line) if it cannot be made there."""
    import tempfile

    try:
        return tempfile.mkdtemp(prefix=prefix, dir=parent)
    except OSError as err:
        raise OutputError(f"--tmpdir {parent}: cannot create a directory there ({one_line(err)})") from None


def remove_quietly(path) -> None:
    """Remove a file if it is there; a failure to remove scratch must not hide the real error."""
    try:
        os.remove(path)
    except OSError:
        pass


# --------------------------------------------------------------------------- the lock


class OutputLock:
    """Exclusive lock of ``output`` for one run (see the module docstring).

    Raises OutputError (one line, naming the holder) if another live run holds it.
    """

    def __init__(self, output):
        self.output = os.path.abspath(os.fspath(output))
        self.path = self.output + ".lock"
        directory = os.path.dirname(self.output)
        if not os.path.isdir(directory):
            raise OutputError(f"cannot write {self.output}: directory {directory} does not exist")
        self._fd = None
        for _ in range(10):  # the file may be removed by its holder between our open and lock
            fd = self._open()
            if self._lock(fd) and _same_file(fd, self.path):
                self._fd = fd
                break
            os.close(fd)
        else:
            raise OutputError(f"cannot lock {self.path}: it keeps being replaced")
        self._write_holder()

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise OutputError(f"cannot write {self.output}: cannot create lock {self.path}: {one_line(err)}") from err

    def _lock(self, fd) -> bool:
        """True once locked; OutputError if another run holds it. A file system without
        flock support (some NFS) gets no lock rather than no run."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputError(f"{self.output} is being written by another run ({holder}; lock {self.path})") from None
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise OutputError(f"cannot lock {self.path}: {one_line(err)}") from err
        return True

    def _write_holder(self) -> None:
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError as err:
            self.release()
            raise OutputError(f"cannot write {self.output}: cannot write lock {self.path}: {one_line(err)}") from err

    def remove_stale_scratch(self) -> list:
        """Remove scratch files of earlier runs on this output (safe: we hold the lock)."""
        stale = scratch_paths(self.output)
        for path in stale:
            remove_quietly(path)
        return stale

    def release(self) -> None:
        """Remove the lock file, then unlock (a waiting run then re-checks the file). Safe twice."""
        if self._fd is None:
            return
        remove_quietly(self.path)
        os.close(self._fd)
        self._fd = None


def _same_file(fd, path) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _read_holder(fd) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "holder unknown"


def cleanup(output) -> str:
    """``mpilayer cleanup``: remove the scratch files and lock of ``output`` left by killed runs.

    Refuses (OutputError) while a live run holds the lock. Returns a one-line report."""
    lock = OutputLock(output)
    try:
        stale = lock.remove_stale_scratch()
    finally:
        lock.release()
    if not stale:
        return f"{lock.output}: no scratch files left by earlier runs"
    return f"{lock.output}: removed {len(stale)} scratch file(s): " + ", ".join(os.path.basename(p) for p in stale)


# --------------------------------------------------------------------------- inputs


def check_not_input(output, inputs) -> None:
    """OutputError if ``output`` is, links to, or hard-links to one of the ``inputs`` (paths)."""
    output = os.path.abspath(os.fspath(output))
    try:
        out = os.stat(output)
    except OSError:
        out = None
    for path in inputs:
        same = os.path.realpath(output) == os.path.realpath(path)
        if out is not None and not same:
            try:
                st = os.stat(path)
                same = (st.st_dev, st.st_ino) == (out.st_dev, out.st_ino)
            except OSError:
                pass
        if same:
            raise OutputError(f"refusing to write {output}: it is the input file {path} (or a link to it)")


# --------------------------------------------------------------------------- signals


class StopSignals:
    """Stop signals on the master: :class:`Interrupted` during the set-up, then (after
    :meth:`running`) ``deadline.stop_now(signum)``, which the run loop sees as an expired deadline."""

    def __init__(self):
        self.signum = None
        self.deadline = None
        self.raising = True

    def install(self) -> "StopSignals":
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def running(self, deadline=None) -> None:
        """From now on a signal cuts ``deadline`` short (or is only recorded) instead of raising."""
        self.raising = False
        self.deadline = deadline
        if self.signum is not None and deadline is not None:
            deadline.stop_now(self.signum)

    def _handle(self, signum, frame):
        first = self.signum is None
        if first:
            self.signum = signum
        if self.deadline is not None:
            self.deadline.stop_now(self.signum)
        if self.raising and first:
            self.raising = False
            raise Interrupted(signum)


def ignore_on_worker() -> None:
    """Workers leave stop signals to the master, but end themselves WORKER_GRACE_S later
    (SIGALRM, default action) if the master never stops them."""
    def handle(signum, frame):
        previous = signal.alarm(WORKER_GRACE_S)
        if previous:  # keep the first signal's countdown
            signal.alarm(previous)

    for sig in STOP_SIGNALS:
        signal.signal(sig, handle)
