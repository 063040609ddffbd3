"""Where each rank's time and memory went: compute, communication, idle, peak RSS.

Workers send theirs to the master when they stop; the master writes every rank's row to the
result's /ranks table, which the scaling job reads.
"""
from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

MMAP_THRESHOLD = 256 * 2**10  # arrays from this size get their own mapping, returned at free


def return_freed_memory() -> None:
    """Keep freed arrays from counting against ``--memory``: glibc raises its mmap threshold up
    to 32 MiB after large frees, after which tiles come from the heap and its freed holes stay
    resident (measured on the master, 2400x3000 int16, 32M budget: 38-40 MiB above baseline,
    33 MiB with a fixed threshold). A fixed threshold maps every large array on its own."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None).mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD (glibc; others ignore it)
    except (OSError, AttributeError):
        pass


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int:
    """Resident memory now (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_rss_bytes()


@dataclass
class RankStats:
    """Seconds spent per activity on one rank, and its memory (see module docstring)."""

    rank: int
    role: str
    compute_s: float = 0.0
    comm_s: float = 0.0
    idle_s: float = 0.0
    io_s: float = 0.0
    jobs: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    cpu_s: float = 0.0
    wall_s: float = 0.0
    baseline_rss_bytes: int = field(default_factory=current_rss_bytes)
    peak_rss_bytes: int = 0
    _t0: float = field(default_factory=time.perf_counter, repr=False)
    _cpu0: float = field(default_factory=time.process_time, repr=False)

    @contextmanager
    def timing(self, activity: str):
        """Add the time spent in the ``with`` block to ``<activity>_s``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, f"{activity}_s", getattr(self, f"{activity}_s") + time.perf_counter() - t0)

    def finish(self) -> dict:
        """The row for /ranks, with wall, CPU time and peak memory filled in."""
        self.wall_s = time.perf_counter() - self._t0
        self.cpu_s = time.process_time() - self._cpu0
        self.peak_rss_bytes = peak_rss_bytes()
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}
