"""The master's int64 accumulators of C's tiles, within a memory budget.

Tiles live in memory, least recently used first out; past the budget they go to a scratch
HDF5 file next to the output (created only if needed) and come back when their next
resolution arrives. Resolutions are scheduled in order, so each tile is read and written
about once per resolution.
"""
from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np

from .h5io import open_h5


class TileAccumulators:
    def __init__(self, budget: int, scratch_path: str, shape: tuple, tile_shape: tuple):
        self.budget = budget
        self.scratch_path = scratch_path
        self.shape, self.tile_shape = shape, tile_shape
        self._memory = OrderedDict()
        self.nbytes = 0
        self._file = None
        self._spilled = set()
        self.spills = 0

    def _slices(self, tile):
        (ti, tj), (tr, tc) = tile, self.tile_shape
        return slice(ti * tr, min((ti + 1) * tr, self.shape[0])), slice(tj * tc, min((tj + 1) * tc, self.shape[1]))

    def _dataset(self):
        if self._file is None:
            self._file = open_h5(self.scratch_path, "w")
            chunks = (min(self.tile_shape[0], self.shape[0]), min(self.tile_shape[1], self.shape[1]))
            self._file.create_dataset("acc", shape=self.shape, dtype=np.int64, chunks=chunks)
        return self._file["acc"]

    def add(self, tile, increment: np.ndarray) -> np.ndarray:
        """Add ``increment`` to the tile's accumulator (which starts at zero); return it."""
        acc = self._memory.pop(tile, None)
        if acc is None and tile in self._spilled:
            rows, cols = self._slices(tile)
            acc = self._dataset()[rows, cols]
            self._spilled.discard(tile)
            self.nbytes += acc.nbytes
        if acc is None:
            acc = increment
            self.nbytes += acc.nbytes
        else:
            acc += increment
        self._memory[tile] = acc
        self._evict(keep=tile)
        return acc

    def get(self, tile) -> np.ndarray:
        """The tile's accumulator (read back from the scratch file if spilled, not re-cached)."""
        acc = self._memory.get(tile)
        if acc is None:
            rows, cols = self._slices(tile)
            acc = self._dataset()[rows, cols]
        return acc

    def _evict(self, keep) -> None:
        while self.nbytes > self.budget and len(self._memory) > 1:
            tile, acc = next(iter(self._memory.items()))
            if tile == keep:
                break
            del self._memory[tile]
            rows, cols = self._slices(tile)
            self._dataset()[rows, cols] = acc
            self._spilled.add(tile)
            self.nbytes -= acc.nbytes
            self.spills += 1

    def close(self) -> None:
        """Remove the scratch file."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if os.path.exists(self.scratch_path):
            os.remove(self.scratch_path)
