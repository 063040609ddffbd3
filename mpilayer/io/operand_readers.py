"""Operand blocks: read from HDF5, quantised, encoded for the wire (on the master, and on the
workers that read their own blocks: data_plane.py).

Before the run, :meth:`OperandReader.prepare` makes two passes over the operand, block by
block: the first rejects NaN/Inf and integers that do not fit ``bits``, finds the scale of
real input and the zero point of every row of A / column of B (estimates.py); the second
sums, per row / column, what the estimates and certified bounds of every resolution need
(:class:`estimates.SideStats`). Under MPI every rank makes both passes on a share of the blocks
(:meth:`first_pass_sums`, :meth:`finish_first_pass`, :meth:`share_stats`; parallel_prep.py);
alone, ``mpilayer matmul`` makes the second pass lazily, block by block as jobs first need them
(``prepare(lazy=True)``, :meth:`OperandReader.stats_for`). Real input is
quantised and encoded for the wire in one compiled pass (``_kernels.quantize_encode``). During the
run, blocks (``q - z``) are re-read on demand and kept in an LRU cache within the memory budget.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np

from mpilayer import _kernels
from mpilayer.core.components import ComponentSplit
from mpilayer.core.estimates import SideStats, shifted, zero_points
from mpilayer.core.partition import block_slices
from mpilayer.core.quantization import integer_range_error, quantize_real_block, scale_for, storage_dtype
from mpilayer.core.wire_format import encode_component
from mpilayer.errors import InputError
from mpilayer.io.h5io import MatrixSource

if TYPE_CHECKING:  # coding.py (fractions, decimal) only with --code: not on every worker's start-up
    from mpilayer.core.coding import Code


class LRUCache:
    """A byte-bounded least-recently-used cache of numpy arrays."""

    def __init__(self, budget: int):
        self.budget = budget
        self.nbytes = 0
        self._items = OrderedDict()

    def get(self, key):
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def pop(self, key):
        """Remove and return ``key``'s value (None if absent)."""
        value = self._items.pop(key, None)
        if value is not None:
            self.nbytes -= value.nbytes
        return value

    def put(self, key, value: np.ndarray) -> np.ndarray:
        if key in self._items:
            self.nbytes -= self._items.pop(key).nbytes
        self._items[key] = value
        self.nbytes += value.nbytes
        while self.nbytes > self.budget and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self.nbytes -= old.nbytes
        return value


class OperandReader:
    """Blocks of one operand: rows of A (``side="A"``) or columns of B (``side="B"``).

    ``major`` blocks run along rows of A / columns of B (the tile axis), ``panels`` along k.
    """

    def __init__(self, source: MatrixSource, side: str, split: ComponentSplit, scale_mode: str,
                 major_size: int, k_panel: int, cache: LRUCache):
        self.source, self.side, self.split = source, side, split
        self.scale_mode = scale_mode
        self.cache = cache
        length, k = (source.shape if side == "A" else source.shape[::-1])
        self.length, self.k = length, k
        self.majors = block_slices(length, major_size)
        self.panels = block_slices(k, k_panel)
        self.is_real = not source.is_integer
        self.scale = None  # float64 scalar or per-row/column vector (real input only)
        self.zero = np.zeros(length, dtype=np.int64)  # zero point per row of A / column of B
        self.stats = None  # estimates.SideStats over all of k
        self._summed = set()

    # ------------------------------------------------------------------ reading

    def _read_raw(self, mi: int, pi: int) -> np.ndarray:
        major, panel = self.majors[mi], self.panels[pi]
        return (self.source.read(major, panel) if self.side == "A"
                else self.source.read(panel, major))

    def _scale_block(self, mi: int):
        """The scale broadcast against block ``mi`` (as read: rows x panel or panel x cols)."""
        if self.scale is None:
            return None
        if np.ndim(self.scale) == 0:
            return self.scale
        v = self.scale[self.majors[mi]]
        return v[:, None] if self.side == "A" else v[None, :]

    def block(self, mi: int, pi: int) -> np.ndarray:
        """Quantised block less its zero points, ``q - z`` (int8/int16, C-contiguous), cached.

        Real input goes through one compiled pass (``_kernels.quantize_encode``) that also
        encodes every component for the wire while the block is in cache, when they fit the
        cache (:meth:`_encode_now`): bit-identical to quantising, shifting and encoding apart."""
        key = ("q", self.side, mi, pi)
        q = self.cache.get(key)
        if q is None:
            z = self.zero[self.majors[mi]]
            raw = self.cache.pop(("raw", self.side, mi, pi))  # kept by the first pass
            if raw is None:
                raw = self._read_raw(mi, pi)
            if raw.dtype in (np.float32, np.float64):
                q = self._quantise_encode(mi, pi, raw, z, key)
                self._add_stats(mi, pi, q)
                return q
            q = self._quantised(mi, raw)
            if z.any():
                q = shifted(q, z, 1 if self.side == "A" else 0)
            q = self.cache.put(key, np.ascontiguousarray(q))
            self._add_stats(mi, pi, q)
        return q

    def _quantise_encode(self, mi: int, pi: int, raw: np.ndarray, z: np.ndarray, key) -> np.ndarray:
        scale = self.scale if np.ndim(self.scale) == 0 else self.scale[self.majors[mi]]
        comps = range(len(self.split.widths)) if self._encode_now() else ()
        fields = [(self.split.component(c).lo, self.split.component(c).width) for c in comps]
        q, bufs = _kernels.quantize_encode(raw, np.asarray(scale, dtype=np.float64),
                                           z if z.any() else None, self.split.bits,
                                           0 if self.side == "A" else 1, fields)
        q = self.cache.put(key, q)
        for c, buf in zip(comps, bufs):
            self.cache.put(("c", self.side, mi, pi, c), buf)
        return q

    def _encode_now(self) -> bool:
        """Encode every component in the quantising pass when this operand's blocks and their
        encodings take at most a quarter of the cache (both operands then stay cached);
        otherwise components are encoded on demand (encoded())."""
        per_element = self.element_bytes + sum(w / 8 if w <= 3 else (1 if w <= 8 else 2) for w in self.split.widths)
        return self.length * self.k * per_element <= self.cache.budget / 4

    def _quantised(self, mi: int, raw: np.ndarray) -> np.ndarray:
        """Integer blocks in storage form; real ones the compiled pass does not take (non-native
        byte order) quantised in numpy."""
        if self.is_real:
            return quantize_real_block(raw, self._scale_block(mi), self.split.bits)
        return np.ascontiguousarray(raw, dtype=storage_dtype(self.split.bits))

    def encoded(self, mi: int, pi: int, comp: int) -> np.ndarray:
        """Component ``comp`` of block (mi, pi) in wire form, cached."""
        key = ("c", self.side, mi, pi, comp)
        buf = self.cache.get(key)
        if buf is None:
            q = self.block(mi, pi)
            buf = self.cache.get(key)  # the quantising pass may have encoded it just now
            if buf is None:
                buf = self.cache.put(key, encode_component(q, self.split.component(comp)))
        return buf

    def block_shape(self, mi: int, pi: int) -> tuple:
        major, panel = self.majors[mi], self.panels[pi]
        rows = (major.stop - major.start, panel.stop - panel.start)
        return rows if self.side == "A" else rows[::-1]

    def wire_bits(self, comp: int) -> int:
        """Bits per element of a component on the wire (about: widths <= 3 are packed)."""
        return self.split.widths[comp]

    @property
    def element_bytes(self) -> int:
        """Bytes per element of a block as the workers store it."""
        return storage_dtype(self.split.bits)().itemsize

    # ------------------------------------------------------------------ preparation pass

    def prepare(self, bits: int, zero_point: bool = True, lazy: bool = False) -> None:
        """Two passes over the operand: validate, find scales and zero points; then sum for the
        estimates and bounds. With ``lazy`` only the first: each block is then quantised (and its
        sums added) when a job first needs it, and :meth:`stats_for` completes a row block of A
        (column block of B) before its statistics are read, so that the workers start earlier."""
        self.finish_first_pass(*self.first_pass_sums(), bits, zero_point)
        self.stats = SideStats(self.split, self.zero, self.k)
        self._summed = set()  # (mi, pi) whose sums are in self.stats
        if not lazy:
            for mi in range(len(self.majors)):
                self.stats_for(mi)

    def share_stats(self, majors) -> SideStats:
        """The statistics of the major blocks ``majors`` only (others' entries zero), for
        parallel_prep to combine with the other ranks' shares."""
        self.stats = SideStats(self.split, self.zero, self.k)
        self._summed = set()
        for mi in majors:
            self.stats_for(mi)
        return self.stats

    def set_stats(self, stats: SideStats) -> None:
        """Statistics complete for every block (combined by parallel_prep): nothing left to sum."""
        self.stats = stats
        self._summed = {(mi, pi) for mi in range(len(self.majors)) for pi in range(len(self.panels))}

    def stats_for(self, mi: int) -> SideStats:
        """The statistics, complete for major block ``mi`` (quantising its missing k-panels)."""
        for pi in range(len(self.panels)):
            if (mi, pi) not in self._summed:
                self._add_stats(mi, pi, self.block(mi, pi))
        return self.stats

    def _add_stats(self, mi: int, pi: int, q: np.ndarray) -> None:
        if self.stats is not None and (mi, pi) not in self._summed:
            self._summed.add((mi, pi))
            self.stats.add(q if self.side == "A" else q.T, self.majors[mi])

    def _blocks_raw(self, majors, by_span: bool = False):
        """The raw blocks of the major blocks ``majors`` (ascending), in the order (mi, pi). With
        ``by_span`` (B, when the blocks are kept), each k-panel is read in one hyperslab over the
        columns the majors span and the blocks are views of it (rows of a block are read in place
        later): HDF5 reads a column block of a contiguous dataset row by row, so one read of
        their span costs about what one block does."""
        if not (by_span and self.side == "B" and majors):
            for mi in majors:
                for pi in range(len(self.panels)):
                    yield mi, pi, self._read_raw(mi, pi)
            return
        c0, c1 = self.majors[majors[0]].start, self.majors[majors[-1]].stop
        spans = [self.source.read(panel, slice(c0, c1)) for panel in self.panels]
        for mi in majors:
            cut = slice(self.majors[mi].start - c0, self.majors[mi].stop - c0)
            for pi, rows in enumerate(spans):
                yield mi, pi, rows[:, cut]

    def first_pass_sums(self, majors=None) -> tuple:
        """Per row of A / column of B: ``(sum, min, max)`` of the raw values (over the major blocks
        ``majors`` only, if given; others keep 0, +inf, -inf). InputError on NaN/Inf, with the
        block ``(mi, pi)`` where it was found as ``err.block``."""
        axis = 1 if self.side == "A" else 0  # reduces a block to its rows (A) / columns (B)
        total = np.zeros(self.length)
        lo = np.full(self.length, np.inf)
        hi = np.full(self.length, -np.inf)
        majors = range(len(self.majors)) if majors is None else sorted(majors)
        share = sum(self.majors[mi].stop - self.majors[mi].start for mi in majors)
        keep_raw = share * self.k * self.source.dtype.itemsize <= self.cache.budget / 4
        for mi, pi, raw in self._blocks_raw(majors, by_span=keep_raw):
            major, panel = self.majors[mi], self.panels[pi]
            if keep_raw:  # the second pass quantises it without reading it again
                self.cache.put(("raw", self.side, mi, pi), raw)
            if raw.size == 0:
                continue
            b_lo, b_hi = raw.min(axis=axis), raw.max(axis=axis)
            # NaN propagates through min/max and an Inf is an extreme: one look at the extremes
            # instead of a pass of np.isfinite; the position comes from the block when one is bad
            if self.is_real and not (np.isfinite(b_lo).all() and np.isfinite(b_hi).all()):
                try:
                    if self.side == "A":
                        self.source.check_finite(raw, major, panel)
                    else:
                        self.source.check_finite(raw, panel, major)
                except InputError as err:
                    err.block = (mi, pi)
                    raise
            total[major] += raw.sum(axis=axis, dtype=np.float64)
            lo[major] = np.minimum(lo[major], b_lo)
            hi[major] = np.maximum(hi[major], b_hi)
        return total, lo, hi

    def finish_first_pass(self, total: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int,
                          zero_point: bool = True) -> None:
        """Scale (real input), integer range check (InputError), and zero points, from the
        first pass's sums over every row/column (the same on every rank that has them)."""
        per_major = self.is_real and self.scale_mode == "axis"
        if self.is_real:
            amax = np.maximum(np.abs(lo), np.abs(hi), where=np.isfinite(lo), out=np.zeros(self.length))
            if not per_major:
                amax = np.asarray(amax.max(initial=0.0))
            self.scale = scale_for(amax, bits)
            scale = np.broadcast_to(self.scale, (self.length,))
            # q = clip(rint(x / s)) is monotone in x: the extreme q are those of the extreme x
            qlo, qhi = (quantize_real_block(v[None, :], scale[None, :], bits)[0] for v in (lo, hi))
            mean = total / max(self.k, 1) / scale
        else:
            seen = np.isfinite(lo)
            if seen.any():
                msg = integer_range_error(self.source.label, int(lo[seen].min()), int(hi[seen].max()), bits)
                if msg:
                    raise InputError(msg + " (--bits)")
            qlo, qhi = np.where(seen, lo, 0), np.where(seen, hi, 0)
            mean = total / max(self.k, 1)
        if zero_point and self.k:
            self.zero = zero_points(mean, qlo, qhi, bits)

    def scale_vector(self, major: slice):
        """Scales of the rows/columns in ``major`` as float64 (None for integer input)."""
        if self.scale is None:
            return None
        return np.ascontiguousarray(np.broadcast_to(self.scale, (self.length,))[major], dtype=np.float64)


def tile_scales(a: OperandReader, b: OperandReader, rows: slice, cols: slice) -> tuple:
    """The scales of a tile's rows of A and columns of B as vectors, for its estimate
    (tile_progress.tile_report); ``(None, None)`` when both operands are integers."""
    sa, sb = a.scale_vector(rows), b.scale_vector(cols)
    if sa is None and sb is None:
        return None, None
    return (sa if sa is not None else np.ones(rows.stop - rows.start),
            sb if sb is not None else np.ones(cols.stop - cols.start))


class CodedOperand:
    """Parity blocks of A for ``--code`` (see coding.py), with :class:`OperandReader`'s interface.

    Row blocks ``g*K .. g*K+K-1`` of A form code group ``g``; a parity block is addressed by
    ``major = (g, code_row)``. Members shorter than the group's first block (the last row
    block) or beyond the last row block count as zero rows.
    """

    def __init__(self, a: OperandReader, code: Code):
        self.a, self.code, self.split = a, code, a.split
        self.n_groups = -(-len(a.majors) // code.k)

    def members(self, g: int) -> list:
        """Row blocks of A in code group ``g`` (fewer than K in the last group if A runs out)."""
        return list(range(g * self.code.k, min((g + 1) * self.code.k, len(self.a.majors))))

    def rows(self, g: int) -> int:
        major = self.a.majors[g * self.code.k]
        return major.stop - major.start

    def block_shape(self, major: tuple, pi: int) -> tuple:
        panel = self.a.panels[pi]
        return self.rows(major[0]), panel.stop - panel.start

    def dtype(self, code_row: int, comp: int):
        from mpilayer.core.coding import smallest_int_dtype

        return smallest_int_dtype(*self.code.coded_range(code_row, self.split.component(comp)))

    def wire_bits(self, comp: int) -> int:
        return 8 * max(np.dtype(self.dtype(j, comp)).itemsize for j in range(self.code.k, self.code.n))

    element_bytes = 8  # the worker sums components into int64 fields

    def encoded(self, major: tuple, pi: int, comp: int) -> np.ndarray:
        """Code row ``major[1]``'s combination of component ``comp`` over group ``major[0]``, cached."""
        g, row = major
        key = ("p", g, row, pi, comp)
        buf = self.a.cache.get(key)
        if buf is None:
            from mpilayer.core.coding import field_values

            field, coeffs = self.split.component(comp), self.code.row(row)
            total = np.zeros(self.block_shape(major, pi), dtype=np.int64)
            for i, ti in enumerate(self.members(g)):
                block = field_values(self.a.block(ti, pi), field)
                total[:block.shape[0]] += coeffs[i] * block
            buf = self.a.cache.put(key, total.astype(self.dtype(row, comp)))
        return buf
