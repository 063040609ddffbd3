"""Single-process layered product: ``layered_matmul`` yields every resolution of A @ B.

This is the core the MPI run distributes: the same terms (products.py), the same bounds
(bounds.py), computed here on whole operands in one process.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from .bounds import error_interval, truncation_bound
from .components import ComponentSplit, make_split
from .products import OperandBlock, add_terms, resolution_terms
from .quantization import UNIT_ROUNDOFF, Quantized, check_operand, quantization_error_bound, quantize

SCALES = {"tensor": (None, None), "axis": (0, 1)}


@dataclass
class Resolution:
    """One resolution of a layered product.

    Attributes
    ----------
    index : 0-based resolution
    estimate : int64 (integer inputs) or float64 in the inputs' scale (real inputs)
    error_bound : certified ``max |exact - estimate|``, where exact is the product of the
        quantised operands (scaled back for real inputs); 0 on the last resolution
    exact : True only on the last resolution
    resolutions_total : number of resolutions of this product
    quantization_error_bound : certified ``max |A @ B - exact|`` for real inputs, 0 for integers
    elapsed_s : seconds since the product started
    kernels : kernel used for each term of this resolution's increment
    """

    index: int
    estimate: np.ndarray
    error_bound: float
    exact: bool
    resolutions_total: int
    quantization_error_bound: float = 0.0
    elapsed_s: float = 0.0
    kernels: tuple = ()
    _interval: object = field(default=None, repr=False)

    def error_interval(self):
        """Elementwise ``(lo, hi)`` float64 arrays with ``lo <= exact - estimate <= hi``."""
        return self._interval()


class LayeredProduct:
    """State of a layered product of two quantised operands; :meth:`increment` advances it.

    Kept separate from the generator so that a caller (adaptive inference, benchmarks) can
    inspect the integer accumulator and bound inputs between resolutions.
    """

    def __init__(self, qa: Quantized, qb: Quantized, split: ComponentSplit, kernel: str | None = None):
        if qa.values.shape[1] != qb.values.shape[0]:
            raise ValueError(f"shapes do not chain: A is {qa.values.shape}, B is {qb.values.shape}")
        self.qa, self.qb, self.split, self.kernel = qa, qb, split, kernel
        self.a = OperandBlock(qa.values, "A", split.bits)
        self.b = OperandBlock(qb.values, "B", split.bits)
        m, n = qa.values.shape[0], qb.values.shape[1]
        self.acc = None  # int64 estimate of the last resolution; None before the first
        self.next_resolution = 0
        self.sa = None if qa.scale is None and qb.scale is None else _scale_vec(qa, m)
        self.sb = None if self.sa is None else _scale_vec(qb, n)

    @property
    def done(self) -> bool:
        return self.next_resolution >= self.split.n_resolutions

    def increment(self) -> tuple:
        """Add the next resolution's terms to the accumulator; return the kernels used."""
        r = self.next_resolution
        self.acc, kernels = add_terms(self.acc, self.a, self.b, resolution_terms(self.split, r), self.kernel)
        self.next_resolution += 1
        return kernels

    def _sums(self, r: int):
        """Row sums of A and column sums of B, exact and truncated at resolution r."""
        s = self.split.shift(r)
        return self.a.side_sums(0), self.a.side_sums(s), self.b.side_sums(0), self.b.side_sums(s)

    def integer_bound(self, r: int) -> float:
        """Certified max error of resolution r in integer units (or scaled, for real inputs)."""
        delta = self.split.max_dropped(r)
        if delta == 0:
            return 0.0
        return truncation_bound(delta, *self._sums(r), self.sa, self.sb)

    def interval(self, r: int, estimate: np.ndarray):
        """Elementwise error interval of resolution r (whose estimate is given), in its units."""
        delta = self.split.max_dropped(r)
        lo, hi = error_interval(delta, *self._sums(r))
        if self.sa is None:
            return lo.astype(np.float64), hi.astype(np.float64)
        s = self.sa[:, None] * self.sb[None, :]
        slack = _real_slack(s * np.maximum(np.abs(lo), np.abs(hi)), estimate)
        return lo * s - slack, hi * s + slack

    def estimate(self) -> np.ndarray:
        """The current estimate (the accumulator itself for integers: each resolution makes a
        new one), scaled for real inputs."""
        return scaled_estimate(self.acc, self.sa, self.sb)


def _scale_vec(q: Quantized, length: int) -> np.ndarray:
    if q.scale is None:
        return np.ones(length)
    return np.ascontiguousarray(np.broadcast_to(np.asarray(q.scale, dtype=np.float64), (length,)))


def scaled_estimate(acc: np.ndarray, sa, sb) -> np.ndarray:
    """The integer accumulator, or ``acc * sa_i * sb_j`` (float64) for real inputs."""
    if sa is None:
        return acc
    return acc * sa[:, None] * sb[None, :]


def certified_bound(integer_bound: float, estimate: np.ndarray, real: bool) -> float:
    """The bound of an estimate, with the float64 rounding allowance for real inputs."""
    if real and integer_bound:
        return integer_bound + _real_slack(integer_bound, estimate)
    return integer_bound


def _real_slack(bound, estimate) -> float:
    """Float64 rounding allowance for real-valued estimates.

    The estimate and the scaled exact product are each rounded twice (two scale
    multiplications), so besides ``bound`` they may differ by ``4u(|estimate| + bound)``;
    we add ``8u`` of both to stay on the safe side.
    """
    peak = float(np.max(np.abs(estimate))) if np.size(estimate) else 0.0
    return 8 * UNIT_ROUNDOFF * (peak + float(np.max(bound) if np.size(bound) else 0.0))


def layered_matmul(A, B, bits: int = 8, component_bits: Sequence[int] | int | None = None,
                   scale: str = "tensor", kernel: str | None = None) -> Iterator[Resolution]:
    """Yield the resolutions of ``A @ B``, coarse to exact.

    Parameters
    ----------
    A, B : 2-D arrays (float32/float64, or integers that fit in ``bits``), ``A.shape[1] == B.shape[0]``
    bits : fixed-point bits of each operand, 2..16 (default 8)
    component_bits : widths of the resolution components, most significant first, summing
        to ``bits`` (e.g. ``(1, 1, 2, 4)``); an int w means components of w bits; default
        ``(1, 7)`` for 8 bits (see :func:`mpilayer.components.default_component_bits`)
    scale : real inputs only: ``"tensor"`` (one scale per operand) or ``"axis"`` (per row of
        A, per column of B)
    kernel : force ``"popcount"`` or ``"int8"`` for every term (default: cost model)

    Yields
    ------
    Resolution
        Resolution r is the product of both operands truncated to their top r+1 components,
        computed from resolution r-1 by adding only the new cross terms. The last one is the
        exact product of the quantised operands.

    Examples
    --------
    >>> import numpy as np, mpilayer
    >>> A = np.array([[1, -2], [3, 4]], dtype=np.int8); B = np.eye(2, dtype=np.int8)
    >>> [r.error_bound for r in mpilayer.layered_matmul(A, B, bits=4, component_bits=(1, 3))]
    [49.0, 0.0]
    """
    start = time.perf_counter()
    product, quant_bound = prepare(A, B, bits, component_bits, scale, kernel)
    while not product.done:
        kernels = product.increment()
        r = product.next_resolution - 1
        yield _resolution(product, r, kernels, quant_bound, time.perf_counter() - start)


def prepare(A, B, bits=8, component_bits=None, scale="tensor", kernel=None):
    """Validate and quantise the operands; return ``(LayeredProduct, quantisation bound)``."""
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r}: expected one of {tuple(SCALES)}")
    if kernel not in (None, "popcount", "int8"):
        raise ValueError(f"kernel={kernel!r}: expected None, 'popcount' or 'int8'")
    A, B = check_operand(A, "A"), check_operand(B, "B")
    if A.shape[1] != B.shape[0]:
        raise ValueError(f"shapes do not chain: A is {A.shape}, B is {B.shape} (A.shape[1] != B.shape[0])")
    split = make_split(bits, component_bits)
    axis_a, axis_b = SCALES[scale]
    qa, qb = quantize(A, bits, "A", axis_a), quantize(B, bits, "B", axis_b)
    return LayeredProduct(qa, qb, split, kernel), quantization_error_bound(A, B, qa, qb)


def _resolution(product: LayeredProduct, r: int, kernels, quant_bound, elapsed) -> Resolution:
    estimate = product.estimate()
    bound = certified_bound(product.integer_bound(r), estimate, product.sa is not None)
    last = r == product.split.n_resolutions - 1
    return Resolution(r, estimate, bound, last, product.split.n_resolutions, quant_bound,
                      elapsed, kernels, lambda: product.interval(r, estimate))
