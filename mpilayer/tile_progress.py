"""How a tile of C grows, shared by the matmul master (master.py) and the stream master
(stream.py): the k-panel increments of a (tile, resolution) are summed until every panel is
in, and a tile at resolution r gets its certified error bound from the operands' side sums.
"""
from __future__ import annotations

import numpy as np

from .bounds import SideSums, truncation_bound
from .components import ComponentSplit
from .layered import certified_bound


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


def tile_bound(split: ComponentSplit, r: int, a_sums: list, b_sums: list, rows: slice, cols: slice,
               sa, sb, estimate: np.ndarray) -> float:
    """The certified bound of ``|C - estimate|`` over a tile at resolution r (0 at the exact one).

    ``a_sums[r]``/``b_sums[r]``: side sums of the operands truncated at resolution r, per row of A /
    column of B (``[-1]``: the whole operand); ``sa``/``sb``: the tile's scales (None: integers).
    """
    delta = split.max_dropped(r)
    if not delta:
        return 0.0
    bound = truncation_bound(delta, _part(a_sums[-1], rows), _part(a_sums[r], rows),
                             _part(b_sums[-1], cols), _part(b_sums[r], cols), sa, sb)
    return certified_bound(bound, estimate, sa is not None)


def _part(sums: SideSums, major: slice) -> SideSums:
    return SideSums(sums.pos[major], sums.neg[major])
