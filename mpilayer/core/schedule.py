"""The default schedule (``component_bits="auto"``): accuracy per cost on the machine it runs on.

The first resolution should come early and be informative. Its cost is predicted with the
kernel cost model (products.predicted_seconds, rates of the kernel paths this CPU dispatches
to; the whole product where it is cheaper than the increment, products.whole_is_cheaper) plus
the estimate's O(mn) pass and the operands' statistics, which every first resolution pays
whatever its width. Every extra bit roughly halves the first resolution's error
(estimates.py), so the first component is the widest (short of all the bits: one resolution
would not be layered) whose extra cost over the narrowest (1-bit) first resolution stays within
``budget`` times the larger of a one-shot float64 product of the same shape
(:func:`float64_rate`) and that narrowest first resolution: on large products the budget is a
share of the float64 time; on small ones, where the fixed per-element work dominates, a share
of what a first resolution costs anyway. The remaining bits are then split into the components
that make the whole layered product cheapest.
"""
from __future__ import annotations

import functools
import os

from mpilayer import _kernels
from mpilayer.core import products
from mpilayer.core.components import ComponentSplit, check_bits
from mpilayer.core.products import predicted_seconds, resolution_terms, whole_is_cheaper

DEFAULT_BUDGET = 0.15  # first resolution's predicted time / one-shot float64 product's
FLOAT64_RATES = {"avx512": 24e9, "avx2": 19e9}  # numpy float64 matmul, one core (measured)
# Seconds per element, measured on one core of an AVX-512 Xeon (2026-11-30, int8 n = 1024 and
# 2048, schedule 7+1, CPU time, best of 5, with the machine shared: load 5-9 on 2 cores): a
# coarse resolution's per-element work beside the kernel and the digits (per element of C: the
# first touch of a fresh accumulator and the estimate's pass, 2.9-4.9 ns; the offset
# correction rides in the kernel's pass and, before a whole product, the estimate is written
# over the accumulator) and the operands' statistics (zero points and the per-line sums of
# estimates.SideStats, per element of A and of B: 1.35-1.47 ns).
ESTIMATE_S, STATS_S = 4.0e-9, 1.4e-9


_AVX512 = bool(_kernels.cpu_features().get("avx512"))


def float64_rate() -> float:
    """Rate (MAC/s) of a one-shot float64 product on one core of this CPU, as numpy's BLAS
    reached it in ``mpilayer bench kernels`` (README, Performance): a constant per ISA rather
    than a measurement at start-up, so that the schedule does not depend on the load."""
    return FLOAT64_RATES["avx512"] if _AVX512 else FLOAT64_RATES["avx2"]


def schedule_cost(split: ComponentSplit, m: int, n: int, k: int, overheads: bool = True) -> list:
    """Predicted seconds of each resolution of ``split`` (cheaper kernel per term), with (unless
    ``overheads`` is False) the estimate of every coarse resolution and, in the first, the
    operands' statistics.""" 
    out = []
    for r in range(split.n_resolutions):
        seconds = predicted_seconds(resolution_terms(split, r, whole_is_cheaper(split, r, m, n, k)), m, n, k)
        if overheads and r < split.n_resolutions - 1:
            seconds += ESTIMATE_S * m * n
        if overheads and r == 0:
            seconds += STATS_S * k * (m + n)
        out.append(seconds)
    return out


def _cheapest_rest(bits: int, first: int, m: int, n: int, k: int) -> tuple:
    """The split starting with ``first`` whose total predicted cost is lowest (equal widths
    after the first; ties to more resolutions)."""
    rest = bits - first
    if rest == 0:
        return (first,)
    best = None
    for w in range(1, rest + 1):
        widths = (first,) + (w,) * (rest // w) + ((rest % w,) if rest % w else ())
        total = sum(schedule_cost(ComponentSplit(bits, widths), m, n, k))
        key = (round(total, 12), -len(widths))
        if best is None or key < best[0]:
            best = (key, widths)
    return best[1]


def auto_component_bits(bits: int, m: int, n: int, k: int, budget: float = DEFAULT_BUDGET) -> tuple:
    """Component widths for an ``m x k`` by ``k x n`` product (see the module docstring).

    Remembered per shape and cost model (the search prices ~200 schedules in Python, a few ms:
    more than a small product's first resolution itself)."""
    bits = check_bits(bits)
    if not budget > 0:
        raise ValueError(f"budget must be > 0, not {budget}")
    model = (products.DIGIT_BITS, products.POPCOUNT_RATE, products.INT8_RATES, products.DIGIT_PREP_COST,
             products.KEEP_ACC_S,
             ESTIMATE_S, STATS_S, float64_rate(), os.environ.get("MPILAYER_KERNEL"),
             os.environ.get("MPILAYER_FULL_PRODUCTS"))
    return _auto_component_bits(bits, max(m, 1), max(n, 1), max(k, 1), float(budget), model)


@functools.lru_cache(maxsize=256)
def _auto_component_bits(bits: int, m: int, n: int, k: int, budget: float, model: tuple) -> tuple:
    one_shot = m * n * k / float64_rate()
    first_cost = lambda w: schedule_cost(ComponentSplit(bits, (w, bits - w)), m, n, k)[0]  # noqa: E731
    narrowest = first_cost(1)
    allowance = budget * max(one_shot, narrowest)
    first = max(w for w in range(1, bits) if first_cost(w) - narrowest <= allowance)
    return _cheapest_rest(bits, first, m, n, k)


def first_resolution_cost(widths: tuple, bits: int, m: int, n: int, k: int) -> float:
    """Predicted first-resolution time, overheads included, over the one-shot float64 product's."""
    one_shot = max(m * n * k, 1) / float64_rate()
    return schedule_cost(ComponentSplit(bits, widths), m, n, k)[0] / one_shot


def resolve_split(bits: int, component_bits, m: int, n: int, k: int, budget: float = DEFAULT_BUDGET) -> ComponentSplit:
    """``make_split`` that also takes ``"auto"`` (the schedule above, for this shape)."""
    from mpilayer.core.components import make_split
    if isinstance(component_bits, str):
        if component_bits != "auto":
            raise ValueError(f"component_bits={component_bits!r}: expected widths or 'auto'")
        return ComponentSplit(check_bits(bits), auto_component_bits(bits, m, n, k, budget))
    return make_split(bits, component_bits)
