"""Quantisation of operands to signed fixed point.

Integer operands whose values fit in ``bits`` are used as they are (scale 1). Real operands
(float32/float64) are mapped to ``q = rint(x / s)`` with the symmetric range
``|q| <= 2**(bits-1) - 1`` and ``s = max|x| / (2**(bits-1) - 1)``: per operand
(``scale="tensor"``), or per row of A and per column of B (``scale="axis"``), which keeps
rows or columns of very different magnitude accurate. ``-2**(bits-1)`` is never produced for
real input, so the range is symmetric and a sign flip cannot overflow.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpilayer.core.components import check_bits

REAL_DTYPES = (np.float32, np.float64)
INT_DTYPES = (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)
UNIT_ROUNDOFF = np.finfo(np.float64).eps / 2


@dataclass
class Quantized:
    """A quantised operand: ``x ~= scale * values`` (scale broadcast along ``axis``)."""

    values: np.ndarray  # int8 for bits <= 8, else int16; C-contiguous
    bits: int
    scale: np.ndarray | None  # None for integer input; shape () or (n,) for per-row/col
    axis: int | None  # axis along which `scale` varies (0: rows, 1: columns), None if scalar

    @property
    def is_real(self) -> bool:
        return self.scale is not None


def storage_dtype(bits: int):
    return np.int8 if bits <= 8 else np.int16


def check_operand(x, name: str) -> np.ndarray:
    """Validate an operand's type and shape; return it as a 2-D ndarray (no copy if possible)."""
    if not isinstance(x, np.ndarray):
        if isinstance(x, (list, tuple)):
            x = np.asarray(x)
        else:
            raise TypeError(f"{name} must be a 2-D numpy array, not {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {x.shape}")
    if x.dtype.type not in REAL_DTYPES + INT_DTYPES:
        raise TypeError(
            f"{name} has unsupported dtype {x.dtype}: use float32, float64 or an integer type"
        )
    return x


def integer_range_error(name: str, lo: int, hi: int, bits: int) -> str | None:
    """The message for integer values that do not fit ``bits``, or None if they fit."""
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if lo >= qmin and hi <= qmax:
        return None
    need = _bits_needed(lo, hi)
    return (
        f"{name} has integer values in [{lo}, {hi}], which do not fit bits={bits} "
        f"(range [{qmin}, {qmax}]); pass bits={need} or more"
    )


def _bits_needed(lo: int, hi: int) -> int:
    """Smallest b with -2**(b-1) <= lo and hi <= 2**(b-1) - 1."""
    b = 2
    while not (-(1 << (b - 1)) <= lo and hi <= (1 << (b - 1)) - 1):
        b += 1
    return b


def real_scale(x: np.ndarray, bits: int, axis: int | None, name: str) -> np.ndarray:
    """Scale(s) that map max|x| (per operand, or per row/column) to ``2**(bits-1) - 1``.

    An all-zero row/column/operand gets scale 1 (its values quantise to 0 exactly).
    """
    if not np.all(np.isfinite(x)):
        bad = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(f"{name} has NaN or Inf at row {bad[0]}, column {bad[1]}")
    if x.size == 0:
        amax = np.zeros(() if axis is None else (x.shape[0] if axis == 0 else x.shape[1],))
    elif axis is None:
        amax = np.max(np.abs(x))
    else:
        amax = np.max(np.abs(x), axis=1 - axis)
    return scale_for(amax, bits)


def scale_for(amax, bits: int) -> np.ndarray:
    """The max-abs scale(s) ``amax / (2**(bits-1) - 1)``; 1 where ``amax`` is 0 (the values are
    all zero and quantise to 0 exactly)."""
    amax = np.asarray(amax, dtype=np.float64)
    return np.where(amax > 0, amax / ((1 << (bits - 1)) - 1), 1.0)


def quantize(x, bits: int = 8, name: str = "A", axis: int | None = None) -> Quantized:
    """Quantise one operand to signed ``bits``-bit integers.

    Parameters
    ----------
    x : 2-D array, float32/float64 or integer
    bits : total bits, 2..16
    name : operand name used in error messages
    axis : for real input, 0 to scale each row separately, 1 for each column, None for one scale

    Raises
    ------
    TypeError for an unsupported dtype; ValueError for NaN/Inf, integer values that do not
    fit ``bits``, or a bad shape.
    """
    bits = check_bits(bits)
    x = check_operand(x, name)
    dtype = storage_dtype(bits)
    if x.dtype.type in INT_DTYPES:
        if x.size:
            lo, hi = int(x.min()), int(x.max())
            msg = integer_range_error(name, lo, hi, bits)
            if msg:
                raise ValueError(msg)
        return Quantized(np.ascontiguousarray(x, dtype=dtype), bits, None, None)
    scale = real_scale(x, bits, axis, name)
    s = scale if axis is None else (scale[:, None] if axis == 0 else scale[None, :])
    return Quantized(quantize_real_block(x, s, bits), bits, scale, axis)


def quantize_real_block(x: np.ndarray, s, bits: int) -> np.ndarray:
    """``clip(rint(x / s))`` as int8/int16; ``s`` broadcasts against ``x``. Shared by the
    single-process product and the MPI master so that both quantise bit-identically."""
    q = np.rint(x / s)
    qmax = (1 << (bits - 1)) - 1
    np.clip(q, -qmax, qmax, out=q)
    return np.ascontiguousarray(q, dtype=storage_dtype(bits))


def scale_vectors(qa: Quantized, qb: Quantized, m: int, n: int):
    """Per-row scale of A and per-column scale of B as float64 vectors (ones for integers)."""
    return _as_vector(qa, m), _as_vector(qb, n)


def _as_vector(q: Quantized, length: int) -> np.ndarray:
    if q.scale is None:
        return np.ones(length)
    return np.broadcast_to(np.asarray(q.scale, dtype=np.float64), (length,))


def quantization_error_bound(x_a, x_b, qa: Quantized, qb: Quantized) -> float:
    """Certified bound on ``max |A @ B - dequantised(A) @ dequantised(B)|`` for real inputs.

    With ``a = s_a*qa + e_a`` and ``|e_a| <= s_a/2`` (round to nearest), likewise b:
    ``ab - (s_a qa)(s_b qb) = e_a b + (s_a qa) e_b``, so element (i, j) is at most
    ``s_a[i]/2 * sum_k |b_kj| + s_b[j]/2 * sum_k |s_a[i] qa_ik|``. The sums are taken in
    float64 and inflated by a relative ``4 k u`` to cover their rounding (u: unit roundoff).
    Zero for integer inputs.
    """
    if not (qa.is_real or qb.is_real):
        return 0.0
    m, k = qa.values.shape
    n = qb.values.shape[1]
    if m == 0 or n == 0 or k == 0:
        return 0.0
    sa, sb = scale_vectors(qa, qb, m, n)
    half_a = sa / 2 if qa.is_real else np.zeros(m)
    half_b = sb / 2 if qb.is_real else np.zeros(n)
    b_l1 = np.abs(np.asarray(x_b, dtype=np.float64)).sum(axis=0)  # (n,)
    a_deq_l1 = np.abs(qa.values.astype(np.float64)).sum(axis=1) * sa  # (m,)
    return bound_from_norms(half_a, b_l1, half_b, a_deq_l1, k)


def bound_from_norms(half_a, b_l1, half_b, a_deq_l1, k: int) -> float:
    """:func:`quantization_error_bound` from its per-row / per-column parts (``s_a/2``,
    ``sum_k |b_kj|``, ``s_b/2``, ``sum_k |s_a qa_ik|``), which a blockwise reader accumulates
    in its pass over the inputs. Each e_a term pairs row i's half scale with column j's l1
    norm, so the maximum over (i, j) is at most the sum of the two products of maxima."""
    top = lambda v: float(np.max(v)) if np.size(v) else 0.0  # noqa: E731
    term1 = top(half_a) * top(b_l1)
    term2 = top(half_b) * top(a_deq_l1)
    return float((term1 + term2) * (1 + 4 * (k + 2) * UNIT_ROUNDOFF))


def relative_error_estimate(sa_sq_sum: float, b_fro_sq: float, sb_sq_sum: float, a_fro_sq: float,
                            c_fro_sq: float) -> float:
    """Statistical (not certified) ``|A B - C|_F / |C|_F`` of the exact product C of the
    quantised operands against the real one: rounding errors independent and uniform on
    ``[-s/2, s/2]`` give ``E|e_A B|_F^2 = sum_i s_ai^2 / 12 * |B|_F^2`` and likewise for B (the
    ``e_A e_B`` term is of second order). Arguments in the inputs' units: ``sa_sq_sum = sum_i
    s_ai^2`` over the rows of A (0 for an integer A), ``b_fro_sq = |B|_F^2``, the same for B's
    columns and A, and ``c_fro_sq = |C|_F^2``."""
    if c_fro_sq <= 0:
        return 0.0
    return float(np.sqrt((sa_sq_sum * b_fro_sq + sb_sq_sum * a_fro_sq) / 12.0 / c_fro_sq))
