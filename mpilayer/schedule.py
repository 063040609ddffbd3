"""The default schedule (``component_bits="auto"``): accuracy per cost on the machine it runs on.

The first resolution should come early and be informative. Its cost is predicted with the
kernel cost model (products.term_cost, rates of the kernel paths this CPU dispatches to) and
compared with a one-shot float64 product of the same shape (:func:`float64_rate`). The first
component is the widest (short of all the bits: one resolution would not be layered) whose
product stays within ``budget`` times that one-shot time (the estimate's own O(mn) work and the
operands' statistics cost the same whatever the width, so they do not enter the choice; they
are in the predicted times :func:`schedule_cost` reports) (every extra bit roughly halves the first resolution's
error, estimates.py); the remaining bits are then split into the components that make the
whole layered product cheapest.
"""
from __future__ import annotations

from . import _kernels
from .components import ComponentSplit, check_bits
from .products import choose_kernel, resolution_terms, term_cost

DEFAULT_BUDGET = 0.15  # first resolution's predicted time / one-shot float64 product's
FLOAT64_RATES = {"avx512": 24e9, "avx2": 19e9}  # numpy float64 matmul, one core (measured)
# Seconds per element, measured on one core of an AVX-512 Xeon (2026-11): the estimate of a
# coarse resolution (estimates.c, per element of C) and the operands' statistics (zero points
# and histograms, per element of A and of B).
ESTIMATE_S, STATS_S = 7.5e-9, 4e-9


def float64_rate() -> float:
    """Rate (MAC/s) of a one-shot float64 product on one core of this CPU, as numpy's BLAS
    reached it in ``mpilayer bench kernels`` (README, Performance): a constant per ISA rather
    than a measurement at start-up, so that the schedule does not depend on the load."""
    return FLOAT64_RATES["avx512"] if _kernels.cpu_features().get("avx512") else FLOAT64_RATES["avx2"]


def schedule_cost(split: ComponentSplit, m: int, n: int, k: int, overheads: bool = True) -> list:
    """Predicted seconds of each resolution of ``split`` (cheaper kernel per term), with (unless
    ``overheads`` is False) the estimate of every coarse resolution and, in the first, the
    operands' statistics.""" 
    out = []
    for r in range(split.n_resolutions):
        seconds = sum(term_cost(choose_kernel(m, n, k, fa, fb), m, n, k, fa, fb)
                      for fa, fb in resolution_terms(split, r))
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
    """Component widths for an ``m x k`` by ``k x n`` product (see the module docstring)."""
    bits = check_bits(bits)
    if not budget > 0:
        raise ValueError(f"budget must be > 0, not {budget}")
    one_shot = max(m * n * k, 1) / float64_rate()
    first = 1
    for w in range(1, bits):
        split = ComponentSplit(bits, (w,) if w == bits else (w, bits - w))
        if schedule_cost(split, max(m, 1), max(n, 1), max(k, 1), overheads=False)[0] <= budget * one_shot:
            first = w
    return _cheapest_rest(bits, first, max(m, 1), max(n, 1), max(k, 1))


def first_resolution_cost(widths: tuple, bits: int, m: int, n: int, k: int) -> float:
    """Predicted first-resolution time, overheads included, over the one-shot float64 product's."""
    one_shot = max(m * n * k, 1) / float64_rate()
    return schedule_cost(ComponentSplit(bits, widths), m, n, k)[0] / one_shot


def resolve_split(bits: int, component_bits, m: int, n: int, k: int, budget: float = DEFAULT_BUDGET) -> ComponentSplit:
    """``make_split`` that also takes ``"auto"`` (the schedule above, for this shape)."""
    from .components import make_split
    if isinstance(component_bits, str):
        if component_bits != "auto":
            raise ValueError(f"component_bits={component_bits!r}: expected widths or 'auto'")
        return ComponentSplit(check_bits(bits), auto_component_bits(bits, m, n, k, budget))
    return make_split(bits, component_bits)
