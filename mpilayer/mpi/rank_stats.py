"""Where each rank's time and memory went: compute, communication, idle, peak RSS.

Workers send theirs to the master when they stop; the master writes every rank's row to the
result's /ranks table, which the scaling job reads.
"""
from __future__ import annotations

import resource
import socket
import sys
import time
from dataclasses import asdict, dataclass, field

MMAP_THRESHOLD = (256 * 2**10, 16 * 2**20)  # bounds of the threshold: arrays from it get their own mapping


def mmap_threshold(memory: int) -> int:
    """1/128 of ``--memory`` within MMAP_THRESHOLD: 256 KiB at 32M, 16 MiB from 2G."""
    return min(max(memory // 128, MMAP_THRESHOLD[0]), MMAP_THRESHOLD[1])


def return_freed_memory(memory: int) -> None:
    """Keep freed arrays from counting against ``--memory``: glibc raises its mmap threshold up
    to 32 MiB after large frees, after which tiles come from the heap and its freed holes stay
    resident (measured on the master, 2400x3000 int16, 32M budget: 38-40 MiB above baseline,
    33 MiB with a fixed threshold). A fixed threshold maps every large array on its own -- and
    each new mapping costs a page fault per 4 KiB page (a 2 MiB tile: 512), so the threshold
    grows with the budget, where a few freed tiles held in the heap are a small part of it
    (float32 4096^2, 8 bits, 3 ranks, 2G: 260k faults and 1.1 s of system CPU at 256 KiB, 81k
    and 0.8 s at 16 MiB, peak RSS within a few MiB)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None).mallopt(-3, mmap_threshold(memory))  # M_MMAP_THRESHOLD (glibc; others ignore it)
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
    bytes_read: int = 0  # from the HDF5 inputs (a worker reading its own blocks: data_plane.py)
    host: str = field(default_factory=socket.gethostname)  # bytes read per node: sum over a host's ranks
    cpu_s: float = 0.0
    wall_s: float = 0.0
    baseline_rss_bytes: int = field(default_factory=current_rss_bytes)
    peak_rss_bytes: int = 0
    _t0: float = field(default_factory=time.perf_counter, repr=False)
    _cpu0: float = field(default_factory=time.process_time, repr=False)

    def timing(self, activity: str) -> "_Timing":
        """Add the time spent in the ``with`` block to ``<activity>_s``."""
        return _Timing(self, f"{activity}_s")

    def finish(self) -> dict:
        """The row for /ranks, with wall, CPU time and peak memory filled in."""
        self.wall_s = time.perf_counter() - self._t0
        self.cpu_s = time.process_time() - self._cpu0
        self.peak_rss_bytes = peak_rss_bytes()
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


class _Timing:
    """RankStats.timing's context manager: a plain class, not @contextmanager (a generator per
    use), since the master's loop times every pass (measured: 2000 uses in a 4096^2 run)."""

    __slots__ = ("stats", "name", "t0")

    def __init__(self, stats: RankStats, name: str):
        self.stats, self.name = stats, name

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        setattr(self.stats, self.name, getattr(self.stats, self.name) + time.perf_counter() - self.t0)
