"""How a tile of C grows, shared by the matmul master (master.py) and the stream master
(stream.py): the k-panel increments of a (tile, resolution) are summed until every panel is
in, and a tile at resolution r gets its estimate and certified bound from the operands'
statistics (estimates.py).
"""
from __future__ import annotations

import numpy as np

from mpilayer import _kernels
from mpilayer.core.estimates import SideStats, tile_estimate
from mpilayer.core.layered import reported_bound


class PanelSums:
    """Sum of the k-panel increments received for each ``(tile, resolution)`` key."""

    def __init__(self, n_panels: int):
        self.n_panels = n_panels
        self._sums = {}    # key -> int64 sum of the panels received so far
        self._counts = {}  # key -> panels received

    def add(self, key, increment: np.ndarray) -> None:
        """Add one panel's increment (int32 on the wire; sums over panels need int64)."""
        increment = increment.astype(np.int64, copy=False)
        if key in self._sums:
            self._sums[key] += increment
        else:
            self._sums[key] = increment
        self._counts[key] = self._counts.get(key, 0) + 1

    def complete(self, key) -> bool:
        return self._counts.get(key, 0) >= self.n_panels

    def pop(self, key) -> np.ndarray:
        """The finished sum of ``key``, forgotten here."""
        del self._counts[key]
        return self._sums.pop(key)


def tile_report(r: int, acc: np.ndarray, a: SideStats, b: SideStats, rows: slice, cols: slice, sa, sb,
                keep: bool = True):
    """A tile at resolution r as published: ``(estimate, certified bound, var_sum, |estimate|^2)``.

    ``acc``: the tile's int64 accumulator (all k-panels); ``a``/``b``: the operands' statistics
    (estimates.SideStats, whole operands); ``sa``/``sb``: the tile's scales (None: integers);
    ``var_sum``: the statistical estimate of ``sum (exact - estimate)^2`` (not certified);
    ``keep=False``: the estimate is not built (None), only the numbers.
    """
    if r == a.split.n_resolutions - 1:  # exact: e = acc + Z, scaled, in one compiled pass
        za, zb = a.zero[rows], b.zero[cols]
        zero = za.any() or zb.any()
        if not zero and sa is None:  # the accumulator is the exact product: no tile-sized copy
            return acc, 0.0, 0.0, float(np.einsum("ij,ij->", acc, acc, dtype=np.float64))
        estimate, est_sq, _ = _kernels.exact_tile(
            np.ascontiguousarray(acc, dtype=np.int64), a.sq[rows] + a.k * za if zero else None,
            za if zero else None, zb if zero else None, b.sq[cols] if zero else None, sa, sb)
        return estimate, 0.0, 0.0, est_sq
    # scaled in the estimate's own pass, with the rounding of layered.scaled_estimate
    te = tile_estimate(acc, r, a.part(rows), b.part(cols), sa, sb, interval=False, keep=keep, scaled=True)
    return te.estimate, reported_bound(te, sa), te.var_sum, te.estimate_sq
