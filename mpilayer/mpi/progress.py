"""Rank 0's progress within a resolution: a one-line bar on a terminal; in a log file (a batch
job's output), a plain line now and then, so that a long run's log shows it is moving."""
from __future__ import annotations

import sys
import time

WIDTH = 30
MIN_INTERVAL_S = 0.1
LINE_INTERVAL_S = 30.0


class ProgressBar:
    """``update()`` redraws ``[####......] resolution r of 0..R: done/total tiles`` at most every
    0.1 s on a terminal; elsewhere (``enabled=None`` and no terminal) it prints
    ``resolution r of 0..R: done/total tiles (p%) at t s`` at most every ``line_interval_s``
    (none in the first interval, so short runs print only their resolution lines). ``clear()``
    erases the bar before a normal line is printed. ``enabled=False``: nothing (``-q``)."""

    def __init__(self, total_tiles: int, n_resolutions: int, stream=None, enabled: bool | None = None,
                 line_interval_s: float = LINE_INTERVAL_S):
        self.stream = stream or sys.stdout
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.lines = enabled is None and not self.enabled
        self.line_interval_s = line_interval_s
        self.total, self.n_resolutions = total_tiles, n_resolutions
        self._last = 0.0
        self._last_line = time.monotonic()
        self._shown = False

    def update(self, resolution: int, done: int, elapsed: float, force: bool = False) -> None:
        now = time.monotonic()
        if self.lines and now - self._last_line >= self.line_interval_s:
            self._last_line = now
            self.stream.write(f"resolution {resolution} of 0..{self.n_resolutions - 1}: {done}/{self.total} tiles "
                              f"({100 * done // max(self.total, 1)}%) at {elapsed:.1f} s\n")
            self.stream.flush()
        if not self.enabled or (not force and now - self._last < MIN_INTERVAL_S):
            return
        self._last = now
        filled = WIDTH * done // max(self.total, 1)
        self.stream.write(f"\r[{'#' * filled}{'.' * (WIDTH - filled)}] resolution {resolution} of 0.."
                          f"{self.n_resolutions - 1}: {done}/{self.total} tiles, {elapsed:.1f} s")
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            self.stream.write("\r" + " " * (WIDTH + 60) + "\r")
            self.stream.flush()
            self._shown = False
