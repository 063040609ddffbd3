"""Adaptive resolution: stop refining the rows of a product whose decision is already certain.

A *decision rule* looks at one row (item) of the output ``C = A @ B`` at a time. After each
resolution r of the layered product, every element of an unsettled row has a certified
interval ``lo <= exact <= hi`` around its estimate (bounds.py); the rule says, per row, whether
the interval (estimates.py) already fixes the decision that the **exact** product (the final resolution)
would give. Settled rows stop receiving work: the next resolutions are computed only for the
rows of A still unsettled (the A operand is sliced; B and its cached planes/digits are kept).

Rules (exact decisions, and how ties are resolved consistently with them):

* :func:`threshold` ``(t)``: the decision of element j is ``C_ij >= t_j`` (``t`` a scalar or one
  value per column). Settled when every element's interval lies on one side:
  ``lo >= t`` (certainly True) or ``hi < t`` (certainly False). An exact value equal to ``t`` is
  True, and an interval ``[.., t]`` with ``hi == t`` is *not* settled unless ``lo >= t`` too.
* :func:`top1` ``()``: the decision is ``argmax_j C_ij``, ties going to the **lowest** index
  (``numpy.argmax``). With ``c`` the first argmax of ``lo``, the row is settled when
  ``lo_c > hi_j`` for every ``j < c`` and ``lo_c >= hi_j`` for every ``j > c``: then ``c`` wins
  against every lower index strictly and against every higher index at least by the tie
  rule, whatever the exact values in the intervals. (If any column satisfies this, ``c`` does.)
* :func:`callback` ``(fn)``: ``fn(estimate_rows, lo_rows, hi_rows) -> bool mask of settled rows``
  supplied by the user (its soundness is the user's); optionally ``decide`` to turn rows into
  decisions, otherwise the decision of a row is its estimate at settling time.

At the final resolution ``lo == hi == exact``, so every rule settles every row there and its
decision is the exact one: a row never stops with a decision that differs from the exact
product's, and every row settles at the latest at the last resolution.

Units. For integer operands everything is int64 and exact. For real operands the final
resolution's value is ``fl(fl(acc * sa_i) * sb_j)`` (layered.scaled_estimate) of the exact
integer accumulator ``acc``; that map is monotone non-decreasing in ``acc`` (positive scales,
round-to-nearest), so the integer interval ``[acc_lo, acc_hi]`` maps to a float interval that
contains the final value *exactly*, with no rounding allowance needed.

Work. Each term is charged with the project's kernel cost model (products.term_cost, one core,
kernel chosen as the product chooses it) and counted in MACs; the result compares the work
done with the same layered product run to the final resolution for all rows, and with the
one-shot exact product (one full-width term).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from mpilayer.core.bounds import error_interval
from mpilayer.core.components import ComponentSplit
from mpilayer.core.layered import prepare, scaled_estimate
from mpilayer.core.products import (OperandBlock, add_terms, choose_kernel, predicted_seconds, resolution_terms,
                                    term_cost)

__all__ = ["Rule", "Threshold", "Top1", "Callback", "threshold", "top1", "callback",
           "AdaptiveResult", "adaptive_matmul", "integer_interval", "one_shot_cost"]


# --------------------------------------------------------------------------- rules

class Rule:
    """A per-row decision on the output; subclasses define :meth:`settled` and :meth:`decide`."""

    name = "rule"

    def settled(self, estimate: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Bool mask (one per row): is the exact row's decision fixed by ``lo <= exact <= hi``?"""
        raise NotImplementedError

    def decide(self, estimate: np.ndarray, lo: np.ndarray, hi: np.ndarray):
        """The decisions of rows already settled (only called on those)."""
        raise NotImplementedError

    def exact(self, C: np.ndarray):
        """The decisions of the exact output ``C`` (every row is settled when lo = hi = C)."""
        return self.decide(C, C, C)


class Threshold(Rule):
    """Elementwise ``C_ij >= t_j``; see the module docstring."""

    name = "threshold"

    def __init__(self, t):
        t = np.asarray(t)
        if t.ndim > 1:
            raise ValueError(f"threshold t must be a scalar or one value per column, got shape {t.shape}")
        if t.dtype.kind == "f" and not np.all(np.isfinite(t)):
            raise ValueError("threshold t must be finite")
        self.t = t

    def settled(self, estimate, lo, hi):
        return np.all((lo >= self.t) | (hi < self.t), axis=1)

    def decide(self, estimate, lo, hi):
        return lo >= self.t


class Top1(Rule):
    """Row argmax, ties to the lowest index; see the module docstring."""

    name = "top1"

    def settled(self, estimate, lo, hi):
        m, n = lo.shape
        if n == 0:
            raise ValueError("top1 needs at least one column")
        c = np.argmax(lo, axis=1)
        best = lo[np.arange(m), c][:, None]
        before = np.arange(n)[None, :] < c[:, None]
        ok = np.where(before, hi < best, hi <= best)
        ok[np.arange(m), c] = True
        return ok.all(axis=1)

    def decide(self, estimate, lo, hi):
        return np.argmax(lo, axis=1)


class Callback(Rule):
    """A user rule: ``settled_fn(estimate_rows, lo_rows, hi_rows) -> bool mask``."""

    name = "callback"

    def __init__(self, settled_fn: Callable, decide: Callable | None = None):
        self.fn, self.decide_fn = settled_fn, decide

    def settled(self, estimate, lo, hi):
        mask = np.asarray(self.fn(estimate, lo, hi), dtype=bool)
        if mask.shape != (lo.shape[0],):
            raise ValueError(f"rule callback must return one bool per row ({lo.shape[0]}), got shape {mask.shape}")
        return mask

    def decide(self, estimate, lo, hi):
        if self.decide_fn is None:
            return estimate.copy()
        return self.decide_fn(estimate, lo, hi)


def threshold(t) -> Threshold:
    """Rule: the sign of every output against ``t`` (decision ``C >= t``)."""
    return Threshold(t)


def top1() -> Top1:
    """Rule: the argmax of each row (lowest index on ties)."""
    return Top1()


def callback(settled_fn: Callable, decide: Callable | None = None) -> Callback:
    """Rule from a function ``(estimate_rows, lo_rows, hi_rows) -> bool mask of settled rows``."""
    return Callback(settled_fn, decide)


def as_rule(rule) -> Rule:
    if isinstance(rule, Rule):
        return rule
    if callable(rule):
        return Callback(rule)
    raise TypeError(f"rule must be a Rule (threshold(t), top1()) or a callable, not {type(rule).__name__}")


# --------------------------------------------------------------------------- bounds and costs

def integer_interval(split: ComponentSplit, r: int, a: OperandBlock, b: OperandBlock):
    """``(lo, hi)`` int64 with ``lo <= exact - estimate <= hi`` for resolution r of ``a @ b``
    (both operands truncated to their top r+1 components; bounds.error_interval)."""
    delta = split.max_dropped(r)
    if delta == 0:
        shape = (a.length, b.length)
        return np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64)
    s = split.shift(r)
    return error_interval(delta, a.side_sums(0), a.side_sums(s), b.side_sums(0), b.side_sums(s))


def terms_cost(m: int, n: int, k: int, terms, kernels) -> tuple:
    """``(model seconds, MACs)`` of computing ``terms`` with ``kernels`` on ``m`` rows."""
    seconds = sum(term_cost(kern, m, n, k, fa, fb) for (fa, fb), kern in zip(terms, kernels))
    return seconds, m * n * k * len(terms)


def one_shot_cost(m: int, n: int, k: int, split: ComponentSplit) -> float:
    """Model seconds of the exact product in one full-width term (the one-shot product)."""
    full = split.truncated(split.n_resolutions - 1)
    return predicted_seconds([(full, full)], m, n, k)


# --------------------------------------------------------------------------- driver

@dataclass
class AdaptiveResult:
    """What :func:`adaptive_matmul` returns.

    Attributes
    ----------
    decisions : the rule's decision per row, equal to its decision on the exact product
        (top1: int64 (m,); threshold: bool (m, n); callback: what ``decide`` returns, stacked,
        by default the row's estimate at settling time)
    resolution : int64 (m,), the resolution at which each row settled (0-based)
    resolutions_total : number of resolutions of the product
    estimate, lo, hi : (m, n) each row's estimate and certified interval of the exact output
        when it settled (int64 for integer inputs, float64 in the inputs' scale for real ones)
    active : rows computed at each resolution
    work_s, macs : per resolution, the kernel cost-model seconds and MACs actually spent
    full_work_s, full_macs : the same for every row through every resolution (no stopping)
    one_shot_work_s : model seconds of the exact product as one full-width term
    elapsed_s : wall seconds at the end of each resolution
    """

    decisions: object
    resolution: np.ndarray
    resolutions_total: int
    estimate: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    active: list = field(default_factory=list)
    work_s: list = field(default_factory=list)
    macs: list = field(default_factory=list)
    full_work_s: list = field(default_factory=list)
    full_macs: list = field(default_factory=list)
    one_shot_work_s: float = 0.0
    elapsed_s: list = field(default_factory=list)

    @property
    def work_fraction(self) -> float:
        """Work done / work of the layered product to the final resolution for all rows."""
        total = sum(self.full_work_s)
        return sum(self.work_s) / total if total else 0.0

    @property
    def settled_fraction(self) -> np.ndarray:
        """Cumulative fraction of rows settled after each resolution."""
        m = len(self.resolution)
        counts = np.bincount(self.resolution, minlength=self.resolutions_total)
        return np.cumsum(counts) / m if m else np.ones(self.resolutions_total)


def adaptive_matmul(A, B, rule, bits: int = 8, component_bits: Sequence[int] | int | None = None,
                    scale: str = "tensor", kernel: str | None = None) -> AdaptiveResult:
    """Layered ``A @ B`` that stops refining each row as soon as ``rule`` settles it.

    Parameters
    ----------
    A, B : 2-D arrays, as for :func:`mpilayer.layered_matmul` (rows of A are the items)
    rule : :func:`threshold` ``(t)``, :func:`top1` ``()``, a :class:`Rule`, or a callable
        ``(estimate_rows, lo_rows, hi_rows) -> bool mask of settled rows``
    bits, component_bits, scale, kernel : as for :func:`mpilayer.layered_matmul`

    Returns
    -------
    AdaptiveResult
        Per-row decisions (always equal to the rule's decisions on the exact product of the
        quantised operands), the resolution at which each row settled, and the work spent
        against the work of computing every row to the final resolution.
    """
    rule = as_rule(rule)
    start = time.perf_counter()
    product, _ = prepare(A, B, bits, component_bits, scale, kernel)
    split, qa = product.split, product.qa
    m, k = qa.values.shape
    n = product.qb.values.shape[1]
    R = split.n_resolutions
    real = product.sa is not None
    out_dtype = np.float64 if real else np.int64
    res = AdaptiveResult(None, np.full(m, -1, dtype=np.int64), R, np.zeros((m, n), out_dtype),
                         np.zeros((m, n), out_dtype), np.zeros((m, n), out_dtype),
                         one_shot_work_s=one_shot_cost(m, n, k, split))
    decisions = [None] * m
    b = product.b
    rows = np.arange(m)
    a = product.a  # q - z (estimates.py)
    acc = None
    for r in range(R):
        terms = resolution_terms(split, r)
        acc, kernels = add_terms(acc, a, b, terms, kernel)
        seconds, macs = terms_cost(len(rows), n, k, terms, kernels)
        full_kernels = kernels if len(rows) == m else [kernel or choose_kernel(m, n, k, fa, fb) for fa, fb in terms]
        full_seconds, full_macs = terms_cost(m, n, k, terms, full_kernels)
        res.active.append(len(rows))
        res.work_s.append(seconds)
        res.macs.append(macs)
        res.full_work_s.append(full_seconds)
        res.full_macs.append(full_macs)
        te = product.tile(r, rows, acc)  # estimate and certified integer interval (estimates.py)
        sa, sb = (product.sa[rows], product.sb) if real else (None, None)
        est, lo, hi = scaled_estimate(te.estimate, sa, sb), scaled_estimate(te.lo, sa, sb), scaled_estimate(te.hi, sa, sb)
        done = np.ones(len(rows), dtype=bool) if r == R - 1 else rule.settled(est, lo, hi)
        if done.any():
            idx = rows[done]
            res.resolution[idx] = r
            res.estimate[idx], res.lo[idx], res.hi[idx] = est[done], lo[done], hi[done]
            for i, d in zip(idx, rule.decide(est[done], lo[done], hi[done])):
                decisions[i] = d
        res.elapsed_s.append(time.perf_counter() - start)
        if r == R - 1 or done.all():
            break
        if done.any():
            keep = ~done
            rows, acc = rows[keep], acc[keep]
            a = OperandBlock(product.a.values[rows], "A", bits)
    for r in range(len(res.work_s), R):  # every row settled early: nothing more is computed
        terms = resolution_terms(split, r)
        full_kernels = [kernel or choose_kernel(m, n, k, fa, fb) for fa, fb in terms]
        full_seconds, full_macs = terms_cost(m, n, k, terms, full_kernels)
        res.active.append(0)
        res.work_s.append(0.0)
        res.macs.append(0)
        res.full_work_s.append(full_seconds)
        res.full_macs.append(full_macs)
        res.elapsed_s.append(res.elapsed_s[-1])
    res.decisions = _stack(decisions, rule, m, n)
    return res


def _stack(decisions: list, rule: Rule, m: int, n: int):
    if isinstance(rule, Top1):
        return np.array(decisions, dtype=np.int64).reshape(m)
    if isinstance(rule, Threshold):
        return np.array(decisions, dtype=bool).reshape(m, n)
    try:
        return np.array(decisions)
    except ValueError:
        return decisions
