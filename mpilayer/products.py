"""Exact integer products of bit fields of two quantised operand blocks.

A resolution's increment is a sum of *terms*, each the product of a bit field of A with a bit
field of B (see components.py). A term is computed exactly by one of two kernels of
``mpilayer._kernels``, picked by a small cost model:

* ``popcount``: both fields as packed binary planes; the product is
  ``sum_{p,q} w_p w_q popcount(A_p & B_q)`` with ``w_p = 2**p`` (``-2**p`` for the sign bit),
  so it costs one binary-plane product per pair of planes;
* ``int8``: both fields as 8-bit digits, multiplied by an exact int8 kernel (AVX2
  ``vpmaddubsw`` or, without AVX2, float32 BLAS on k-blocks where every partial sum is exact).
  The left factor must be unsigned 7-bit, so a signed A field ``x`` of width w is offset to
  ``x + 2**(w-1)`` and the excess ``2**(w-1) * colsum(B field)`` subtracted afterwards; fields
  wider than the digits are cut into 7-bit digits.
"""
from __future__ import annotations

import math
import os

import numpy as np

from . import _kernels
from .bounds import SideSums
from .components import BitField, ComponentSplit

KERNELS = ("popcount", "int8")

# Kernel rates measured on one core of an AVX2 machine (README, Performance; `mpilayer bench
# kernels` prints them): binary-plane products in bit-MAC/s, int8 digit products in MAC/s.
# The int8 kernel accumulates in 16 bits while the left digits are small (x_max <= 63), which
# is faster. Without AVX2: the portable C popcount and the float32-BLAS digit product.
# Only the ratios matter to the choice of kernel.
_FEATURES = _kernels.cpu_features()
if _FEATURES.get("avx2"):
    POPCOUNT_RATE = 225e9
    INT8_RATES = ((15, 88e9), (63, 82e9), (127, 76e9))   # (largest x_max, rate)
else:
    POPCOUNT_RATE = 160e9
    INT8_RATES = ((127, 40e9),)
# Per-element cost of preparing digits (shift, mask, convert), in seconds.
DIGIT_PREP_COST = 0.5e-9


def int8_rate(x_max: int) -> float:
    return next(rate for limit, rate in INT8_RATES if x_max <= limit)


def tally_kernels(tally: dict, kernels: str) -> None:
    """Count a job's terms per kernel (``kernels`` as a worker reports it: ``"int8+popcount"``)."""
    for kernel in kernels.split("+"):
        tally[kernel] = tally.get(kernel, 0) + 1


def kernel_summary(tally: dict) -> str:
    """``"int8:12,popcount:6"``: the tally as stored in the result's attributes."""
    return ",".join(f"{k}:{v}" for k, v in sorted(tally.items()))


# --------------------------------------------------------------------------- operand blocks

class OperandBlock:
    """The known bits of one operand block, with the planes and digits the kernels need.

    ``values`` is an int8/int16 C-contiguous array: rows of A (m x k, ``side="A"``) or columns
    of B (k x n, ``side="B"``). Bits below those received so far are zero and never read, so a
    worker can add components as they arrive (:meth:`add_component`); cached planes and digits
    of higher bits stay valid.
    """

    def __init__(self, values: np.ndarray, side: str, bits: int):
        if side not in ("A", "B"):
            raise ValueError(f"side must be 'A' or 'B', not {side!r}")
        self.values = np.ascontiguousarray(values)
        self.side = side
        self.bits = bits
        self._planes = {}
        self._digits = {}
        self._colsums = {}
        self._sums = {}

    @property
    def k(self) -> int:
        return self.values.shape[1] if self.side == "A" else self.values.shape[0]

    @property
    def length(self) -> int:
        """Rows of an A block, columns of a B block."""
        return self.values.shape[0] if self.side == "A" else self.values.shape[1]

    def add_component(self, field: BitField, raw: np.ndarray) -> None:
        """OR a received component's raw (unsigned) bits into its bit field, sign-extending the
        top component when the storage is wider than ``bits``."""
        u = self.values.view(np.uint8 if self.values.itemsize == 1 else np.uint16)
        utype = u.dtype.type
        u |= raw.astype(u.dtype, copy=False) << utype(field.lo)
        storage_bits = 8 * self.values.itemsize
        if field.signed and self.bits < storage_bits:
            extension = utype(((1 << storage_bits) - 1) ^ ((1 << self.bits) - 1))
            u |= ((u >> utype(self.bits - 1)) & utype(1)) * extension

    def planes_for(self, field: BitField) -> list:
        """Packed planes of every bit of ``field``, packed together in one pass."""
        missing = [p for p in range(field.lo, field.hi) if p not in self._planes]
        if missing:
            pack = _kernels.pack_row_planes if self.side == "A" else _kernels.pack_col_planes
            lo, hi = min(missing), max(missing) + 1
            packed = pack(self.values, lo, hi - lo)
            for i in range(hi - lo):
                self._planes.setdefault(lo + i, packed[i])
        return [self._planes[p] for p in range(field.lo, field.hi)]

    def _unsigned_bits(self, field: BitField) -> np.ndarray:
        """The field's raw bits as unsigned integers (uint8/uint16 view of the storage)."""
        u = self.values.view(np.uint8 if self.values.itemsize == 1 else np.uint16)
        raw = u >> field.lo if field.lo else u.copy()
        if field.hi < 8 * self.values.itemsize:
            raw &= (1 << field.width) - 1
        return raw

    def digits(self, field: BitField):
        """The field cut into exact-kernel digits, cached.

        Returns ``(digits, shifts, offset)``: the field equals
        ``sum_t digits[t] * 2**shifts[t] - offset``. A side: unsigned 7-bit uint8 digits, a
        signed field offset by ``2**(width-1)`` (flipping its sign bit does exactly that).
        B side: int8 digits, 7-bit unsigned except a signed top digit of at most 8 bits;
        ``offset`` is 0.
        """
        key = (field.lo, field.hi)
        if key not in self._digits:
            self._digits[key] = (self._a_digits if self.side == "A" else self._b_digits)(field)
        return self._digits[key]

    def _a_digits(self, field: BitField):
        u = self._unsigned_bits(field)
        offset = (1 << (field.width - 1)) if field.signed else 0
        if offset:
            u ^= u.dtype.type(offset)
        n = n_a_digits(field)
        if n == 1:
            return [u.astype(np.uint8, copy=False)], [0], offset
        return [((u >> (7 * t)) & 127).astype(np.uint8) for t in range(n)], [7 * t for t in range(n)], offset

    def _b_digits(self, field: BitField):
        n = n_b_digits(field)
        if field.signed:  # arithmetic shift keeps the sign
            v = self.values >> field.lo if field.lo else self.values
        else:
            v = self._unsigned_bits(field)
        if n == 1:
            return [np.ascontiguousarray(v.astype(np.int8, copy=False))], [0], 0
        digits = []
        for t in range(n):
            d = v >> (7 * t)
            digits.append((d & 127 if t < n - 1 else d).astype(np.int8))
        return digits, [7 * t for t in range(n)], 0

    def column_sums(self, field: BitField) -> np.ndarray:
        """Sums over k of a B field, per column (int64), for the offset correction."""
        key = (field.lo, field.hi)
        if key not in self._colsums:
            digits, shifts, _ = self.digits(field)
            total = np.zeros(self.length, dtype=np.int64)
            for d, sh in zip(digits, shifts):
                total += d.sum(axis=0, dtype=np.int64) << sh
            self._colsums[key] = total
        return self._colsums[key]

    def side_sums(self, shift: int) -> SideSums:
        """Sums along k of the positive and of the negative entries of the operand truncated
        at bit ``shift`` (per row of A / column of B), counted on the packed planes.

        With sign plane S, an entry is ``-2**(b-1) S + sum_p 2**p P_p``; entries with S = 0
        are the positive ones, so ``pos = sum_p 2**p popcount(P_p & ~S)`` and
        ``neg = -2**(b-1) popcount(S) + sum_p 2**p popcount(P_p & S)``.
        """
        if shift not in self._sums:
            top = self.bits - 1
            planes = self.planes_for(BitField(shift, self.bits, self.bits))
            sign = planes[-1]
            pos = np.zeros(self.length, dtype=np.int64)
            neg = -_row_popcount(sign) << top
            for p, plane in zip(range(shift, top), planes):
                pos += _row_popcount(plane & ~sign) << p
                neg += _row_popcount(plane & sign) << p
            self._sums[shift] = SideSums(pos, neg)
        return self._sums[shift]


def _row_popcount(words: np.ndarray) -> np.ndarray:
    """Set bits per row of packed words, int64."""
    return np.bitwise_count(words).sum(axis=1, dtype=np.int64)


def n_a_digits(field: BitField) -> int:
    return math.ceil(field.width / 7)


def n_b_digits(field: BitField) -> int:
    if field.signed:
        return 1 + max(0, math.ceil((field.width - 8) / 7))
    return math.ceil(field.width / 7)


# --------------------------------------------------------------------------- cost model

def term_cost(kernel: str, m: int, n: int, k: int, fa: BitField, fb: BitField) -> float:
    """Estimated seconds for one term with one kernel on one core."""
    if kernel == "popcount":
        return fa.width * fb.width * m * n * k / POPCOUNT_RATE
    prep = DIGIT_PREP_COST * k * (m * n_a_digits(fa) + n * n_b_digits(fb))
    x_max = min(127, (1 << fa.width) - 1)
    return n_a_digits(fa) * n_b_digits(fb) * m * n * k / int8_rate(x_max) + prep


def choose_kernel(m: int, n: int, k: int, fa: BitField, fb: BitField) -> str:
    """The cheaper kernel for a term; ``MPILAYER_KERNEL=popcount|int8`` forces one (tests)."""
    forced = os.environ.get("MPILAYER_KERNEL")
    if forced:
        if forced not in KERNELS:
            raise ValueError(f"MPILAYER_KERNEL={forced!r}: expected one of {KERNELS}")
        return forced
    return min(KERNELS, key=lambda kern: term_cost(kern, m, n, k, fa, fb))


# --------------------------------------------------------------------------- terms

def resolution_terms(split: ComponentSplit, r: int):
    """The terms (A field, B field) whose products, shifted, make resolution r's increment.

    ``T_A(r) T_B(r) - T_A(r-1) T_B(r-1) = c_A(r) T_B(r) + T_A(r-1) c_B(r)`` (components c,
    truncated operands T), so resolution 0 has one term and every later one two.
    """
    if r == 0:
        return [(split.component(0), split.component(0))]
    return [(split.component(r), split.truncated(r)), (split.truncated(r - 1), split.component(r))]


def term_correction(a: OperandBlock, fa: BitField, b: OperandBlock, fb: BitField, kernel: str):
    """Per-column amount the int8 kernel's offset adds to a term (subtract it from C), or None.

    The int8 kernel multiplies ``fa + offset``; the excess is ``offset * colsum(fb)`` in
    every row, so it is taken out once per resolution, when its estimate is copied.
    """
    if kernel != "int8" or not fa.signed or a.length == 0 or b.length == 0 or a.k == 0:
        return None
    offset = 1 << (fa.width - 1)
    return b.column_sums(fb) * (offset << (fa.lo + fb.lo))


def accumulate_term(C: np.ndarray, a: OperandBlock, fa: BitField, b: OperandBlock, fb: BitField,
                    kernel: str) -> None:
    """``C += (A field fa [+ offset]) @ (B field fb) * 2**(fa.lo + fb.lo)`` exactly; the offset of
    the int8 kernel is left for :func:`term_correction`."""
    m, n, k = a.length, b.length, a.k
    if m == 0 or n == 0 or k == 0:
        return
    if kernel == "popcount":
        top = a.bits - 1
        pa, pb = a.planes_for(fa), b.planes_for(fb)
        for i, p in enumerate(range(fa.lo, fa.hi)):
            for j, q in enumerate(range(fb.lo, fb.hi)):
                weight = 1 << (p + q)
                if (p == top) != (q == top):
                    weight = -weight
                _kernels.popcount_matmul_acc(pa[i], pb[j], C, weight)
        return
    xd, xs, _ = a.digits(fa)
    yd, ys, _ = b.digits(fb)
    base = fa.lo + fb.lo
    for x, sx in zip(xd, xs):
        x_max = min(127, ((1 << fa.width) - 1) >> sx)
        for y, sy in zip(yd, ys):
            _kernels.int8_matmul_acc(x, y, C, 1 << (base + sx + sy), x_max)


def increment_bound(split: ComponentSplit, r: int, k: int) -> int:
    """A bound on ``|increment|`` of resolution r over k products: the sum over its terms of
    ``max|A field| * max|B field| * k * 2**(shifts)``. Lets a worker send the increment as int32
    when it fits (half the bytes of int64)."""
    total = 0
    for fa, fb in resolution_terms(split, r):
        size_a = max(-fa.min_value, fa.max_value)
        size_b = max(-fb.min_value, fb.max_value)
        total += (size_a * size_b * k) << (fa.lo + fb.lo)
    return total


def add_terms(prev: np.ndarray | None, a: OperandBlock, b: OperandBlock, terms: list,
              kernel: str | None = None):
    """``prev`` plus the products of ``terms`` (``(A field, B field)`` pairs), as a new int64
    array; ``prev`` is untouched, None means zeros. Returns ``(result, kernels used)``.

    Copying ``prev`` and taking out the int8 kernel's offsets is a single pass over C.
    """
    m, n, k = a.length, b.length, a.k
    kernels = [kernel or choose_kernel(m, n, k, fa, fb) for fa, fb in terms]
    correction = None
    for (fa, fb), kern in zip(terms, kernels):
        c = term_correction(a, fa, b, fb, kern)
        if c is not None:
            correction = c if correction is None else correction + c
    if correction is not None:
        out = np.empty((m, n), dtype=np.int64)
        np.subtract(0 if prev is None else prev, correction[None, :], out=out)
    elif prev is not None:
        out = prev.copy()
    else:
        out = np.zeros((m, n), dtype=np.int64)
    for (fa, fb), kern in zip(terms, kernels):
        accumulate_term(out, a, fa, b, fb, kern)
    return out, tuple(kernels)


# --------------------------------------------------------------------------- coded blocks

class CodedBlock:
    """A parity block on a worker (``--code``, see coding.py): for each component it holds the
    code row's integer combination of that component's values over the K row blocks of A.

    The combinations overlap in bits, so unlike :class:`OperandBlock` a field is not read off
    one integer array: :meth:`field` sums the components it covers, each shifted into place.
    """

    side = "P"

    def __init__(self, shape: tuple, split: ComponentSplit):
        self.shape, self.split = tuple(shape), split
        self.components = {}  # component index -> integer array of the combination

    @property
    def length(self) -> int:
        return self.shape[0]

    @property
    def k(self) -> int:
        return self.shape[1]

    def add_component(self, comp: int, values: np.ndarray) -> None:
        self.components[comp] = values.reshape(self.shape)

    def field(self, fa: BitField) -> np.ndarray:
        """The combination of field ``fa`` (a component or a truncated operand), int64."""
        out = np.zeros(self.shape, dtype=np.int64)
        for comp in range(self.split.n_resolutions):
            c = self.split.component(comp)
            if fa.lo <= c.lo and c.hi <= fa.hi:
                out += self.components[comp].astype(np.int64) << (c.lo - fa.lo)
        return out


def integer_matmul(x: np.ndarray, b: OperandBlock, fb: BitField) -> np.ndarray:
    """``x @ (B field fb)`` exactly, for int64 ``x`` whose products sum within int64 and whose
    range ``max(x) - min(x)`` times ``2**width(fb)`` stays below ``2**62`` (ValueError if not;
    parity fields are far narrower).

    ``x`` is offset to ``u = x - min(x) >= 0``, cut into 7-bit digits for the int8 kernel, and
    the offset added back as ``min(x) * colsum(B field)``.
    """
    m, k = x.shape
    out = np.zeros((m, b.length), dtype=np.int64)
    if m == 0 or k == 0 or b.length == 0:
        return out
    low = int(x.min())
    u_max = int(x.max()) - low
    if u_max.bit_length() + fb.width > 62:
        raise ValueError(f"integer_matmul: values span {u_max}, too wide for a {fb.width}-bit field")
    u = x - low
    yd, ys, _ = b.digits(fb)
    for t in range(max(1, math.ceil(u_max.bit_length() / 7))):
        digit = np.ascontiguousarray((u >> (7 * t)) & 127, dtype=np.uint8)
        x_max = min(127, u_max >> (7 * t))
        for y, sy in zip(yd, ys):
            _kernels.int8_matmul_acc(digit, y, out, 1 << (7 * t + sy), x_max)
    if low:
        out += low * b.column_sums(fb)[None, :]
    return out


def add_coded_terms(a: CodedBlock, b: OperandBlock, terms: list) -> np.ndarray:
    """The products of ``terms`` with a parity block of A, summed and shifted, as int64."""
    out = np.zeros((a.length, b.length), dtype=np.int64)
    for fa, fb in terms:
        out += integer_matmul(a.field(fa), b, fb) << (fa.lo + fb.lo)
    return out
