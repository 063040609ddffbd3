"""Independent references for tests: exact products without mpilayer's kernels."""
import numpy as np


def exact_int_product(A, B) -> np.ndarray:
    """Exact A @ B for integer arrays: float64 BLAS when every partial sum is below 2**53
    (then float64 is exact), else Python integers."""
    A = np.asarray(A, dtype=np.int64)
    B = np.asarray(B, dtype=np.int64)
    k = A.shape[1]
    amax = int(np.abs(A).max(initial=0))
    bmax = int(np.abs(B).max(initial=0))
    if amax * bmax * max(k, 1) < 2**53:
        return (A.astype(np.float64) @ B.astype(np.float64)).astype(np.int64)
    out = np.zeros((A.shape[0], B.shape[1]), dtype=object)
    for i in range(A.shape[0]):
        for j in range(B.shape[1]):
            out[i, j] = sum(int(a) * int(b) for a, b in zip(A[i], B[:, j]))
    return out.astype(np.int64)


def random_ints(rng, shape, bits):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return rng.integers(lo, hi + 1, size=shape, dtype=np.int64)


def pos_neg_sums(q, shift, axis):
    """Sums along ``axis`` of the positive and of the negative entries of ``(q >> shift) << shift``."""
    t = (np.asarray(q, dtype=np.int64) >> shift) << shift
    return np.maximum(t, 0).sum(axis=axis), np.minimum(t, 0).sum(axis=axis)


def add_direct(stats, qp, major=slice(None)):
    """SideStats' sums of a q' block (rows = the side's major axis) in plain numpy: the
    reference of the compiled sums (estimates.c, ``_kernels.direct_sums``)."""
    x = qp.astype(np.int32)
    stats.sq[major] += x.sum(axis=1, dtype=np.int64)
    stats.sqq[major] += np.einsum("ij,ij->i", x, x, dtype=np.int64)
    stats.sabs[major] += np.abs(x).sum(axis=1, dtype=np.int64)
    stats.sabs_full[major] += np.abs(x + stats.zero[major, None].astype(np.int32)).sum(axis=1, dtype=np.int64)
    stats.qmin[major] = np.minimum(stats.qmin[major], x.min(axis=1))
    stats.qmax[major] = np.maximum(stats.qmax[major], x.max(axis=1))
    stats.pos[-1, major] += np.where(x > 0, x, 0).sum(axis=1, dtype=np.int64)
    stats.neg[-1, major] += np.where(x < 0, x, 0).sum(axis=1, dtype=np.int64)
    for r in range(stats.split.n_resolutions - 1):
        s = stats.split.shift(r)
        d = x & ((1 << s) - 1)
        t = x - d
        stats.sd[r, major] += d.sum(axis=1, dtype=np.int64)
        stats.sdd[r, major] += np.einsum("ij,ij->i", d, d, dtype=np.int64)
        stats.sqd[r, major] += np.einsum("ij,ij->i", x, d, dtype=np.int64)
        stats.pos[r, major] += np.where(t > 0, t, 0).sum(axis=1, dtype=np.int64)
        stats.neg[r, major] += np.where(t < 0, t, 0).sum(axis=1, dtype=np.int64)


def zero_points_reference(q, bits, axis):
    """``estimates.zero_points`` of integer ``q`` from numpy's mean, min and max along ``axis``:
    the reference of the compiled pass of ``zero_points_of``."""
    from mpilayer.core.estimates import zero_points
    return zero_points(q.mean(axis=axis, dtype=np.float64), q.min(axis=axis), q.max(axis=axis), bits)


def lanes_sum_sq(y):
    """``sum y^2`` as estimates.c adds it: in each row, lane ``j % 8`` accumulates its elements in
    order, the lanes combine pairwise ((0+1)+(2+3))+((4+5)+(6+7)) and the row's sum is added to
    the total (Python floats: one IEEE rounding per operation)."""
    total = 0.0
    for row in np.asarray(y, dtype=np.float64):
        part = [0.0] * 8
        for j, v in enumerate(row.tolist()):
            part[j % 8] += v * v
        total += ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]))
    return total


def estimate_reference(acc, k, delta, round_rel, a, b, integer, interval):
    """``_kernels.estimate_tile`` in numpy, operation by operation as estimates.py derives it
    (float64, no fused multiply-add): ``(estimate, lo, hi, bound, sum of squares, peak)``."""
    I62 = 2.0**62
    col, row = (lambda v: np.asarray(v)[None, :]), (lambda v: np.asarray(v)[:, None])
    t1 = (acc.astype(np.float64) * row(a["alpha"])) * col(b["alpha"])
    t2 = row(a["alpha"] * a["ta"]) * col(b["b"])
    t3 = row(a["b"]) * col(b["alpha"] * b["ta"])
    t4 = float(k) * (row(a["b"]) * col(b["b"]))
    e = ((t1 + t2) + t3) + t4
    mag = ((np.abs(t1) + np.abs(t2)) + np.abs(t3)) + np.abs(t4)
    scaled = a["scale"] is not None
    s = row(a["scale"]) * col(b["scale"]) if scaled else None

    def rint_or(x):  # numpy.rint where |x| < 2**62, else (x > 0.5)
        return np.where(np.abs(x) < I62, np.rint(np.where(np.abs(x) < I62, x, 0.0)), x > 0.5).astype(np.int64)

    lo = hi = None
    if not interval:
        if integer:
            x = rint_or(e)
            y, est = x.astype(np.float64), x
            bound = round_rel * mag.max()
        else:
            y, est = ((e * row(a["scale"])) * col(b["scale"]) if scaled else e), e
            bound = ((round_rel * mag) * s).max() if scaled else round_rel * mag.max()
        return est, lo, hi, float(bound), lanes_sum_sq(y), float(np.abs(y).max())
    pair = lambda x, y, u, v: np.minimum(row(a[x]) * col(b[y]), row(a[u]) * col(b[v]))  # noqa: E731
    first = pair("dinf", "q1", "r2", "q2") + pair("h1", "dinf", "h2", "r2")
    second = pair("q1", "dinf", "q2", "r2") + pair("dinf", "h1", "r2", "h2")
    rad = np.minimum(first, second) * (1.0 + round_rel) + round_rel * mag
    with np.errstate(over="ignore"):
        centre = acc + row(a["zc"]) * col(b["z"]) + row(a["z"]) * col(b["zc"])
        side = lambda x, y: (row(a[x]) + col(b[y]), row(a[y]) + col(b[x]))  # noqa: E731
        lt = delta * np.maximum(*side("neg_trunc", "neg_full")) + centre
        ht = delta * np.minimum(*side("pos_trunc", "pos_full")) + centre
    down, upper = e - rad, e + rad
    ok_l, ok_h = np.abs(down) < I62, np.abs(upper) < I62
    lo = np.where(ok_l, np.maximum(lt, np.ceil(np.where(ok_l, down, 0.0)).astype(np.int64)), lt)
    hi = np.where(ok_h, np.minimum(ht, np.floor(np.where(ok_h, upper, 0.0)).astype(np.int64)), ht)
    e = np.minimum(np.maximum(e, lo.astype(np.float64)), hi.astype(np.float64))
    if integer:
        x = np.minimum(np.maximum(rint_or(e), lo), hi)
        width = np.maximum(x - lo, hi - x)
        wf = width.astype(np.float64)
        w = np.where(width > 2**53, wf * (1.0 + 2.0**-51), wf)
        y, est = x.astype(np.float64), x
    else:
        w = np.maximum(e - lo.astype(np.float64), hi.astype(np.float64) - e)
        y, est = ((e * row(a["scale"])) * col(b["scale"]), e) if scaled else (e, e)
        if scaled:
            w = w * s
    return est, lo, hi, float(w.max()), lanes_sum_sq(y), float(np.abs(y).max())
