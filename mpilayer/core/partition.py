"""Tiling of C = A @ B into tiles and k-panels. Pure arithmetic, no MPI.

A tile is a block of C (rows of A x columns of B); a k-panel is a slice of the inner
dimension, so one mini-job reads an A block ``rows x panel`` and a B block ``panel x cols``
whatever K is. Every range is ``[start, stop)``; the last block of an axis may be shorter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property


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

    @cached_property
    def row_blocks(self) -> list:  # computed once: rank 0 looks blocks up for every job
        return block_slices(self.m, self.tile_rows)

    @cached_property
    def col_blocks(self) -> list:  # computed once: rank 0 looks blocks up for every job
        return block_slices(self.n, self.tile_cols)

    @cached_property
    def k_panels(self) -> list:  # computed once: rank 0 looks blocks up for every job
        return block_slices(self.k, self.k_panel)

    @property
    def shape(self) -> tuple:
        """Tiles per axis of C."""
        return len(self.row_blocks), len(self.col_blocks)

    def tiles(self):
        """``(ti, tj)`` in row-major order."""
        nr, nc = self.shape
        return [(ti, tj) for ti in range(nr) for tj in range(nc)]


TILES_PER_WORKER = 8           # distributed tiles: tiles of C per worker and resolution, at least
DISTRIBUTED_TILE = (512, 2048)  # ... within these sides
TILE_ALIGN = 64                 # distributed tile sides: multiples of this (the kernels' column blocks)
TILE_MEMORY = 256               # ... and a tile's 32 bytes an element on its worker (int64 accumulator,
                                # float64 estimate, temporaries) within 1/8 of the budget (2G: 2896)


def distributed_tile_side(m: int, n: int, workers: int) -> int:
    """Square tile side for a distributed result on ``workers`` workers.

    The master's CPU grows with the number of mini-jobs (one pass of its loop, one message each
    way and one summary per job: ~0.15-0.2 ms), the workers' balance and the deadline's
    granularity with the tiles per worker. So the side is the one that gives every worker
    TILES_PER_WORKER tiles per resolution, ``sqrt(m n / (8 workers))`` rounded to a multiple of
    64 (up, unless that leaves too few tiles), within 512 (the tile for many workers) and 2048:
    float32 4096^2 on 2 workers gets 1024 (16 tiles, 32 jobs instead of 128), 3072^2 768,
    65536^2 on 1024 workers 704.
    """
    ideal = math.sqrt(max(m, 1) * max(n, 1) / (TILES_PER_WORKER * max(workers, 1)))
    side = -(-math.floor(ideal) // TILE_ALIGN) * TILE_ALIGN
    if side > DISTRIBUTED_TILE[0] and _count(m, side) * _count(n, side) < TILES_PER_WORKER * workers:
        side -= TILE_ALIGN  # rounding up left too few tiles: one step down is below the ideal side
    return min(max(side, DISTRIBUTED_TILE[0]), DISTRIBUTED_TILE[1])


def _count(length: int, side: int) -> int:
    return -(-max(length, 1) // side)


def default_tile(m: int, n: int, k: int, operand_bytes: int, memory: int, distributed_workers: int = 0) -> tuple:
    """``(tile_rows, tile_cols, k_panel)`` for a run with ``memory`` bytes per rank.

    512 x 512 tiles keep a mini-job short (a few ms to tens of ms on one core: the deadline
    overshoot is at most one mini-job) while large enough for the kernels' cache blocking. With
    a distributed result on ``distributed_workers`` workers, :func:`distributed_tile_side`
    instead (fewer, larger jobs: the master's CPU), if its tile fits TILE_MEMORY. The k-panel is the whole of k unless an A
    and a B block, with the planes and digits a worker derives from them (about 4x their bytes),
    would use over a sixteenth of the budget.
    """
    side = 512
    if distributed_workers > 0:
        fits = math.isqrt(memory // TILE_MEMORY) // TILE_ALIGN * TILE_ALIGN
        side = max(min(distributed_tile_side(m, n, distributed_workers), fits), DISTRIBUTED_TILE[0])
    tile_rows, tile_cols = min(side, max(m, 1)), min(side, max(n, 1))
    per_k = 4 * operand_bytes * (tile_rows + tile_cols)
    k_panel = max(64, min(max(k, 1), memory // 16 // max(per_k, 1)))
    k_panel = max(1, min(k_panel, max(k, 1)))
    if k_panel < k:
        k_panel = max(64, (k_panel // 64) * 64)
    return tile_rows, tile_cols, k_panel
