"""Exact coded redundancy over row blocks of A (``--code parity|parity:K|mds:N,K``).

A resolution's increment is linear in A's bit fields (products.resolution_terms), so a worker
given the integer combination ``sum_i g_i A_i`` of K row blocks returns ``sum_i g_i (A_i B)``
of their increments -- exactly, since every quantity is an integer.

The code is systematic. A *code group* is K row blocks of A at one tile column, k-panel and
resolution: its K ordinary mini-jobs are code rows 0..K-1, and its N-K *parity jobs* are rows
K..N-1, parity row j (0-based) multiplying ``sum_i (j+1)**i A_i``. The parity matrix
``P[j][i] = (j+1)**i`` is a Vandermonde matrix on the positive nodes 1, 2, ..., which is
totally positive (every minor is positive), so every square submatrix of P is invertible and
``[I; P]`` is MDS over the rationals: any K of the N results determine the K increments.
Decoding solves that small system with integer arithmetic (adjugate and determinant, exact
division), so nothing is rounded, unlike real-valued coded computing. ``parity`` is the
case N = K+1: one all-ones row, and a missing block is the parity result minus the others.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from mpilayer.core.components import BitField

MAX_N = 32  # code rows at most (parity coefficients grow as (N-K)**(K-1))
INT64_SAFE = 2**62


@dataclass(frozen=True)
class Code:
    """A systematic ``(n, k)`` code over row blocks of A."""

    n: int
    k: int

    def __post_init__(self):
        if not 1 <= self.k < self.n:
            raise ValueError(f"need 1 <= K < N, not N={self.n}, K={self.k}")
        if self.n > MAX_N:
            raise ValueError(f"N={self.n} is above the limit of {MAX_N} code rows")

    @property
    def spec(self) -> str:
        return "parity:%d" % self.k if self.n == self.k + 1 else f"mds:{self.n},{self.k}"

    def row(self, code_row: int) -> tuple:
        """Coefficients of code row ``code_row`` on the K blocks: a unit vector for a systematic
        row, ``(j+1)**i`` for parity row ``j = code_row - K``."""
        if code_row < self.k:
            return tuple(int(i == code_row) for i in range(self.k))
        node = code_row - self.k + 1
        return tuple(node ** i for i in range(self.k))

    def coefficient_sum(self, code_row: int) -> int:
        """``sum_i |g_i|`` of a row: how much wider than one block's values its combination is."""
        return sum(abs(c) for c in self.row(code_row))

    def coded_range(self, code_row: int, field: BitField) -> tuple:
        """``(lo, hi)`` of a row's combination of ``field`` values (coefficients are positive)."""
        total = self.coefficient_sum(code_row)
        return field.min_value * total, field.max_value * total

    def decode(self, results: dict, bound: int) -> dict:
        """The increments of the systematic rows missing from ``results`` (code row -> integer
        array, at least K rows), exactly; ``bound`` bounds ``|entry|`` of any block's increment.

        Uses the first parity rows available, one per missing block. Computes in int64 when the
        bound shows no intermediate can overflow, else in Python integers (object arrays). It is
        not an integrity check: wrong results are caught (ArithmeticError) only when they make
        a quotient inexact, and extra parity rows are not compared.
        """
        missing = [i for i in range(self.k) if i not in results]
        if not missing:
            return {}
        parity = [j for j in sorted(results) if j >= self.k][:len(missing)]
        if len(parity) < len(missing):
            raise ValueError(f"{len(results)} of {self.n} results: decoding needs {self.k}")
        det, adj = det_adjugate([[self.row(j)[i] for i in missing] for j in parity])
        widest = max(self.coefficient_sum(j) for j in parity)
        largest_adj = max(sum(abs(x) for x in row) for row in adj)
        exact_in_int64 = 2 * widest * bound * largest_adj < INT64_SAFE
        dtype = np.int64 if exact_in_int64 else object
        known = [i for i in range(self.k) if i in results]
        residuals = []  # parity result minus the known blocks' share: the missing blocks' share
        for j in parity:
            coeffs = self.row(j)
            res = np.array(results[j], dtype=dtype)
            for i in known:
                res -= coeffs[i] * np.asarray(results[i], dtype=dtype)
            residuals.append(res)
        out = {}
        for a, i in enumerate(missing):
            total = sum(adj[a][b] * residuals[b] for b in range(len(parity)))
            quotient = total // det  # (no np.divmod: it has no loop for Python integers)
            if np.any(total - quotient * det != 0):
                raise ArithmeticError(f"decoding block {i}: the results are inconsistent (not divisible "
                                      f"by the determinant {det})")
            out[i] = np.asarray(quotient).astype(np.int64)
        return out


def det_adjugate(matrix: list) -> tuple:
    """``(det, adj)`` of a square integer matrix, exactly: ``adj @ matrix == det * I``.

    Gauss-Jordan elimination on fractions; the matrices are tiny (one row per missing block).
    Raises ValueError if the matrix is singular.
    """
    n = len(matrix)
    work = [[Fraction(x) for x in row] + [Fraction(int(i == j)) for j in range(n)]
            for i, row in enumerate(matrix)]
    det = Fraction(1)
    for col in range(n):
        pivot = next((r for r in range(col, n) if work[r][col] != 0), None)
        if pivot is None:
            raise ValueError("singular matrix")
        if pivot != col:
            work[col], work[pivot] = work[pivot], work[col]
            det = -det
        p = work[col][col]
        det *= p
        work[col] = [x / p for x in work[col]]
        for r in range(n):
            if r != col and work[r][col] != 0:
                f = work[r][col]
                work[r] = [x - f * y for x, y in zip(work[r], work[col])]
    adj = [[det * x for x in row[n:]] for row in work]
    assert det.denominator == 1 and all(x.denominator == 1 for row in adj for x in row)
    return int(det), [[int(x) for x in row] for row in adj]


def parse_code(text: str, workers: int) -> Code | None:
    """``none``, ``parity`` (N = the number of workers, K = N-1), ``parity:K`` or ``mds:N,K``;
    ValueError with a one-line message otherwise."""
    text = text.strip()
    usage = f"--code {text}: expected none, parity, parity:K or mds:N,K (e.g. mds:5,3)"
    if text == "none":
        return None
    if text == "parity":
        if workers < 2:
            raise ValueError(f"--code parity takes N = the worker ranks ({workers}), which must be >= 2")
        return Code(workers, workers - 1)
    match = re.fullmatch(r"parity:(\d+)|mds:(\d+),(\d+)", text)
    if match is None:
        raise ValueError(usage)
    n, k = (int(match[1]) + 1, int(match[1])) if match[1] else (int(match[2]), int(match[3]))
    try:
        return Code(n, k)
    except ValueError as err:
        raise ValueError(f"--code {text}: {err}") from None


def field_values(q: np.ndarray, field: BitField) -> np.ndarray:
    """The integer value of ``field`` for every element of a quantised block, as int64."""
    v = q.astype(np.int64)
    if field.signed:
        return v >> field.lo
    return (v >> field.lo) & ((1 << field.width) - 1)


def smallest_int_dtype(lo: int, hi: int):
    """The narrowest signed numpy integer type holding ``[lo, hi]``."""
    for dtype in (np.int8, np.int16, np.int32, np.int64):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return dtype
    raise ValueError(f"range [{lo}, {hi}] does not fit int64")
