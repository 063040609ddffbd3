"""The master's int64 accumulators of C's tiles, within a memory budget.

Tiles live in memory, least recently used first out; past the budget they go to a scratch
HDF5 file next to the output (created only if needed) and come back when their next
resolution arrives. Resolutions are scheduled in order, so each tile is read and written
about once per resolution. A failing scratch file (full disk, I/O error) is an OutputError
naming it; :meth:`close` never raises and always removes it.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from mpilayer.errors import OutputError, one_line
from mpilayer.io.h5io import open_h5
from mpilayer.io.run_guard import remove_quietly


class TileAccumulators:
    def __init__(self, budget: int, scratch_path: str, shape: tuple, tile_shape: tuple):
        self.budget = budget
        self.scratch_path = scratch_path
        self.shape, self.tile_shape = shape, tile_shape
        self._memory = OrderedDict()
        self.nbytes = 0
        self._file = self._ds = None
        self._spilled = set()
        self.spills = 0

    def _slices(self, tile):
        (ti, tj), (tr, tc) = tile, self.tile_shape
        return slice(ti * tr, min((ti + 1) * tr, self.shape[0])), slice(tj * tc, min((tj + 1) * tc, self.shape[1]))

    def _dataset(self):
        """The scratch dataset, one object for the file's life. No chunk cache: a tile is a chunk,
        and a write that cannot reach the disk must fail in the call that made it, not later in
        a cache flush during garbage collection (where h5py can only print it, and HDF5 crashed)."""
        if self._file is None:
            self._file = open_h5(self.scratch_path, "w", rdcc_nbytes=0)
            chunks = (min(self.tile_shape[0], self.shape[0]), min(self.tile_shape[1], self.shape[1]))
            self._ds = self._file.create_dataset("acc", shape=self.shape, dtype=np.int64, chunks=chunks)
        return self._ds

    def _read(self, tile) -> np.ndarray:
        rows, cols = self._slices(tile)
        try:
            return self._dataset()[rows, cols]
        except (OSError, RuntimeError) as err:
            raise OutputError(f"cannot read spilled accumulators from {self.scratch_path}: {one_line(err)}") from err

    def _write(self, tile, acc: np.ndarray) -> None:
        rows, cols = self._slices(tile)
        try:
            self._dataset()[rows, cols] = acc
        except (OSError, RuntimeError) as err:
            raise OutputError(f"cannot spill accumulators to {self.scratch_path}: {one_line(err)}") from err

    def add(self, tile, increment: np.ndarray) -> np.ndarray:
        """Add ``increment`` to the tile's accumulator (which starts at zero); return it."""
        acc = self._memory.pop(tile, None)
        if acc is None and tile in self._spilled:
            acc = self._read(tile)
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
            acc = self._read(tile)
        return acc

    def _evict(self, keep) -> None:
        while self.nbytes > self.budget and len(self._memory) > 1:
            tile, acc = next(iter(self._memory.items()))
            if tile == keep:
                break
            self._write(tile, acc)
            del self._memory[tile]
            self._spilled.add(tile)
            self.nbytes -= acc.nbytes
            self.spills += 1

    def close(self) -> None:
        """Remove the scratch file (on error paths too: never raises)."""
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # noqa: BLE001 - a full disk may fail the last flush; the file goes anyway
                pass
            self._file = self._ds = None
        remove_quietly(self.scratch_path)
