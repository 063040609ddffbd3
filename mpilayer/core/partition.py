"""Tiling of C = A @ B into tiles and k-panels. Pure arithmetic, no MPI.

A tile is a block of C (rows of A x columns of B); a k-panel is a slice of the inner
dimension, so one mini-job reads an A block ``rows x panel`` and a B block ``panel x cols``
whatever K is. Every range is ``[start, stop)``; the last block of an axis may be shorter.
"""
from __future__ import annotations

from dataclasses import dataclass


def block_slices(n: int, size: int) -> list:
    """``[0, n)`` cut into consecutive slices of ``size`` (the last one shorter)."""
    if size < 1:
        raise ValueError(f"block size must be >= 1, not {size}")
    return [slice(s, min(s + size, n)) for s in range(0, n, size)] or [slice(0, 0)]


@dataclass(frozen=True)
class TileGrid:
    """Tiles of an ``m x n`` result with inner dimension ``k``."""

    m: int
    n: int
    k: int
    tile_rows: int
    tile_cols: int
    k_panel: int

    def __post_init__(self):
        for name in ("tile_rows", "tile_cols", "k_panel"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)}")

    @property
    def row_blocks(self) -> list:
        return block_slices(self.m, self.tile_rows)

    @property
    def col_blocks(self) -> list:
        return block_slices(self.n, self.tile_cols)

    @property
    def k_panels(self) -> list:
        return block_slices(self.k, self.k_panel)

    @property
    def shape(self) -> tuple:
        """Tiles per axis of C."""
        return len(self.row_blocks), len(self.col_blocks)

    def tiles(self):
        """``(ti, tj)`` in row-major order."""
        nr, nc = self.shape
        return [(ti, tj) for ti in range(nr) for tj in range(nc)]


def default_tile(m: int, n: int, k: int, operand_bytes: int, memory: int) -> tuple:
    """``(tile_rows, tile_cols, k_panel)`` for a run with ``memory`` bytes per rank.

    512 x 512 tiles keep a mini-job short (a few ms to tens of ms on one core: the deadline
    overshoot is at most one mini-job) while large enough for the kernels' cache blocking.
    The k-panel is the whole of k unless an A and a B block, with the planes and digits a
    worker derives from them (about 4x their bytes), would use over a sixteenth of the budget.
    """
    tile_rows, tile_cols = min(512, max(m, 1)), min(512, max(n, 1))
    per_k = 4 * operand_bytes * (tile_rows + tile_cols)
    k_panel = max(64, min(max(k, 1), memory // 16 // max(per_k, 1)))
    k_panel = max(1, min(k_panel, max(k, 1)))
    if k_panel < k:
        k_panel = max(64, (k_panel // 64) * 64)
    return tile_rows, tile_cols, k_panel
