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
    reference of the histogram (bits <= 8) and compiled (bits > 8) paths."""
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
