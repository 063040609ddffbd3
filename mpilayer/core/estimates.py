"""The estimate each resolution reports, its certified interval and its statistical error.

Representation. Every row of A (column of B) gets an integer *zero point* z, about the mean of
its quantised values, and the components are bit fields of ``q' = q - z`` (two's complement,
still within ``bits``; see :func:`zero_points`). The kernels multiply components of q'; the
exact product is recovered with rank-one integer corrections,

    A B = A' B' + rowsum(A') w^T + z colsum(B')^T + k z w^T      (z, w: zero points of A, B),

so the last resolution is the same exact integer product as without zero points. The zero
point puts the top bit where the data are: for nonnegative data (pixels, activations) the
first bit splits the values at their mean instead of being a constant sign bit.

Estimate. Resolution r keeps ``T = (q' >> s) << s`` and drops ``d = q' - T`` in ``[0, delta]``,
``delta = 2**s - 1``. Instead of ``T`` (biased by about delta/2), each row is estimated by
the least-squares affine fit of its own values on its kept bits,

    A_hat_ik = alpha_i T_ik + b_i            (b_i = beta_i + z_i),

which for one kept bit is the mean of the values in each of the two buckets. Because the fit
is affine, the product of the two estimates needs no matrix product beyond ``acc = T_A T_B``:

    C_hat = alpha_i gamma_j acc_ij + alpha_i rowsum(T_A)_i c_j + b_i gamma_j colsum(T_B)_j + k b_i c_j.

The fit needs only sums along k of q', d, q'd, d^2 per row and resolution (:class:`SideStats`),
accumulated block by block in one pass over the operand.

Certified interval (``exact = q_A q_B``, integer units). Two intervals hold and are intersected:

1. Truncation: ``q'_A q'_B - T_A T_B`` lies in ``bounds.error_interval`` (dropped parts in
   ``[0, delta]``), around the integer centre ``acc + Z`` (Z: the zero-point corrections).
2. Estimate: with ``dA = q_A - A_hat`` and ``dB = q_B - B_hat``,
   ``exact - C_hat = dA q_B + A_hat dB = q_A dB + dA B_hat``; by Hölder each product is at most
   ``min(|dA_i|_inf |q_B,j|_1, |dA_i|_2 |q_B,j|_2)`` (likewise the others), from per-row norms.
   ``|dA_i|_inf`` is the largest of ``|(1-alpha)T + d - beta|`` over the row's range of T and
   ``d in [0, delta]`` (linear, so at a corner); ``|dA_i|_2^2`` is the residual sum of squares
   written in the sums; ``|A_hat_i|_1 <= |alpha| (sum|q'| + k delta) + k |b|``. Every float
   quantity carries an allowance for its rounding (``ROUND``, relative to the magnitudes summed).

Since the exact product is an integer, the interval is rounded inward to integers; the
reported estimate is C_hat clipped into it (which can only bring it closer), rounded to an
integer for integer inputs. The certified bound is the larger distance from the estimate to
either end.

Statistical error (labelled as such, not certified): treating the residuals as independent,
zero-mean (the fit makes their row mean zero) and independent of the other operand,
``Var(exact - C_hat)_ij ~ |dA_i|_2^2 |q_B,j|_2^2 / k + |A_hat_i|_2^2 |dB_j|_2^2 / k``; summed over
a tile this separates into row and column sums.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpilayer import _kernels
from mpilayer.core.bounds import SideSums
from mpilayer.core.components import ComponentSplit

U = np.finfo(np.float64).eps / 2
ROUND = 32 * U  # relative allowance for the rounding of a handful of float64 operations


def zero_points(mean, lo, hi, bits: int) -> np.ndarray:
    """Integer zero points (int64) near ``mean`` such that ``q - z`` fits signed ``bits`` for every
    q in ``[lo, hi]`` (per row of A / column of B)."""
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    lo, hi = np.asarray(lo, dtype=np.int64), np.asarray(hi, dtype=np.int64)
    z = np.rint(np.nan_to_num(np.asarray(mean, dtype=np.float64))).astype(np.int64)
    return np.clip(z, hi - qmax, lo - qmin)


def zero_points_of(q: np.ndarray, bits: int, axis: int, x: np.ndarray | None = None, scale=None) -> np.ndarray:
    """Zero points of an in-memory operand ``q``: per row (``axis=1`` reduces along rows) or
    column, from the mean of the input ``x`` (default ``q``) over its ``scale`` (None: integers),
    as the MPI master finds them from its blocks (operand_readers.py), so that both split identically.

    The min, max and (integer input, whose values are q's) sum of int8/int16 ``q`` come from one
    compiled pass (``_kernels.line_range``): an exact sum, so the mean is numpy's float64 mean."""
    if q.shape[axis] == 0:
        return np.zeros(q.shape[1 - axis], dtype=np.int64)
    integer = x is None or (np.asarray(x).dtype.kind in "iu" and scale is None)
    if q.dtype in (np.int8, np.int16):
        sums = _kernels.line_range(q if axis == 1 else q.T)
        lo, hi = sums[1], sums[2]
        mean = sums[0] / q.shape[axis] if integer else None
    else:  # wider integers (inference's int64 inputs)
        lo, hi = q.min(axis=axis), q.max(axis=axis)
        mean = None
    if mean is None:
        mean = (q if x is None else x).mean(axis=axis, dtype=np.float64)
    if scale is not None:
        mean = mean / np.broadcast_to(np.asarray(scale, dtype=np.float64), mean.shape)
    return zero_points(mean, lo, hi, bits)


def shifted(q: np.ndarray, z: np.ndarray, axis: int) -> np.ndarray:
    """``q - z`` in q's dtype (z per row for ``axis=1``, per column for ``axis=0``).

    Computed in that dtype, without wider temporaries: z lies within q's range and ``q - z``
    fits ``bits`` (:func:`zero_points`), so the wrap-around arithmetic gives the exact result."""
    z = np.asarray(z).astype(q.dtype)
    return np.subtract(q, z[:, None] if axis == 1 else z[None, :], out=np.empty(q.shape, q.dtype))  # one pass


class SideStats:
    """Sums along k, per row of A (or column of B), behind the estimates and bounds.

    Blocks are added with their major axis first (rows of A; the transpose of B's blocks).
    Integer sums are exact in int64 for k below 2**31 (16-bit values).
    """

    def __init__(self, split: ComponentSplit, zero: np.ndarray, k: int):
        self.split, self.k = split, int(k)
        self.zero = np.asarray(zero, dtype=np.int64)
        length, n_low = len(self.zero), split.n_resolutions - 1
        z = lambda *shape: np.zeros(shape, dtype=np.int64)  # noqa: E731
        self.sq, self.sqq, self.sabs, self.sabs_full = z(length), z(length), z(length), z(length)
        self.qmin = np.full(length, np.iinfo(np.int64).max)
        self.qmax = np.full(length, np.iinfo(np.int64).min)
        self.sd, self.sdd, self.sqd = z(n_low, length), z(n_low, length), z(n_low, length)
        self.pos, self.neg = z(n_low + 1, length), z(n_low + 1, length)  # of T at r, [-1]: q'
        self._deferred = []  # (block of q', major, resolutions) whose truncation sums are still to take
        self._whole = None  # the statistics this one is a part of (part())

    def add(self, qp: np.ndarray, major: slice = slice(None), shifted=None, now=None) -> None:
        """Add a block of q' (int8/int16, rows = this side's major axis) covering ``major``: every
        sum in one compiled pass (``_kernels.direct_sums``). With ``shifted``, ``qp`` is the block
        before its zero points and q' is written into ``shifted`` in that pass (direct_sums).
        ``now``: the resolutions whose truncation sums this pass takes (default: all); the others
        are taken in one more pass over q' (which must then stay unchanged) when a method first
        needs one, so that the first resolution of a fine schedule does not wait for them."""
        if qp.size == 0:
            return
        every = range(self.split.n_resolutions - 1)
        resolutions = every if now is None else [r for r in every if r in now]
        later = [r for r in every if r not in resolutions]
        sums = _kernels.direct_sums(qp, self.zero[major], [self.split.shift(r) for r in resolutions], shifted)
        self.sq[major] += sums[0]
        self.sqq[major] += sums[1]
        self.sabs[major] += sums[2]
        self.sabs_full[major] += sums[3]
        self.qmin[major] = np.minimum(self.qmin[major], sums[4])
        self.qmax[major] = np.maximum(self.qmax[major], sums[5])
        self.pos[-1, major] += sums[6]
        self.neg[-1, major] += sums[7]
        self._add_truncations(sums, major, resolutions)
        if later:
            self._deferred.append((qp if shifted is None else shifted, major, later))

    def _add_truncations(self, sums: np.ndarray, major: slice, resolutions) -> None:
        for i, r in enumerate(resolutions):
            c = 8 + 5 * i
            self.sd[r, major] += sums[c]
            self.sdd[r, major] += sums[c + 1]
            self.sqd[r, major] += sums[c + 2]
            self.pos[r, major] += sums[c + 3]
            self.neg[r, major] += sums[c + 4]

    def _complete(self, r: int | None = None) -> None:
        """Take the truncation sums :meth:`add` left for later (one pass per block), if resolution
        ``r``'s are among them (None: whichever are); a :meth:`part` asks its whole."""
        if self._whole is not None:
            self._whole._complete(r)
            return
        if r is not None and not any(r in later for _, _, later in self._deferred):
            return
        while self._deferred:
            qp, major, resolutions = self._deferred.pop()
            sums = _kernels.direct_sums(qp, self.zero[major], [self.split.shift(r) for r in resolutions])
            self._add_truncations(sums, major, resolutions)

    def part(self, major: slice) -> "SideStats":
        """The statistics of the rows (columns) in ``major`` (a slice: views of these, whose sums
        left for later this one takes when the part needs them; else copies), not to be added to."""
        if not isinstance(major, slice):
            self._complete()
        out = SideStats.__new__(SideStats)
        out.split, out.k, out.zero, out._deferred = self.split, self.k, self.zero[major], []
        out._whole = self if self._whole is None else self._whole
        for name in ("sq", "sqq", "sabs", "sabs_full", "qmin", "qmax"):
            setattr(out, name, getattr(self, name)[major])
        for name in ("sd", "sdd", "sqd", "pos", "neg"):
            setattr(out, name, getattr(self, name)[:, major])
        return out

    # ------------------------------------------------------------------ derived, per resolution

    def side_sums(self, r: int) -> SideSums:
        """Positive and negative sums of T at resolution r (``-1``: of q' itself)."""
        self._complete(r)
        return SideSums(self.pos[r], self.neg[r])

    def rowsum_t(self, r: int) -> np.ndarray:
        """``sum_k T`` at resolution r (int64); q' itself at the last resolution."""
        self._complete(r)
        return self.sq - self.sd[r] if r < len(self.sd) else self.sq

    def fit(self, r: int):
        """Per row ``(alpha, beta)`` of the least-squares fit ``q' ~ alpha T + beta`` (float64)."""
        self._complete(r)
        k = max(self.k, 1)
        sq, sd, sqd = self.sq.astype(float), self.sd[r].astype(float), self.sqd[r].astype(float)
        sqq, sdd = self.sqq.astype(float), self.sdd[r].astype(float)
        st, stt, sqt = sq - sd, sqq - 2 * sqd + sdd, sqq - sqd
        var_t = stt / k - (st / k) ** 2
        cov = sqt / k - (sq / k) * (st / k)
        ok = var_t > 1e-9 * np.maximum(stt / k, 1.0)
        alpha = np.where(ok, cov / np.where(ok, var_t, 1.0), 1.0)
        beta = sq / k - alpha * st / k
        return alpha, beta

    def norms(self, r: int, alpha, beta):
        """Certified upper bounds per row: ``|dA|_inf``, ``|dA|_2^2``, ``|A_hat|_1``, ``|A_hat|_2^2``, and
        the computed (not inflated) ``|dA|_2^2``, ``|A_hat|_2^2`` for the statistical estimate."""
        self._complete(r)
        k, delta = self.k, float(self.split.max_dropped(r))
        a1 = 1.0 - alpha
        tmin = (self.qmin >> self.split.shift(r)) << self.split.shift(r)
        tmax = (self.qmax >> self.split.shift(r)) << self.split.shift(r)
        corners = [np.abs(a1 * t - beta + d) for t in (tmin.astype(float), tmax.astype(float)) for d in (0.0, delta)]
        mag = np.abs(a1) * np.maximum(np.abs(tmin), np.abs(tmax)) + delta + np.abs(beta)
        dinf = np.maximum.reduce(corners) + ROUND * mag
        # residual (1-alpha) q' + alpha d - beta, squared and summed
        sq, sqq = self.sq.astype(float), self.sqq.astype(float)
        sd, sdd, sqd = self.sd[r].astype(float), self.sdd[r].astype(float), self.sqd[r].astype(float)
        terms = [a1 * a1 * sqq, alpha * alpha * sdd, k * beta * beta, 2 * a1 * alpha * sqd,
                 -2 * a1 * beta * sq, -2 * alpha * beta * sd]
        r2 = np.maximum(sum(terms), 0.0)
        r2_up = np.minimum(r2 + ROUND * sum(np.abs(t) for t in terms), k * dinf * dinf)
        # estimate alpha T + b, b = beta + z, T = q' - d
        b = beta + self.zero
        st, stt = sq - sd, sqq - 2 * sqd + sdd
        hterms = [alpha * alpha * stt, 2 * alpha * b * st, k * b * b]
        h2 = np.maximum(sum(hterms), 0.0)
        h2_up = h2 + ROUND * sum(np.abs(t) for t in hterms)
        h1_up = np.minimum((np.abs(alpha) * (self.sabs + k * delta) + k * np.abs(b)) * (1 + ROUND),
                           np.sqrt(k * h2_up) * (1 + ROUND))
        return dinf, r2_up, h1_up, h2_up, r2, h2

    def full_norms(self):
        """``|q|_1`` and ``|q|_2^2`` per row of the exact operand (q = q' + z), as floats rounded up."""
        q2 = self.sqq + 2 * self.zero * self.sq + self.k * self.zero * self.zero
        return _up(self.sabs_full), _up(q2)


def scaled_norms(stats: SideStats, scale) -> tuple:
    """``(sum of the squared scales, |dequantised operand|_F^2)`` of one operand from its
    statistics (``sum q^2`` per line, :meth:`SideStats.full_norms`) and its scale (scalar or
    per line; None for integers: no scale term, the integers' own norm): the operands' parts of
    quantization.relative_error_estimate, with no pass over the data."""
    q2 = stats.full_norms()[1]
    if scale is None:
        return 0.0, float(q2.sum())
    s2 = np.broadcast_to(np.asarray(scale, dtype=np.float64), q2.shape) ** 2
    return float(s2.sum()), float(s2 @ q2)


def _up(x: np.ndarray) -> np.ndarray:
    """int64 to the float64 values just above (float(x) may round down past 2**53)."""
    f = x.astype(np.float64)
    return np.where(f < x, np.nextafter(f, np.inf), f)


@dataclass
class TileEstimate:
    """One tile's estimate at a resolution, in integer units (exact product = integer).

    ``estimate``: float64, or int64 (rounded) for integer inputs and at the exact resolution;
    ``lo``/``hi``: int64 certified interval of the exact product (None unless asked for);
    ``bound``: certified ``max |exact - estimate|``, times ``sa_i sb_j`` when scales are given
    (before the float rounding allowance of scaling the estimate); ``var_sum``: statistical
    estimate of ``sum_ij (exact - estimate)^2``, scaled likewise (0 at the exact resolution);
    ``estimate_sq``/``peak``: ``sum_ij estimate^2`` and ``max_ij |estimate|``, scaled likewise.
    """

    estimate: np.ndarray | None
    lo: np.ndarray | None
    hi: np.ndarray | None
    var_sum: float
    bound: float
    estimate_sq: float
    peak: float


def exact_product(acc: np.ndarray, a: SideStats, b: SideStats) -> np.ndarray:
    """The exact product from the last resolution's accumulator ``A' B'`` (int64; ``acc`` itself
    without zero points): ``acc + (rowsum(A') + k z) w^T + z colsum(B')^T``, in one compiled pass
    (``_kernels.exact_tile``)."""
    if not (a.zero.any() or b.zero.any()):
        return acc
    return _kernels.exact_tile(np.ascontiguousarray(acc, dtype=np.int64), a.sq + a.k * a.zero, a.zero,
                               b.zero, b.sq, None, None)[0]


def tile_estimate(acc: np.ndarray, r: int, a: SideStats, b: SideStats, sa=None, sb=None,
                  interval: bool = True, keep: bool = True, scaled: bool = False, out=None,
                  fused=None) -> TileEstimate:
    """Estimate, certified bound (and interval) and statistical error of one tile at resolution r.

    ``acc``: int64 ``T_A T_B`` over all of k at resolution r (q' fields); ``a``/``b``: the
    tile's rows of A / columns of B (:meth:`SideStats.part`); ``sa``/``sb``: their scales (None:
    integers, whose estimate is rounded to int64). The elementwise pass is one compiled loop
    (``_kernels.estimate_tile``, cython_kernels/estimates.c); with ``keep=False`` the estimate
    itself is not kept (bound and sums only). With ``scaled`` (real inputs, no interval) the
    estimate is returned as published, ``(est * sa_i) * sb_j`` (layered.scaled_estimate's
    rounding), from the same pass: no second pass over the tile to scale it. ``out`` (not at the
    last resolution; no interval): where to write the estimate, e.g. over ``acc`` itself when it
    is no longer needed (a fresh array's first touch costs about a write pass on its own).
    ``fused`` (no interval, not at the last resolution; ``acc`` unused): a function taking
    ``(k, ROUND, va, vb, integer, scaled)`` that does the elementwise pass itself and returns
    ``(estimate, bound, sum of squares, peak)`` as estimate_tile would (e.g. the int8 kernel
    writing the estimate in its own pass over the product: layered.py).
    """
    scaled = scaled and sa is not None and not interval
    if r == a.split.n_resolutions - 1:
        if scaled:  # the exact tile, scaled, and its sums: one compiled pass
            zero = a.zero.any() or b.zero.any()
            est, est_sq, peak = _kernels.exact_tile(
                np.ascontiguousarray(acc, dtype=np.int64), a.sq + a.k * a.zero if zero else None,
                a.zero if zero else None, b.zero if zero else None, b.sq if zero else None, sa, sb)
            return TileEstimate(est, None, None, 0.0, 0.0, est_sq, peak)
        exact, est_sq, peak = _exact_with_sums(np.ascontiguousarray(acc, dtype=np.int64), a, b, sa, sb)
        return TileEstimate(exact, exact if interval else None, exact if interval else None, 0.0, 0.0,
                            est_sq, peak)
    integer = sa is None
    va, extra_a = _side_vectors(r, a, True, sa)
    vb, extra_b = _side_vectors(r, b, False, sb)
    if fused is not None:
        (est, bound, est_sq, peak), lo, hi = fused((a.k, ROUND, va, vb, integer, scaled)), None, None
    else:
        est, lo, hi, bound, est_sq, peak = _kernels.estimate_tile(
            np.ascontiguousarray(acc, dtype=np.int64), a.k, a.split.max_dropped(r), ROUND, va, vb,
            integer, keep, interval, scaled, out)
    if not interval:  # bound = rounding allowance so far: add the radius and the rounding to integers
        bound += _separable_radius(va, vb) + (0.5 if integer else 0.0)
    wa = np.ones(len(a.zero)) if integer else np.asarray(sa, dtype=float) ** 2
    wb = np.ones(len(b.zero)) if integer else np.asarray(sb, dtype=float) ** 2
    var = (np.dot(wa, extra_a["r2c"]) * np.dot(wb, extra_b["q2c"])
           + np.dot(wa, extra_a["h2c"]) * np.dot(wb, extra_b["r2c"])) / max(a.k, 1)
    return TileEstimate(est, lo, hi, float(var), float(bound), float(est_sq), float(peak))


def _separable_radius(va: dict, vb: dict) -> float:
    """An upper bound of ``max_ij`` of the Hölder radius (times ``sa_i sb_j``) from per-row and
    per-column maxima: ``max_ij min(x_i y_j, u_i v_j) <= min(max x max y, max u max v)``, and the
    maximum of a sum at most the sum of the maxima. O(m + n), for publishing without an interval."""
    if not len(va["alpha"]) or not len(vb["alpha"]):
        return 0.0
    sa = 1.0 if va["scale"] is None else va["scale"]
    sb = 1.0 if vb["scale"] is None else vb["scale"]
    top = lambda v, name, s: float(np.max(v[name] * s))  # noqa: E731
    def pair(x, y, u, v):
        return min(top(va, x, sa) * top(vb, y, sb), top(va, u, sa) * top(vb, v, sb))
    first = pair("dinf", "q1", "r2", "q2") + pair("h1", "dinf", "h2", "r2")
    second = pair("q1", "dinf", "q2", "r2") + pair("dinf", "h1", "r2", "h2")
    return min(first, second) * (1 + 4 * ROUND)


def _side_vectors(r: int, s: SideStats, is_a: bool, scale):
    """The per-row (A) / per-column (B) vectors of estimates.h's ``mpl_side`` at resolution r,
    and the uninflated norms of the statistical estimate."""
    alpha, beta = s.fit(r)
    dinf, r2, h1, h2, r2c, h2c = s.norms(r, alpha, beta)
    q1, q2 = s.full_norms()
    root = lambda x: np.sqrt(x) * (1 + ROUND)  # noqa: E731
    v = {"alpha": alpha, "ta": s.rowsum_t(r).astype(float), "b": beta + s.zero,
         "dinf": dinf, "r2": root(r2), "h1": h1, "h2": root(h2), "q1": q1, "q2": root(q2),
         "pos_full": s.pos[-1], "neg_full": s.neg[-1], "pos_trunc": s.pos[r], "neg_trunc": s.neg[r],
         # Z_ij = (rowsum(A')_i + k z_i) w_j + z_i colsum(B')_j: each side's term paired with the other's z
         "zc": s.sq + s.k * s.zero if is_a else s.sq, "z": s.zero,
         "scale": None if scale is None else np.asarray(scale, dtype=np.float64)}
    q2c = (s.sqq + 2 * s.zero * s.sq + s.k * s.zero * s.zero).astype(float)
    return v, {"r2c": r2c, "h2c": h2c, "q2c": q2c}


def exact_estimate(exact: np.ndarray, sa=None, sb=None, interval: bool = True, scaled: bool = False,
                   sums: bool = True) -> TileEstimate:
    """The TileEstimate of a tile already holding the exact product (int64, integer units; as
    the last resolution's accumulator of layered.LayeredProduct, whose kernel pass added the
    zero-point terms): interval ``[exact, exact]``, bound 0; ``scaled`` as in
    :func:`tile_estimate`. Without ``sums`` (integers only) the sum of squares and the peak are
    not computed (0): they weigh nothing in an exact integer result's error, and skip a pass."""
    if sa is None:
        est_sq, peak = _kernels.exact_tile(exact, None, None, None, None, None, None)[1:] if sums else (0.0, 0.0)
        est = exact
    else:
        scaled_est, est_sq, peak = _kernels.exact_tile(exact, None, None, None, None, sa, sb)
        est = scaled_est if scaled and not interval else exact
    return TileEstimate(est, exact if interval else None, exact if interval else None, 0.0, 0.0,
                        float(est_sq), float(peak))


def zero_point_terms(a: SideStats, b: SideStats):
    """The rank-one terms ``[(u, v), ...]`` that turn ``A' B'`` into the exact product (int64
    ``outer(rowsum(A') + k z, w) + outer(z, colsum(B'))``), or None without zero points; for
    products.add_terms's ``outer`` (the same sum :func:`exact_product` adds)."""
    if not (a.zero.any() or b.zero.any()):
        return None
    return [(a.sq + a.k * a.zero, b.zero), (a.zero, b.sq)]


def _exact_with_sums(acc: np.ndarray, a: SideStats, b: SideStats, sa, sb) -> tuple:
    """``(exact int64 tile, sum of squares, max |.|)``, the sums of the tile as published
    (times ``sa_i sb_j`` for real inputs): integers in one compiled pass (the tile and its sums
    together), real inputs in two (the integer tile, then the sums of its scaled values)."""
    if sa is None:
        if not (a.zero.any() or b.zero.any()):
            return (acc, *_kernels.exact_tile(acc, None, None, None, None, None, None)[1:])
        return _kernels.exact_tile(acc, a.sq + a.k * a.zero, a.zero, b.zero, b.sq, None, None)
    exact = exact_product(acc, a, b)
    return (exact, *_kernels.exact_tile(np.ascontiguousarray(exact), None, None, None, None, sa, sb)[1:])
