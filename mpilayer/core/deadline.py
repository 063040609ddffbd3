"""Wall-clock deadline of a run, measured from its start on rank 0."""
from __future__ import annotations

import math
import time


class Deadline:
    """``seconds`` after ``start`` (``time.monotonic()``); ``None`` or ``inf`` means no deadline."""

    def __init__(self, seconds: float | None, start: float | None = None):
        if seconds is not None and (math.isnan(seconds) or seconds < 0):
            raise ValueError(f"deadline must be a non-negative number of seconds, not {seconds}")
        self.seconds = math.inf if seconds is None else float(seconds)
        self.start = time.monotonic() if start is None else start
        self.signal = None  # the stop signal that cut the run short, if any

    def stop_now(self, signum: int) -> None:
        """A stop signal arrived: expire now (``seconds`` keeps the deadline asked for)."""
        if self.signal is None:
            self.signal = int(signum)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        return 0.0 if self.signal is not None else self.seconds - self.elapsed()

    def expired(self) -> bool:
        return self.remaining() <= 0

    def overshoot(self, end: float) -> float:
        """Seconds from the deadline to ``end`` (a ``time.monotonic()`` reading); negative if early."""
        return end - self.start - self.seconds
