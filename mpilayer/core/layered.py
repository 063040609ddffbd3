"""Single-process layered product: ``layered_matmul`` yields every resolution of A @ B.

This is the core the MPI run distributes: the same terms (products.py), the same bounds
(bounds.py), computed here on whole operands in one process.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from mpilayer import _kernels
from mpilayer.core.components import ComponentSplit, check_bits
from mpilayer.core.estimates import (SideStats, TileEstimate, exact_estimate, scaled_norms, shifted, tile_estimate,
                                     zero_point_terms, zero_points_of)
from mpilayer.core.products import (OperandBlock, add_terms, choose_kernel, one_kernel_call, resolution_terms,
                                    whole_is_cheaper)
from mpilayer.core.quantization import (UNIT_ROUNDOFF, Quantized, bound_from_norms, check_operand, quantize, real_scale,
                                        scale_vectors, storage_dtype)
from mpilayer.core.quantization import relative_error_estimate as relative_error_estimate_q
from mpilayer.core.schedule import resolve_split

SCALES = {"tensor": (None, None), "axis": (0, 1)}


@dataclass
class Resolution:
    """One resolution of a layered product.

    Attributes
    ----------
    index : 0-based resolution
    estimate : the best estimate the kept bits allow (estimates.py): int64 for integer inputs
        (rounded), float64 in the inputs' scale for real inputs; the exact product at the last
    error_bound : certified ``max |exact - estimate|``, where exact is the product of the
        quantised operands (scaled back for real inputs); 0 on the last resolution
    exact : True only on the last resolution
    resolutions_total : number of resolutions of this product
    quantization_error_bound : certified ``max |A @ B - exact|`` for real inputs, 0 for integers
    elapsed_s : seconds since the product started
    kernels : kernel used for each term of this resolution's increment
    error_estimate : statistical (not certified) estimate of the relative Frobenius error
        ``|exact - estimate|_F / |exact|_F``, from the spread of the dropped parts; 0 at the last
    quantization_error_estimate : statistical estimate of ``|A @ B - exact|_F / |exact|_F`` for
        real inputs (rounding to fixed point; quantization.relative_error_estimate), 0 for integers
    """

    index: int
    estimate: np.ndarray
    error_bound: float
    exact: bool
    resolutions_total: int
    quantization_error_bound: float = 0.0
    elapsed_s: float = 0.0
    kernels: tuple = ()
    error_estimate: float = 0.0
    quantization_error_estimate: float = 0.0
    _interval: object = field(default=None, repr=False)

    def error_interval(self):
        """Elementwise ``(lo, hi)`` float64 arrays with ``lo <= exact - estimate <= hi``."""
        return self._interval()

    def relative_error(self, exact: np.ndarray) -> float:
        """Measured ``|exact - estimate|_F / |exact|_F`` (0 when both are zero)."""
        return relative_error(self.estimate, exact)


def relative_error(estimate: np.ndarray, exact: np.ndarray) -> float:
    """``|exact - estimate|_F / |exact|_F``; an all-zero estimate scores 1."""
    exact = np.asarray(exact, dtype=np.float64)
    norm = float(np.linalg.norm(exact))
    diff = float(np.linalg.norm(exact - np.asarray(estimate, dtype=np.float64)))
    return diff / norm if norm else (0.0 if diff == 0 else float("inf"))


class LayeredProduct:
    """State of a layered product of two quantised operands; :meth:`increment` advances it.

    The kernels multiply the components of ``q - z`` (zero point per row of A / column of B,
    estimates.py); :meth:`tile` turns the accumulator into the reported estimate. Kept
    separate from the generator so that a caller (adaptive inference, benchmarks) can inspect
    the accumulator between resolutions: :meth:`increment` updates ``acc`` in place (one
    m x n buffer for the whole product), so copy it to keep it.
    """

    def __init__(self, qa: Quantized, qb: Quantized, split: ComponentSplit, kernel: str | None = None,
                 za: np.ndarray | None = None, zb: np.ndarray | None = None):
        if qa.values.shape[1] != qb.values.shape[0]:
            raise ValueError(f"shapes do not chain: A is {qa.values.shape}, B is {qb.values.shape}")
        self.qa, self.qb, self.split, self.kernel = qa, qb, split, kernel
        m, k = qa.values.shape
        n = qb.values.shape[1]
        za = np.zeros(m, np.int64) if za is None else za
        zb = np.zeros(n, np.int64) if zb is None else zb
        self.a_stats, self.b_stats = SideStats(split, za, k), SideStats(split, zb, k)
        self.a = OperandBlock(_shifted_with_stats(qa.values, self.a_stats, 1), "A", split.bits)
        self.b = OperandBlock(_shifted_with_stats(qb.values, self.b_stats, 0), "B", split.bits)
        # B's column sums of every truncation, for the int8 kernel's offset correction
        self.b.truncated_sums = TruncatedSums(self.b_stats)
        # int64 T_A T_B (q - z fields) of the last resolution reached, None before the first; at
        # the exact resolution the exact product q_A q_B (the zero-point terms added in its pass)
        self.acc = None
        self.quantization_noise = None  # real inputs: the parts of the quantisation error estimate (prepare)
        self.next_resolution = 0
        self.sa = None if qa.scale is None and qb.scale is None else _scale_vec(qa, m)
        self.sb = None if self.sa is None else _scale_vec(qb, n)

    @property
    def done(self) -> bool:
        return self.next_resolution >= self.split.n_resolutions

    def increment(self) -> tuple:
        """Add the next resolution's terms to the accumulator; return the kernels used."""
        r = self.next_resolution
        whole = whole_is_cheaper(self.split, r, self.a.length, self.b.length, self.a.k)
        last = r == self.split.n_resolutions - 1
        self.acc, kernels = add_terms(None if whole else self.acc, self.a, self.b,
                                      resolution_terms(self.split, r, whole), self.kernel, out=self.acc,
                                      outer=zero_point_terms(self.a_stats, self.b_stats) if last else None)
        self.next_resolution += 1
        return kernels

    def publishes_in_kernel(self) -> bool:
        """Whether the next resolution's published estimate can be written by its kernel in its
        own pass over the product (:meth:`increment_published`): not the last resolution, the one
        after it a whole product (so the estimate may take the accumulator's place, as
        :meth:`publish_in_place`), and the increment one kernel call (:func:`one_kernel_pass`)."""
        r, last = self.next_resolution, self.split.n_resolutions - 1
        m, n, k = self.a.length, self.b.length, self.a.k
        if r >= last or m == 0 or n == 0 or not whole_is_cheaper(self.split, r + 1, m, n, k):
            return False
        return one_kernel_pass(resolution_terms(self.split, r, whole_is_cheaper(self.split, r, m, n, k)),
                               m, n, k, self.kernel)

    def increment_published(self) -> tuple:
        """:meth:`increment` with the resolution's published estimate (as :func:`_resolution`
        computes it over the accumulator) written by its kernel in its pass over the product,
        when :meth:`publishes_in_kernel`: no estimate pass. Returns ``(kernels, TileEstimate)``;
        ``acc`` becomes None (:meth:`accumulator` computes it again if asked)."""
        r = self.next_resolution
        whole = whole_is_cheaper(self.split, r, self.a.length, self.b.length, self.a.k)
        te, kernels = kernel_published(r, self.a, self.b, resolution_terms(self.split, r, whole), self.a_stats,
                                       self.b_stats, self.sa, self.sb, self.kernel, None if whole else self.acc,
                                       self.acc)
        self.acc = None
        self.next_resolution += 1
        return kernels, te

    def accumulator(self, r: int) -> np.ndarray:
        """What ``acc`` held at resolution r (int64): ``acc`` while the product is at r, else
        computed again as the whole product of the truncated operands (the same integers)."""
        if r == self.next_resolution - 1 and self.acc is not None:
            return self.acc
        if not 0 <= r < min(self.next_resolution, self.split.n_resolutions - 1):
            raise ValueError(f"resolution {r} not reached")
        return add_terms(None, self.a, self.b, resolution_terms(self.split, r, r > 0), self.kernel)[0]

    def tile(self, r: int, rows=slice(None), acc=None, interval: bool = True, scaled: bool = False,
             out=None) -> TileEstimate:
        """Estimate, certified bound and (with ``interval``: then clipped into it) elementwise
        interval, in integer units (with ``scaled``, real inputs and no interval: the estimate
        as published, :func:`scaled_estimate`), of resolution r for ``rows`` of A; ``out``: as
        in estimates.tile_estimate. ``acc``: the caller's ``T_A T_B`` of those rows (q - z
        fields), or None for this product's own accumulator (at the exact resolution, the exact
        product itself)."""
        sa = None if self.sa is None else self.sa[rows]
        if acc is None and r == self.split.n_resolutions - 1:
            return exact_estimate(np.ascontiguousarray(self.accumulator(r)[rows]), sa, self.sb, interval, scaled)
        acc = self.accumulator(r) if acc is None else acc
        return tile_estimate(acc, r, self.a_stats.part(rows), self.b_stats, sa, self.sb, interval=interval,
                             scaled=scaled, out=out)

    def publish_in_place(self) -> bool:
        """Whether the reported estimate may overwrite ``acc``: not at the exact resolution, and
        the next resolution is a whole product (products.whole_is_cheaper), which does not read
        it. Then ``acc`` becomes None (:meth:`accumulator` computes it again if asked)."""
        r = self.next_resolution
        return (0 < r < self.split.n_resolutions and self.acc is not None and self.acc.flags.c_contiguous
                and whole_is_cheaper(self.split, r, self.a.length, self.b.length, self.a.k))


def one_kernel_pass(terms, m: int, n: int, k: int, kernel: str | None = None) -> bool:
    """Whether ``terms`` are one kernel call (one term: one int8 digit or one bit plane a side),
    which can then write the published estimate in its own pass over the product
    (:func:`kernel_published`)."""
    if len(terms) != 1 or m == 0 or n == 0:
        return False
    (fa, fb), = terms
    return one_kernel_call(fa, fb, kernel or choose_kernel(m, n, k, fa, fb))


def kernel_published(r: int, a: OperandBlock, b: OperandBlock, terms, a_stats: SideStats, b_stats: SideStats,
                     sa, sb, kernel=None, prev=None, out=None):
    """``prev + (the product of terms)``'s published estimate at resolution r (not the last), as
    ``tile_estimate(..., scaled=True)`` computes it from the accumulator, written by the kernel
    (int8 or binary-plane) in its pass over the product (:func:`one_kernel_pass` must hold): no
    accumulator kept, no estimate pass, and the output's pages first touched once.
    ``a_stats``/``b_stats``: those of a's rows and b's columns. Returns ``(TileEstimate, kernels)``."""
    kernels = ()

    def kernel_pass(estimate):  # tile_estimate's elementwise pass: the kernel's
        nonlocal kernels
        acc, kernels, sums = add_terms(prev, a, b, terms, kernel, out=out, estimate=estimate)
        return (acc if sa is None else acc.view(np.float64), *sums)

    te = tile_estimate(None, r, a_stats, b_stats, sa, sb, interval=False, scaled=True, fused=kernel_pass)
    return te, kernels


def kernel_exact(a: OperandBlock, b: OperandBlock, terms, a_stats: SideStats, b_stats: SideStats, sa, sb,
                 kernel=None):
    """The exact product of ``terms`` (the whole product at the last resolution; :func:`one_kernel_pass`
    must hold) plus the zero-point terms of ``a_stats``/``b_stats`` (a's rows, b's columns), as
    exact_tile publishes it (float64 scaled by ``sa``/``sb``; integers: int64), written by the
    int8 kernel in its pass over the product: no int64 tile and no pass of its own. Returns
    ``(tile, sum of squares, kernels)``, the sum in exact_tile's bits."""
    out = np.empty((a.length, b.length), dtype=np.int64)
    out, kernels, (_, est_sq, _) = add_terms(None, a, b, terms, kernel, out=out,
                                             outer=zero_point_terms(a_stats, b_stats), estimate=("exact", sa, sb))
    return (out if sa is None else out.view(np.float64)), est_sq, kernels


def _shifted_with_stats(q: np.ndarray, stats: SideStats, axis: int) -> np.ndarray:
    """``q - z`` (estimates.shifted; z per row for ``axis=1``, per column for ``axis=0``), its
    statistics added to ``stats`` in the same compiled pass over q (int8/int16 storage)."""
    if q.dtype not in (np.int8, np.int16):
        qp = shifted(q, stats.zero, axis)
        stats.add(qp if axis == 1 else qp.T, now=FIRST)
        return qp
    q = np.ascontiguousarray(q)
    qp = np.empty(q.shape, q.dtype)
    stats.add(q if axis == 1 else q.T, shifted=qp if axis == 1 else qp.T, now=FIRST)
    return qp


FIRST = (0,)  # the truncation sums the preparation takes; the others when resolution 1 needs them


class TruncatedSums(Mapping):
    """``shift -> sum_k`` of the operand truncated there, per line (OperandBlock.truncated_sums),
    read from the statistics when first asked for (the statistics take them lazily: SideStats.add)."""

    def __init__(self, stats: SideStats):
        self.stats = stats
        self.resolution = {stats.split.shift(r): r for r in range(stats.split.n_resolutions)}

    def __getitem__(self, shift: int) -> np.ndarray:
        return self.stats.rowsum_t(self.resolution[shift])

    def __contains__(self, shift) -> bool:  # without taking the sums
        return shift in self.resolution

    def __iter__(self):
        return iter(self.resolution)

    def __len__(self) -> int:
        return len(self.resolution)


def _scale_vec(q: Quantized, length: int) -> np.ndarray:
    if q.scale is None:
        return np.ones(length)
    return np.ascontiguousarray(np.broadcast_to(np.asarray(q.scale, dtype=np.float64), (length,)))


def scaled_estimate(acc: np.ndarray, sa, sb) -> np.ndarray:
    """The integer-unit estimate as reported: as it is for integer inputs, or
    ``acc * sa_i * sb_j`` (float64) for real inputs."""
    if sa is None:
        return acc
    if acc is None:
        return None
    return acc * sa[:, None] * sb[None, :]


def reported_bound(te: TileEstimate, sa) -> float:
    """The certified bound in the inputs' units: for real inputs with the rounding allowance of
    scaling the estimate (:func:`real_slack`)."""
    if sa is None or not te.bound:
        return te.bound
    return te.bound + real_slack(te.bound, te.peak)


def reported_interval(te: TileEstimate, estimate: np.ndarray, sa, sb):
    """Elementwise ``(lo, hi)`` with ``lo <= exact - estimate <= hi``, in the inputs' units."""
    if sa is None:
        return te.lo - estimate, te.hi - estimate
    width = np.maximum(te.estimate - te.lo, te.hi - te.estimate) * (sa[:, None] * sb[None, :])
    slack = real_slack(width, estimate)
    return -width - slack, width + slack


def relative_error_estimate(var_sum: float, estimate_sq: float) -> float:
    """Statistical (not certified) ``|exact - estimate|_F / |exact|_F`` from the predicted
    ``sum (exact - estimate)^2`` and ``|estimate|_F^2``: the fitted estimate's error is about
    orthogonal to it, so ``|exact|^2 ~ |estimate|^2 + var_sum``."""
    total = var_sum + estimate_sq
    return float(np.sqrt(var_sum / total)) if total > 0 else 0.0


def real_slack(bound, estimate) -> float:
    """Float64 rounding allowance for real-valued estimates.

    The estimate and the scaled exact product are each rounded twice (two scale
    multiplications), so besides ``bound`` they may differ by ``4u(|estimate| + bound)``;
    we add ``8u`` of both to stay on the safe side.
    """
    peak = float(np.max(np.abs(estimate))) if np.size(estimate) else 0.0
    return 8 * UNIT_ROUNDOFF * (peak + float(np.max(bound) if np.size(bound) else 0.0))


def layered_matmul(A, B, bits: int = 8, component_bits: Sequence[int] | int | str | None = "auto",
                   scale: str = "tensor", kernel: str | None = None, zero_point: bool = True
                   ) -> Iterator[Resolution]:
    """Yield the resolutions of ``A @ B``, coarse to exact.

    Parameters
    ----------
    A, B : 2-D arrays (float32/float64, or integers that fit in ``bits``), ``A.shape[1] == B.shape[0]``
    bits : fixed-point bits of each operand, 2..16 (default 8)
    component_bits : widths of the resolution components, most significant first, summing
        to ``bits`` (e.g. ``(1, 1, 2, 4)``); an int w means components of w bits; ``"auto"``
        (default) picks them for this shape and CPU (:mod:`mpilayer.core.schedule`, as on the command
        line); None: ``(1, 7)`` for 8 bits (:func:`mpilayer.core.components.default_component_bits`)
    scale : real inputs only: ``"tensor"`` (one scale per operand) or ``"axis"`` (per row of
        A, per column of B)
    kernel : force ``"popcount"`` or ``"int8"`` for every term (default: cost model)
    zero_point : split ``q - z`` with a zero point per row of A / column of B (default; see
        :mod:`mpilayer.core.estimates`), or False to split q itself (for comparisons)

    Yields
    ------
    Resolution
        Resolution r is estimated from both operands' top r+1 components (an affine fit per
        row of A / column of B on those bits, with a certified bound and a statistical error
        estimate), computed from resolution r-1 by adding only the new cross terms, or as the
        whole product of the truncated operands where the cost model finds that cheaper. The
        last one is the exact product of the quantised operands.

    Examples
    --------
    >>> import numpy as np, mpilayer
    >>> A = np.array([[1, -2], [3, 4]], dtype=np.int8); B = np.eye(2, dtype=np.int8)
    >>> [r.error_bound for r in mpilayer.layered_matmul(A, B, bits=4, component_bits=(1, 3))]
    [4.0, 0.0]
    """
    start = time.perf_counter()
    product, quant_bound = prepare(A, B, bits, component_bits, scale, kernel, zero_point)
    while not product.done:
        te = None
        if product.publishes_in_kernel():
            kernels, te = product.increment_published()
        else:
            kernels = product.increment()
        r = product.next_resolution - 1
        yield _resolution(product, r, kernels, quant_bound, time.perf_counter() - start, te)


def prepare(A, B, bits=8, component_bits=None, scale="tensor", kernel=None, zero_point=True):
    """Validate and quantise the operands; return ``(LayeredProduct, quantisation bound)``."""
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r}: expected one of {tuple(SCALES)}")
    if kernel not in (None, "popcount", "int8"):
        raise ValueError(f"kernel={kernel!r}: expected None, 'popcount' or 'int8'")
    A, B = check_operand(A, "A"), check_operand(B, "B")
    if A.shape[1] != B.shape[0]:
        raise ValueError(f"shapes do not chain: A is {A.shape}, B is {B.shape} (A.shape[1] != B.shape[0])")
    split = resolve_split(bits, component_bits, A.shape[0], B.shape[1], A.shape[1])
    axis_a, axis_b = SCALES[scale]
    qa, qb = _quantize(A, bits, "A", axis_a), _quantize(B, bits, "B", axis_b)
    za, zb = ((zero_points_of(qa.values, qa.bits, 1, A, qa.scale), zero_points_of(qb.values, qb.bits, 0, B, qb.scale))
              if zero_point else (None, None))
    product = LayeredProduct(qa, qb, split, kernel, za, zb)
    if qa.is_real or qb.is_real:  # (sum s_a^2, |B|_F^2, sum s_b^2, |A|_F^2), from the operands' statistics
        (sa_sq, a_sq), (sb_sq, b_sq) = (scaled_norms(stats, q.scale if q.is_real else None)
                                        for stats, q in ((product.a_stats, qa), (product.b_stats, qb)))
        product.quantization_noise = (sa_sq, b_sq, sb_sq, a_sq)
    return product, _quantization_bound(B, qa, qb, product.a_stats)


def _quantization_bound(B, qa: Quantized, qb: Quantized, a_stats: SideStats) -> float:
    """quantization.quantization_error_bound, bit for bit, with ``sum_k |q_A|`` per row from the
    statistics (``sabs_full``, exact: numpy's float sum of these small integers is exact too)
    instead of a float copy of A; B's l1 norms as there, from its input."""
    if not (qa.is_real or qb.is_real):
        return 0.0
    (m, k), n = qa.values.shape, qb.values.shape[1]
    if m == 0 or n == 0 or k == 0:
        return 0.0
    sa, sb = scale_vectors(qa, qb, m, n)
    half_a = sa / 2 if qa.is_real else np.zeros(m)
    half_b = sb / 2 if qb.is_real else np.zeros(n)
    b_l1 = np.abs(np.asarray(B, dtype=np.float64)).sum(axis=0)
    return bound_from_norms(half_a, b_l1, half_b, a_stats.sabs_full.astype(np.float64) * sa, k)


def _quantize(x: np.ndarray, bits: int, name: str, axis) -> Quantized:
    """quantization.quantize, bit for bit; real input rounded in one compiled pass
    (``_kernels.quantize_encode``, as the MPI readers quantise) instead of numpy's temporaries;
    integers whose dtype is the storage type of ``bits`` bits taken as they are (every value fits,
    so quantize's range pass could not fail)."""
    if x.dtype == storage_dtype(bits) and np.iinfo(x.dtype).bits == check_bits(bits):
        return Quantized(np.ascontiguousarray(x), bits, None, None)  # every value fits: nothing to check
    if x.dtype not in (np.float32, np.float64) or not x.flags.c_contiguous:
        return quantize(x, bits, name, axis)
    s = real_scale(x, check_bits(bits), axis, name)
    return Quantized(_kernels.quantize_encode(x, s, None, bits, 0 if axis is None else axis)[0], bits, s, axis)


def _published(product: LayeredProduct, r: int, last: bool) -> TileEstimate:
    """The TileEstimate of resolution r as published, from the accumulator."""
    if last:  # the accumulator is the exact product; an integer one needs no pass at all
        return exact_estimate(product.acc, product.sa, product.sb, False, True, sums=product.sa is not None)
    if product.publish_in_place():  # over the accumulator, which the next resolution does not need
        acc = product.acc
        te = product.tile(r, interval=False, scaled=True, out=acc if product.sa is None else acc.view(np.float64))
        product.acc = None
        return te
    return product.tile(r, interval=False, scaled=True)  # scaled (real inputs) in the estimate's pass


def _resolution(product: LayeredProduct, r: int, kernels, quant_bound, elapsed, te=None) -> Resolution:
    """Resolution r as published (the same estimate as the MPI master's: no interval pass), or
    from ``te`` where its kernel already wrote it (LayeredProduct.increment_published); its
    elementwise interval is computed only if asked for."""
    last = r == product.split.n_resolutions - 1
    te = _published(product, r, last) if te is None else te
    estimate, bound = te.estimate, reported_bound(te, product.sa)

    def interval():  # the accumulator is updated in place: computed again once the product moved on
        full = product.tile(r)
        # the interval holds the exact product, whatever the estimate (this one, in integer units)
        full.estimate = te.estimate if product.sa is None else product.tile(r, interval=False).estimate
        return reported_interval(full, estimate, product.sa, product.sb)

    noise = product.quantization_noise
    quant_estimate = 0.0 if noise is None else relative_error_estimate_q(*noise, te.estimate_sq + te.var_sum)
    return Resolution(r, estimate, bound, last, product.split.n_resolutions, quant_bound, elapsed, kernels,
                      relative_error_estimate(te.var_sum, te.estimate_sq), quant_estimate, interval)
