"""A one-line progress bar for rank 0, shown only when stdout is a terminal."""
from __future__ import annotations

import sys
import time

WIDTH = 30
MIN_INTERVAL_S = 0.1


class ProgressBar:
    """``update()`` redraws ``[####......] resolution r/R: done/total tiles`` at most every 0.1 s;
    ``clear()`` erases it before a normal line is printed."""

    def __init__(self, total_tiles: int, n_resolutions: int, stream=None, enabled: bool | None = None):
        self.stream = stream or sys.stdout
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.n_resolutions = total_tiles, n_resolutions
        self._last = 0.0
        self._shown = False

    def update(self, resolution: int, done: int, elapsed: float, force: bool = False) -> None:
        now = time.monotonic()
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
