"""Exact integer products of bit fields of two quantised operand blocks.

A resolution's increment is a sum of *terms*, each the product of a bit field of A with a bit
field of B (see components.py). A term is computed exactly by one of two kernels of
``mpilayer._kernels``, picked by a small cost model:

* ``popcount``: both fields as packed binary planes; the product is
  ``sum_{p,q} w_p w_q popcount(A_p & B_q)`` with ``w_p = 2**p`` (``-2**p`` for the sign bit),
  so it costs one binary-plane product per pair of planes (AVX-512 VPOPCNTDQ or AVX2);
* ``int8``: both fields as digits, multiplied by an exact u8 x s8 kernel. The digit width
  follows the dispatched kernel (:data:`DIGIT_BITS`): 8 with VNNI (``vpdpbusd`` takes any
  unsigned byte on the left), 7 otherwise (AVX2 ``vpmaddubsw`` would saturate on 8-bit
  digits; float32 BLAS without AVX2). The left factor is unsigned, so a signed A field ``x``
  of width w is offset to ``x + 2**(w-1)`` (its sign bit flipped) and the excess
  ``2**(w-1) * colsum(B field)`` subtracted afterwards. Fields wider than the digits are cut
  into digits (Ozaki-style slices: 16 bits are two 8-bit digits a side, four products). A B
  digit must be int8: an unsigned 8-bit B digit ``d`` is stored as ``d - 128`` (sign bit
  flipped) and ``128 * rowsum(A digits)`` added back.
"""
from __future__ import annotations

import math
import os

import numpy as np

from mpilayer import _kernels
from mpilayer.core.bounds import SideSums
from mpilayer.core.components import BitField, ComponentSplit

KERNELS = ("popcount", "int8")

# Kernel rates per dispatched path, measured on one core of this project's machine (Intel Xeon,
# family 6 model 207, AVX-512 F/BW/VL/DQ/VNNI/VPOPCNTDQ, no AVX-VNNI) with `mpilayer bench
# kernels --n 2048` and side-by-side reruns (best of 3 runs of 5; the machine is shared, so
# single runs vary by up to 30%): binary-plane products in bit-MAC/s, int8 digit products in
# MAC/s ((largest x_max, rate), ascending). Only the ratios matter to the choice of kernel. The
# AVX2 int8 kernel accumulates in 16 bits while the left digits are small, which is faster;
# VNNI takes any 8-bit digit at one rate. 'avxvnni' (ymm) could not run here: its rate is that
# of the same ymm body EVEX-encoded ('avx512vnni-ymm') on this CPU. 'c' popcount was timed at
# n = 512.
PATH_RATES = {
    "popcount": {"avx512": 840e9, "avx2": 230e9, "c": 174e9},
    "int8": {"avx512vnni": ((255, 275e9),), "avxvnni": ((255, 154e9),),
             "avx2": ((15, 84e9), (127, 75e9)), "blas": ((127, 44e9),), "c": ((255, 8e9),)},
}
_FEATURES = _kernels.cpu_features()
POPCOUNT_PATH = _FEATURES["popcount_path"]
INT8_PATH = _FEATURES["int8_path"]
POPCOUNT_RATE = PATH_RATES["popcount"][POPCOUNT_PATH]
INT8_RATES = PATH_RATES["int8"][INT8_PATH]   # (largest x_max, rate), ascending
# Digit width of the int8 kernel: 8 where the dispatched path takes full 8-bit left digits at
# speed (VNNI), else 7. Module-level so that tests can run both widths on any CPU (the plain C
# path takes 8-bit digits too, exactly but slowly).
DIGIT_BITS = 8 if INT8_PATH in ("avx512vnni", "avxvnni") else 7
# Seconds per element of A and of B of preparing an int8 term's digits (shift, mask, convert;
# VNNI: packing B), per digit: measured on one core of the machine above (2026-11-30, best of
# 50, int8 operands from 300x700x200 and 1797x64x64 to 2048^3): 0.11-0.16 ns. Each resolution's
# whole product takes new digits (of the truncated fields), so every term pays it. Bit planes
# (0.06-0.16 ns per element and plane) are not charged: a plane is packed once per operand
# and every later term that uses the bit reuses it.
DIGIT_PREP_COST = 0.15e-9
# Seconds per element of C that an increment at resolution r costs resolution r-1: the
# accumulator must then be kept, so r-1's estimate cannot be written over it (by its kernel,
# or in place) and takes a pass and fresh memory of its own. Measured as above: resolution 0
# of 1+...+1 at n = 2048 took 43.7 ms before an increment, 31.8 ms before a whole product.
KEEP_ACC_S = 2.8e-9


def int8_rate(x_max: int) -> float:
    """MAC/s of the int8 kernel for left digits up to x_max (the widest entry beyond)."""
    return next((rate for limit, rate in INT8_RATES if x_max <= limit), INT8_RATES[-1][1])


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
        # shift s -> per line sum along k of the operand truncated at bit s, ``(v >> s) << s``
        # (int64), where the caller already has them (layered.py: from estimates.SideStats)
        self.truncated_sums = {}

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
        """The field cut into exact-kernel digits of :data:`DIGIT_BITS` bits, cached.

        Returns ``(digits, shifts, offset, biases)``: the field equals
        ``sum_t (digits[t] + biases[t]) * 2**shifts[t] - offset``. A side: unsigned uint8
        digits, a signed field offset by ``2**(width-1)`` (flipping its sign bit does exactly
        that); biases 0. B side: int8 digits (packed for the VNNI kernel), unsigned except a
        signed top digit of at most 8 bits; an unsigned 8-bit digit is stored with its top
        bit flipped (``d - 128``), bias 128; ``offset`` is 0.
        """
        key = (field.lo, field.hi, DIGIT_BITS)
        if key not in self._digits:
            self._digits[key] = (self._a_digits if self.side == "A" else self._b_digits)(field)
        return self._digits[key]

    def _a_digits(self, field: BitField):
        """The field's bits plus its offset (a signed field's top bit flipped), in unsigned
        digits: one digit in numpy's vector passes, several in one compiled pass
        (``_kernels.field_digits``; numpy's shifts, masks and casts were ~5x slower there)."""
        offset = (1 << (field.width - 1)) if field.signed else 0
        n, d = n_a_digits(field), DIGIT_BITS
        if n == 1:
            u = self._unsigned_bits(field)
            if offset:
                u ^= u.dtype.type(offset)
            return [u.astype(np.uint8, copy=False)], [0], offset, [0]
        flips = [0] * (n - 1) + [offset >> (d * (n - 1))]
        digits = _kernels.field_digits(self.values, field.lo, field.width, False, d, n, flips)
        return digits, [d * t for t in range(n)], offset, [0] * n

    def _b_digits(self, field: BitField):
        n, d = n_b_digits(field), DIGIT_BITS
        packed = DIGIT_BITS == 8 and INT8_PATH in ("avx512vnni", "avxvnni")
        if packed and n == 1 and field.signed and self.values.dtype == np.int8:
            # the field is values >> lo: shifted while packed, no copy of its own
            return [_kernels.pack_int8(self.values, field.lo)], [0], 0, [0]
        # unsigned digits below a signed (sign-extended) or unsigned top one; an unsigned 8-bit
        # digit is stored with its top bit flipped (d - 128, bias 128); several in one compiled pass
        biases = [128 if (field.width - d * t if t == n - 1 else d) >= 8 and not (t == n - 1 and field.signed)
                  else 0 for t in range(n)]
        if n == 1:
            v = (self.values >> field.lo if field.lo else self.values) if field.signed else self._unsigned_bits(field)
            digits = [(v ^ 128).astype(np.uint8).view(np.int8) if biases[0]
                      else np.ascontiguousarray(v.astype(np.int8, copy=False))]
        else:
            digits = [x.view(np.int8) for x in
                      _kernels.field_digits(self.values, field.lo, field.width, field.signed, d, n, biases)]
        if packed:
            digits = [_kernels.pack_int8(y) for y in digits]  # packed once per operand block
        return digits, [d * t for t in range(n)], 0, biases

    def digit_row_sums(self, field: BitField) -> np.ndarray:
        """Per row of an A block, the sum over k of the field plus its offset (what the int8
        kernel multiplies), int64: the factor of a biased B digit's correction."""
        key = ("rows", field.lo, field.hi, DIGIT_BITS)
        if key not in self._colsums:
            digits, shifts, _, _ = self.digits(field)
            total = np.zeros(self.length, dtype=np.int64)
            for x, sh in zip(digits, shifts):
                total += x.sum(axis=1, dtype=np.int64) << sh
            self._colsums[key] = total
        return self._colsums[key]

    def column_sums(self, field: BitField) -> np.ndarray:
        """Sums over k of a B field, per column (int64), for the offset correction."""
        key = (field.lo, field.hi)
        sums = self.truncated_sums
        if key not in self._colsums and field.lo in sums and (field.signed or field.hi in sums):
            # the field is (T_lo - T_hi) >> lo, or T_lo >> lo when signed: exact in int64
            top = 0 if field.signed else sums[field.hi]
            self._colsums[key] = (sums[field.lo] - top) >> field.lo
        if key not in self._colsums:
            if field.signed:
                v = self.values >> field.lo if field.lo else self.values
            else:
                v = self._unsigned_bits(field)
            self._colsums[key] = v.sum(axis=0, dtype=np.int64)
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
    """Unsigned digits of :data:`DIGIT_BITS` bits for an A field."""
    return math.ceil(field.width / DIGIT_BITS)


def n_b_digits(field: BitField) -> int:
    """int8 digits for a B field: a signed top digit holds up to 8 bits, the others
    :data:`DIGIT_BITS`."""
    if field.signed:
        return 1 + max(0, math.ceil((field.width - 8) / DIGIT_BITS))
    return math.ceil(field.width / DIGIT_BITS)


def a_digit_max(field: BitField, shift: int) -> int:
    """The largest value of the A digit at ``shift`` (field offset to unsigned)."""
    return min((1 << DIGIT_BITS) - 1, ((1 << field.width) - 1) >> shift)


# --------------------------------------------------------------------------- cost model

def term_cost(kernel: str, m: int, n: int, k: int, fa: BitField, fb: BitField) -> float:
    """Estimated seconds for one term with one kernel on one core."""
    if kernel == "popcount":
        return fa.width * fb.width * m * n * k / POPCOUNT_RATE
    prep = DIGIT_PREP_COST * k * (m * n_a_digits(fa) + n * n_b_digits(fb))
    return n_a_digits(fa) * n_b_digits(fb) * m * n * k / int8_rate(a_digit_max(fa, 0)) + prep


def choose_kernel(m: int, n: int, k: int, fa: BitField, fb: BitField) -> str:
    """The cheaper kernel for a term; ``MPILAYER_KERNEL=popcount|int8`` forces one (tests)."""
    forced = os.environ.get("MPILAYER_KERNEL")
    if forced:
        if forced not in KERNELS:
            raise ValueError(f"MPILAYER_KERNEL={forced!r}: expected one of {KERNELS}")
        return forced
    return min(KERNELS, key=lambda kern: term_cost(kern, m, n, k, fa, fb))


# --------------------------------------------------------------------------- terms

def resolution_terms(split: ComponentSplit, r: int, whole: bool = False):
    """The terms (A field, B field) whose products, shifted, make resolution r's increment.

    ``T_A(r) T_B(r) - T_A(r-1) T_B(r-1) = c_A(r) T_B(r) + T_A(r-1) c_B(r)`` (components c,
    truncated operands T), so resolution 0 has one term and every later one two. With
    ``whole``, the product ``T_A(r) T_B(r)`` itself as one term (it replaces the sum so far).
    """
    if r == 0:
        return [(split.component(0), split.component(0))]
    if whole:
        return [(split.truncated(r), split.truncated(r))]
    return [(split.component(r), split.truncated(r)), (split.truncated(r - 1), split.component(r))]


def predicted_seconds(terms, m: int, n: int, k: int) -> float:
    """Predicted seconds of ``terms``, each on its cheaper kernel (one core)."""
    return sum(term_cost(choose_kernel(m, n, k, fa, fb), m, n, k, fa, fb) for fa, fb in terms)


def whole_is_cheaper(split: ComponentSplit, r: int, m: int, n: int, k: int) -> bool:
    """Whether resolution r (>= 1) is cheaper as the whole product ``T_A(r) T_B(r)`` than as the
    increment's two terms: e.g. 8-bit fields on 8-bit kernel digits are one int8 product
    instead of two. The increment also costs resolution r-1 :data:`KEEP_ACC_S` per element of
    C (its accumulator must be kept). Same integers either way. ``MPILAYER_FULL_PRODUCTS=0/1``
    forces it (tests)."""
    forced = os.environ.get("MPILAYER_FULL_PRODUCTS")
    if r == 0 or forced == "0":
        return False
    if forced == "1":
        return True
    return (predicted_seconds(resolution_terms(split, r, True), m, n, k)
            < predicted_seconds(resolution_terms(split, r), m, n, k) + KEEP_ACC_S * m * n)


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
                    kernel: str, start=None, estimate=None):
    """``C += (A field fa [+ offset]) @ (B field fb) * 2**(fa.lo + fb.lo)`` exactly; the offset of
    the int8 kernel is left for :func:`term_correction`. With ``start = (src, col, outer)``
    (int64 ``m x n``, ``n`` and up to two pairs ``(u, v)``; None for zero), C is written instead,
    ``C = src + col[None, :] + sum outer(u, v) + the term``: the int8 kernel does it in its own
    pass over C (C is not read). ``estimate`` (with a start, of zeros on the binary-plane kernel;
    a term that is :func:`one_kernel_call`): C receives the published estimate of the result
    instead, written by the kernel (``int8_matmul_acc``/``popcount_matmul_acc``), whose sums are
    returned (None otherwise)."""
    m, n, k = a.length, b.length, a.k
    if m == 0 or n == 0:
        return
    zeros = start is not None and start[0] is None and start[1] is None and not start[2]
    if estimate is not None and not (start is not None and one_kernel_call(fa, fb, kernel)
                                     and (kernel == "int8" or zeros)):
        raise ValueError("estimate: one kernel call with a start (of zeros on the binary-plane kernel) only")
    if kernel == "popcount" and estimate is not None:  # one plane pair: C written, not read
        (pa,), (pb,) = a.planes_for(fa), b.planes_for(fb)
        return _kernels.popcount_matmul_acc(pa, pb, C, _plane_weight(fa.lo, fb.lo, a.bits), estimate=estimate)
    if kernel == "popcount" or (k == 0 and estimate is None):
        if start is not None:
            _fill_start(C, *start)
        if k == 0:
            return
        pa, pb = a.planes_for(fa), b.planes_for(fb)
        for i, p in enumerate(range(fa.lo, fa.hi)):
            for j, q in enumerate(range(fb.lo, fb.hi)):
                _kernels.popcount_matmul_acc(pa[i], pb[j], C, _plane_weight(p, q, a.bits))
        return
    xd, xs, _, _ = a.digits(fa)
    yd, ys, _, yb = b.digits(fb)
    base = fa.lo + fb.lo
    bias = sum(bias << sy for sy, bias in zip(ys, yb))
    # biased B digits: add bias * rowsum of what was multiplied on the left
    row = a.digit_row_sums(fa) * (bias << base) if bias else None
    for x, sx in zip(xd, xs):
        for y, sy in zip(yd, ys):
            first = None if start is None else (start[0], row, start[1], start[2])
            sums = _kernels.int8_matmul_acc(x, y, C, 1 << (base + sx + sy), a_digit_max(fa, sx), start=first,
                                            estimate=estimate)
            if start is not None:
                start, row = None, None  # taken in with the first digit product
    if row is not None:
        C += row[:, None]
    return sums


def _plane_weight(p: int, q: int, bits: int) -> int:
    """Weight of the product of planes p (of A) and q (of B) in two's complement of ``bits``
    bits: ``2**(p + q)``, negative when exactly one of them is the sign plane."""
    top = bits - 1
    return -(1 << (p + q)) if (p == top) != (q == top) else 1 << (p + q)


def one_kernel_call(fa: BitField, fb: BitField, kernel: str) -> bool:
    """Whether a term on ``kernel`` is one call: one digit a side (int8), one plane a side
    (popcount)."""
    if kernel == "popcount":
        return fa.width == 1 and fb.width == 1
    return kernel == "int8" and n_a_digits(fa) == 1 and n_b_digits(fb) == 1


def _fill_start(C: np.ndarray, src, col, outer=None) -> None:
    """``C = src + col[None, :] + sum outer(u, v)`` (None for zero), mod 2**64."""
    if src is None and col is None:
        C.fill(0)
    elif src is None:
        C[...] = col[None, :]
    elif col is None:
        np.copyto(C, src)
    else:
        np.add(src, col[None, :], out=C)
    for u, v in outer or ():
        C += np.multiply.outer(u, v)


def terms_bound(terms, k: int) -> int:
    """A bound on ``|sum of the terms' products|`` over k products: the sum over the terms of
    ``max|A field| * max|B field| * k * 2**(shifts)``."""
    total = 0
    for fa, fb in terms:
        total += (max(-fa.min_value, fa.max_value) * max(-fb.min_value, fb.max_value) * k) << (fa.lo + fb.lo)
    return total


def increment_bound(split: ComponentSplit, r: int, k: int) -> int:
    """A bound on ``|increment|`` of resolution r over k products (:func:`terms_bound` of its
    terms). Lets a worker send the increment as int32 when it fits (half the bytes of int64)."""
    return terms_bound(resolution_terms(split, r), k)


def add_terms(prev: np.ndarray | None, a: OperandBlock, b: OperandBlock, terms: list,
              kernel: str | None = None, out: np.ndarray | None = None, outer=None, estimate=None):
    """``prev`` plus the products of ``terms`` (``(A field, B field)`` pairs), as int64 in a new
    array, or in ``out`` (int64 ``m x n``, unit column stride; may be ``prev`` itself, updated in
    place). None means zeros. ``outer``: up to two int64 pairs ``(u, v)`` whose outer products are
    added too (e.g. the zero-point corrections of the exact product, estimates.exact_product).
    Returns ``(result, kernels used)``; with ``estimate`` (one term, :func:`accumulate_term`) the
    result holds the published estimate and ``(result, kernels, the estimate's sums)`` is returned.

    Copying ``prev`` and taking out the int8 kernel's offsets happen in the first term's own
    pass over C (:func:`accumulate_term`'s ``start``): a fresh array's pages are first touched
    there, and an ``out`` saves them (on a shared machine, faulting in a fresh 32 MB array costs
    about as much as writing it twice).
    """
    m, n, k = a.length, b.length, a.k
    kernels = [kernel or choose_kernel(m, n, k, fa, fb) for fa, fb in terms]
    correction = None
    for (fa, fb), kern in zip(terms, kernels):
        c = term_correction(a, fa, b, fb, kern)
        if c is not None:
            correction = c if correction is None else correction + c
    if out is None:
        out = np.empty((m, n), dtype=np.int64)
    start = (prev, None if correction is None else -correction, outer)
    if not terms:
        _fill_start(out, *start)
    if estimate is not None:
        if len(terms) != 1:
            raise ValueError("estimate: one term only")
        (fa, fb), = terms
        return out, tuple(kernels), accumulate_term(out, a, fa, b, fb, kernels[0], start, estimate)
    for (fa, fb), kern in zip(terms, kernels):
        accumulate_term(out, a, fa, b, fb, kern, start)
        start = None
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

    ``x`` is offset to ``u = x - min(x) >= 0``, cut into :data:`DIGIT_BITS`-bit digits for the
    int8 kernel, and the offset added back as ``min(x) * colsum(B field)`` (and biased B
    digits' ``bias * rowsum(u)``).
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
    yd, ys, _, yb = b.digits(fb)
    d = DIGIT_BITS
    for t in range(max(1, math.ceil(u_max.bit_length() / d))):
        digit = np.ascontiguousarray((u >> (d * t)) & ((1 << d) - 1), dtype=np.uint8)
        x_max = min((1 << d) - 1, u_max >> (d * t))
        for y, sy in zip(yd, ys):
            _kernels.int8_matmul_acc(digit, y, out, 1 << (d * t + sy), x_max)
    bias = sum(bias << sy for sy, bias in zip(ys, yb))
    if bias:
        out += (u.sum(axis=1) * bias)[:, None]
    if low:
        out += low * b.column_sums(fb)[None, :]
    return out


def add_coded_terms(a: CodedBlock, b: OperandBlock, terms: list) -> np.ndarray:
    """The products of ``terms`` with a parity block of A, summed and shifted, as int64."""
    out = np.zeros((a.length, b.length), dtype=np.int64)
    for fa, fb in terms:
        out += integer_matmul(a.field(fa), b, fb) << (fa.lo + fb.lo)
    return out
