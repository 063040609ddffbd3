"""Certified error bounds of a resolution's estimate.

At resolution r both operands are truncated to their top r+1 components; the dropped parts
``dA = A - T_A`` and ``dB = B - T_B`` lie elementwise in ``[0, delta]`` with
``delta = 2**shift_r - 1`` (see components.py). The error of the estimate ``T_A @ T_B`` is

    E = A @ B - T_A @ T_B = dA @ B + T_A @ dB          (decomposition 1)
                          = A @ dB + dA @ T_B          (decomposition 2)

Because each dropped value is in ``[0, delta]``, ``sum_k dA_ik B_kj`` lies in
``[delta * neg(B)_j, delta * pos(B)_j]`` where ``pos``/``neg`` sum the positive/negative
entries of a column; likewise for the other term. So every E_ij lies in
``[delta*(neg(T_A)_i + neg(B)_j), delta*(pos(T_A)_i + pos(B)_j)]`` and in the same interval
of decomposition 2; both hold, so their intersection does too. The scalar bound is the
largest |E_ij| either decomposition allows (the smaller of the two). It depends only on
row/column sums and costs O(mk + kn). Each of the two terms is bounded by its own worst case
over dropped bits in ``[0, delta]`` (set wherever the other operand is positive, or
negative); the two worst cases are taken separately, so the sum may not be reached.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SideSums:
    """Sums along k of the positive and of the negative entries of one operand block."""

    pos: np.ndarray  # int64, one per row of A or column of B
    neg: np.ndarray  # int64, <= 0

    @classmethod
    def empty(cls, length: int) -> "SideSums":
        z = np.zeros(length, dtype=np.int64)
        return cls(z, z)


def float_up(x: int) -> float:
    """The smallest float >= the integer x (float(x) may round down above 2**53)."""
    f = float(x)
    return f if f >= x else math.nextafter(f, math.inf)


def _separable_max(delta: int, sa, row: SideSums, sb, col: SideSums) -> float:
    """Upper bound of ``max_ij delta*sa_i*sb_j*max(row.pos_i + col.pos_j, -(row.neg_i + col.neg_j))``."""
    if row.pos.size == 0 or col.pos.size == 0 or delta == 0:
        return 0.0
    if sa is None:  # integer units: exact maximum of a separable sum
        hi = int(row.pos.max()) + int(col.pos.max())
        lo = -(int(row.neg.min()) + int(col.neg.min()))
        return float_up(delta * max(hi, lo))
    # real units, sa/sb > 0: max_ij sa_i sb_j (x_i + y_j) <= max(sa x) max(sb) + max(sa) max(sb y)
    hi = np.max(sa * row.pos) * np.max(sb) + np.max(sa) * np.max(sb * col.pos)
    lo = np.max(sa * -row.neg) * np.max(sb) + np.max(sa) * np.max(sb * -col.neg)
    return float(delta * max(hi, lo))


def truncation_bound(delta: int, a_full: SideSums, a_trunc: SideSums, b_full: SideSums,
                     b_trunc: SideSums, sa=None, sb=None) -> float:
    """Certified ``max_ij |E_ij|`` (times ``sa_i * sb_j`` when scales are given).

    ``a_*`` are row sums of A's block, ``b_*`` column sums of B's block; ``*_full`` of the
    exact operand, ``*_trunc`` of the operand truncated at this resolution.
    """
    b1 = _separable_max(delta, sa, a_trunc, sb, b_full)
    b2 = _separable_max(delta, sa, a_full, sb, b_trunc)
    return min(b1, b2)


def error_interval(delta: int, a_full: SideSums, a_trunc: SideSums, b_full: SideSums,
                   b_trunc: SideSums):
    """Elementwise ``(lo, hi)`` int64 arrays with ``lo <= exact - estimate <= hi`` (integer units)."""
    d = np.int64(delta)
    lo1 = d * (a_trunc.neg[:, None] + b_full.neg[None, :])
    lo2 = d * (a_full.neg[:, None] + b_trunc.neg[None, :])
    hi1 = d * (a_trunc.pos[:, None] + b_full.pos[None, :])
    hi2 = d * (a_full.pos[:, None] + b_trunc.pos[None, :])
    return np.maximum(lo1, lo2), np.minimum(hi1, hi2)
