"""The fused passes of the single-process product, bit for bit against the unfused ones they
replace: the zero points' range pass (``line_range``), ``q - z`` written in the statistics' pass
(``direct_sums(shifted=)``) and the published estimate written by the int8 kernel
(``int8_matmul_acc(estimate=)``), on every path this CPU runs (the portable-only build is
compared in tests/test_simd_paths.py)."""
import numpy as np
import pytest

from mpilayer import _kernels as K
from mpilayer.core import layered
from mpilayer.core.estimates import SideStats, shifted, tile_estimate, zero_points
from mpilayer.core.layered import LayeredProduct, layered_matmul, prepare
from test_estimates import random_side as side  # estimates.h's per-row vectors, arbitrary

ODD = [(1, 1), (1, 7), (7, 1), (37, 301), (67, 4100), (300, 70)]


def extremes(rng, dtype, shape):
    """Random values of ``dtype`` with a row of minima and half a row of maxima."""
    lo, hi = np.iinfo(dtype).min, np.iinfo(dtype).max
    q = rng.integers(lo, hi + 1, shape).astype(dtype)
    q[0] = lo
    q[-1, ::2] = hi
    return q


@pytest.mark.parametrize("dtype", [np.int8, np.int16])
@pytest.mark.parametrize("shape", ODD + [(2, 40000), (40000, 2)])
def test_line_range_is_numpys_sum_min_max(dtype, shape):
    """Rows and (a transposed block, read in place) columns, past a 32768-element chunk: with
    int16 maxima the int32 partial sums would overflow without the chunks."""
    rng = np.random.default_rng(shape[0] * 7 + shape[1])
    q = extremes(rng, dtype, shape)
    q[:, 1:3] = np.iinfo(dtype).max if shape[1] > 3 else q[:, 1:3]
    for view in (q, q.T, np.asfortranarray(q)):
        got = K.line_range(view)
        want = np.stack([view.sum(axis=1, dtype=np.int64), view.min(axis=1), view.max(axis=1)])
        np.testing.assert_array_equal(got, want)
    assert K.line_range(q[:0]).shape == (3, 0)


@pytest.mark.parametrize("dtype,bits", [(np.int8, 8), (np.int8, 5), (np.int16, 16), (np.int16, 11)])
@pytest.mark.parametrize("shape", ODD)
def test_direct_sums_writes_shifted_in_its_pass(dtype, bits, shape):
    """``direct_sums(q, z, shifts, shifted=out)``: ``out`` is estimates.shifted(q, z) and the sums
    are those of out, for rows and columns (z per column of the stored block)."""
    rng = np.random.default_rng(bits * 1000 + shape[0])
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = rng.integers(lo, hi + 1, shape).astype(dtype)
    q[0] = lo
    for axis in (1, 0):
        line = q if axis == 1 else q.T
        r = K.line_range(line)
        z = zero_points(r[0] / line.shape[1], r[1], r[2], bits)
        want_q = shifted(q, z, axis)
        want = K.direct_sums(want_q if axis == 1 else want_q.T, z, [1, 3])
        out = np.full(q.shape, 99, dtype)
        got = K.direct_sums(line, z, [1, 3], shifted=out if axis == 1 else out.T)
        np.testing.assert_array_equal(out, want_q)
        np.testing.assert_array_equal(got, want)


def test_direct_sums_shifted_errors():
    q = np.zeros((4, 6), np.int8)
    z = np.zeros(4, np.int64)
    with pytest.raises(ValueError, match="shape"):
        K.direct_sums(q, z, [], shifted=np.zeros((4, 5), np.int8))
    with pytest.raises(ValueError, match="C-contiguous"):
        K.direct_sums(q, z, [], shifted=np.zeros((6, 4), np.int8).T)
    with pytest.raises(TypeError, match="dtype"):
        K.direct_sums(q, z, [], shifted=np.zeros((4, 6), np.int16))


@pytest.mark.parametrize("method", K.int8_methods())
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (7, 65, 130), (250, 200, 77), (13, 64, 9), (9, 3, 0),
                                   (245, 130, 300), (3, 70, 65540)])
def test_int8_writes_the_estimate(method, m, n, k):
    """``estimate``: C holds estimate_tile's estimate of the product (written over it, ``out=``)
    and the same (bound, sum of squares, peak), bit for bit: integers, reals, scaled as published;
    with and without a start; packed B; k beyond one int32 super-block (a pass after the product)."""
    rng = np.random.default_rng(m * 1000 + n + k)
    x_max = 255 if method in K.FULL_8BIT_METHODS else 127
    X = rng.integers(0, x_max + 1, (m, k), dtype=np.uint8)
    Y = rng.integers(-128, 128, (k, n), dtype=np.int8)
    ys = [Y] + ([K.pack_int8(Y)] if method in K.FULL_8BIT_METHODS and method != "c" else [])
    starts = [None, (None, rng.integers(-9, 9, m), rng.integers(-9, 9, n),
                     [(rng.integers(-99, 99, m), rng.integers(-99, 99, n))])]
    for scaled in (False, True):
        a, b = side(rng, m, scaled), side(rng, n, scaled)
        for published in ((False, True) if scaled else (False,)):
            for start in starts:
                acc = np.zeros((m, n), np.int64)
                K.int8_matmul_acc(X, Y, acc, 3, x_max, method="c" if x_max > 127 else "auto", start=start)
                out = acc.copy().view(np.float64) if scaled else acc.copy()
                want = K.estimate_tile(acc, 300, 127, 1e-14, a, b, not scaled, True, False, published, out)
                for y in ys:
                    C = np.full((m, n), 0 if start is None else 5, np.int64)
                    got = K.int8_matmul_acc(X, y, C, 3, x_max, method=method, start=start,
                                            estimate=(300, 1e-14, a, b, not scaled, published))
                    assert got == want[3:]
                    np.testing.assert_array_equal(C.view(np.float64) if scaled else C, want[0])


@pytest.mark.parametrize("method", K.int8_methods())
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (7, 65, 130), (250, 200, 77), (9, 3, 0), (3, 70, 65540)])
def test_int8_writes_the_exact_tile(method, m, n, k):
    """``estimate=("exact", sa, sb)``: C holds the exact product as exact_tile publishes it (scaled
    float64, or the int64 values) with exact_tile's (sum of squares, peak), bit for bit; with a
    start of zero-point terms; k beyond one int32 super-block (a pass after the product)."""
    rng = np.random.default_rng(m * 1000 + n + k + 1)
    x_max = 255 if method in K.FULL_8BIT_METHODS else 127
    X = rng.integers(0, x_max + 1, (m, k), dtype=np.uint8)
    Y = rng.integers(-128, 128, (k, n), dtype=np.int8)
    outer = [(rng.integers(-99, 99, m), rng.integers(-99, 99, n)), (rng.integers(-9, 9, m), rng.integers(-9, 9, n))]
    for scales in ((None, None), (rng.random(m) + 0.5, rng.random(n) * 1e-3)):
        for start in ((None, None, None), (None, rng.integers(-9, 9, m), None, outer)):
            acc = np.zeros((m, n), np.int64)
            K.int8_matmul_acc(X, Y, acc, 3, x_max, method="c" if x_max > 127 else "auto", start=start)
            want = K.exact_tile(acc, None, None, None, None, *scales)
            C = np.full((m, n), 5, np.int64)
            got = K.int8_matmul_acc(X, Y, C, 3, x_max, method=method, start=start, estimate=("exact", *scales))
            assert got == (0.0, *want[1:])
            np.testing.assert_array_equal(C if scales[0] is None else C.view(np.float64), want[0])
    with pytest.raises(ValueError, match="both scales"):
        K.int8_matmul_acc(X, Y, C, 1, method=method, estimate=("exact", np.ones(m), None))


@pytest.mark.parametrize("method", K.popcount_methods())
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (7, 65, 130), (250, 200, 77), (13, 1100, 2100), (9, 3, 0),
                                   (5, 17, 40000)])
def test_popcount_writes_the_estimate(method, m, n, k):
    """``estimate`` on the binary-plane kernel: C holds estimate_tile's estimate of ``weight *``
    the plane product (C's old values unread) and the same (bound, sum of squares, peak), bit for
    bit: integers, reals, scaled as published; column blocks past the first; k beyond one k
    block (a pass after the product)."""
    rng = np.random.default_rng(m * 1000 + n + k + 2)
    X, Y = rng.integers(-128, 128, (m, k), dtype=np.int8), rng.integers(-128, 128, (k, n), dtype=np.int8)
    Xp, Yp = K.pack_row_planes(X, 7, 1)[0], K.pack_col_planes(Y, 7, 1)[0]
    for scaled in (False, True):
        a, b = side(rng, m, scaled), side(rng, n, scaled)
        for published in ((False, True) if scaled else (False,)):
            acc = np.zeros((m, n), np.int64)
            K.popcount_matmul_acc(Xp, Yp, acc, 1 << 14, method="c")
            out = acc.copy().view(np.float64) if scaled else acc.copy()
            want = K.estimate_tile(acc, 300, 127, 1e-14, a, b, not scaled, True, False, published, out)
            C = np.full((m, n), 5, np.int64)
            got = K.popcount_matmul_acc(Xp, Yp, C, 1 << 14, method=method,
                                        estimate=(300, 1e-14, a, b, not scaled, published))
            assert got == want[3:]
            np.testing.assert_array_equal(C.view(np.float64) if scaled else C, want[0])


def test_int8_estimate_errors():
    X, Y, C = np.zeros((2, 3), np.uint8), np.zeros((3, 4), np.int8), np.zeros((2, 4), np.int64)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="scales"):
        K.int8_matmul_acc(X, Y, C, 1, estimate=(3, 1e-14, side(rng, 2, True), side(rng, 4, False), False, False))
    with pytest.raises(ValueError, match="estimate must be"):
        K.int8_matmul_acc(X, Y, C, 1, estimate=(3, 1e-14))


CASES = [("int8", (7, 1), {}), ("int8", 1, {}), ("int8", (4, 4), {"kernel": "int8"}), ("int8", (2, 3, 3), {}),
         ("real", (7, 1), {}), ("real", 1, {"scale": "axis"}), ("real", (4, 4), {"bits": 8, "kernel": "int8"}),
         ("int16", (8, 8), {"bits": 16})]


@pytest.mark.parametrize("kind,widths,kw", CASES)
def test_layered_estimate_written_by_kernel_is_bit_identical(monkeypatch, kind, widths, kw):
    """Every published quantity with the kernel writing the estimate (increment_published) equals
    the one of the separate estimate pass, intervals included; the fused step does run."""
    rng = np.random.default_rng(len(str(widths)))
    m, k, n = 67, 301, 45
    if kind == "real":
        A, B = rng.standard_normal((m, k)), rng.standard_normal((k, n)).astype(np.float32)
    else:
        dt = np.int8 if kind == "int8" else np.int16
        A, B = extremes(rng, dt, (m, k)), extremes(rng, dt, (k, n))
    monkeypatch.setenv("MPILAYER_FULL_PRODUCTS", "1")  # whole products: resolutions the kernel can publish
    fused = []
    real_step = LayeredProduct.increment_published
    monkeypatch.setattr(LayeredProduct, "increment_published",
                        lambda self: fused.append(self.next_resolution) or real_step(self))
    got = list(layered_matmul(A, B, component_bits=widths, **kw))
    assert fused, "the kernel wrote no estimate"
    monkeypatch.setattr(LayeredProduct, "publishes_in_kernel", lambda self: False)
    want = list(layered_matmul(A, B, component_bits=widths, **kw))
    for g, w in zip(got, want, strict=True):
        assert g.estimate.dtype == w.estimate.dtype
        np.testing.assert_array_equal(g.estimate, w.estimate)
        assert (g.error_bound, g.error_estimate, g.quantization_error_bound, g.quantization_error_estimate,
                g.kernels) == (w.error_bound, w.error_estimate, w.quantization_error_bound,
                               w.quantization_error_estimate, w.kernels)
        for x, y in zip(g.error_interval(), w.error_interval()):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("dtype,bits", [(np.int8, 8), (np.int8, 6), (np.int16, 16), (np.int16, 12)])
def test_prepared_operands_and_statistics_as_unfused(dtype, bits):
    """prepare's fused passes (range, then q - z with the statistics) give the operands and every
    statistic of shifted() + SideStats.add, and the zero points of zero_points_of."""
    from mpilayer.core.estimates import zero_points_of
    rng = np.random.default_rng(bits)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    A = rng.integers(lo, hi + 1, (37, 301)).astype(dtype)
    B = rng.integers(0, hi + 1, (301, 70)).astype(dtype)
    product, _ = prepare(A, B, bits, (1, bits - 1))
    for q, axis, block, stats in ((A, 1, product.a, product.a_stats), (B, 0, product.b, product.b_stats)):
        z = zero_points_of(q, bits, axis)
        np.testing.assert_array_equal(stats.zero, z)
        qp = shifted(q, z, axis)
        np.testing.assert_array_equal(block.values, qp)
        want = SideStats(product.split, z, q.shape[1 - axis] if axis == 0 else q.shape[1])
        want.add(qp if axis == 1 else qp.T)
        for name in ("sq", "sqq", "sabs", "sabs_full", "qmin", "qmax", "sd", "sdd", "sqd", "pos", "neg"):
            np.testing.assert_array_equal(getattr(stats, name), getattr(want, name), err_msg=name)
    assert layered._quantize(A, bits, "A", None).values is A or bits != 8 * A.itemsize


def test_estimate_tile_fused_matches(monkeypatch):
    """estimates.tile_estimate with ``fused`` doing the elementwise pass gives what its own pass gives."""
    rng = np.random.default_rng(2)
    A, B = rng.integers(-128, 128, (30, 200), dtype=np.int8), rng.integers(-128, 128, (200, 20), dtype=np.int8)
    product, _ = prepare(A, B, 8, (3, 5))
    product.increment()
    acc = product.acc.copy()
    want = tile_estimate(acc, 0, product.a_stats, product.b_stats, interval=False, scaled=True)
    got = tile_estimate(None, 0, product.a_stats, product.b_stats, interval=False, scaled=True,
                        fused=lambda e: (lambda out: (out, *K.estimate_tile(acc, e[0], 0, e[1], e[2], e[3], e[4],
                                                                            True, False, e[5], out)[3:]))(acc.copy()))
    np.testing.assert_array_equal(got.estimate, want.estimate)
    assert (got.bound, got.var_sum, got.estimate_sq, got.peak) == (want.bound, want.var_sum, want.estimate_sq,
                                                                   want.peak)


@pytest.mark.parametrize("k,n", [(1, 1), (3, 5), (4, 64), (37, 130), (256, 65), (1027, 200)])
def test_pack_int8_shifted_while_packed(k, n):
    """``pack_int8(Y, shift)`` packs ``Y >> shift`` (arithmetic), whole quads and edges alike, and
    the products use it as such."""
    rng = np.random.default_rng(k + n)
    Y = extremes(rng, np.int8, (k, n))
    X = rng.integers(0, 256, (3, k), dtype=np.uint8)
    for shift in range(8):
        want = np.ascontiguousarray(Y >> shift)
        np.testing.assert_array_equal(K.pack_int8(Y, shift).data, K.pack_int8(want).data)
        C = np.zeros((3, n), np.int64)
        K.int8_matmul_acc(X, K.pack_int8(Y, shift), C, 1, 255, method="c")
        np.testing.assert_array_equal(C, X.astype(np.int64) @ want.astype(np.int64))
    with pytest.raises(ValueError, match="shift"):
        K.pack_int8(Y, 8)


@pytest.mark.parametrize("kind,scale", [("int8", "tensor"), ("real", "tensor"), ("real", "axis")])
def test_worker_tile_published_by_kernel_is_tile_report(kind, scale):
    """A tile of a distributed result as a worker publishes it (worker.WorkerState.published: the
    kernel writes the estimate, layered.kernel_published, or the exact tile, layered.kernel_exact,
    on the tile's blocks and its rows' / columns' statistics) is tile_report's over the tile's
    accumulator, bit for bit; and a B block's truncated sums taken from the statistics
    (worker._read) are its own column sums."""
    from mpilayer.core.layered import kernel_exact, kernel_published, one_kernel_pass, reported_bound
    from mpilayer.core.products import OperandBlock, add_terms, resolution_terms
    from mpilayer.core.tile_progress import tile_report
    rng = np.random.default_rng(5)
    m, k, n = 61, 203, 47
    if kind == "real":
        A, B = rng.standard_normal((m, k)), np.maximum(rng.standard_normal((k, n)), 0).astype(np.float32)
    else:
        A, B = extremes(rng, np.int8, (m, k)), extremes(rng, np.int8, (k, n))
    product, _ = prepare(A, B, 8, (7, 1), scale=scale)
    split, rows, cols = product.split, slice(9, 50), slice(5, 37)
    a = OperandBlock(product.a.values[rows], "A", 8)
    b = OperandBlock(np.ascontiguousarray(product.b.values[:, cols]), "B", 8)
    fed = OperandBlock(b.values, "B", 8)
    fed.truncated_sums = layered.TruncatedSums(product.b_stats.part(cols))  # as worker._read gives them
    for r in range(split.n_resolutions):
        for fa, fb in resolution_terms(split, r, r > 0):
            np.testing.assert_array_equal(fed.column_sums(fb), b.column_sums(fb))
    last = split.n_resolutions - 1
    exact_terms = resolution_terms(split, last, True)
    acc = add_terms(None, a, b, exact_terms)[0]
    sa = None if product.sa is None else product.sa[rows]
    sb = None if product.sb is None else product.sb[cols]
    want = tile_report(last, acc, product.a_stats, product.b_stats, rows, cols, sa, sb)
    tile, est_sq, kernels = kernel_exact(a, fed, exact_terms, product.a_stats.part(rows), product.b_stats.part(cols),
                                         sa, sb)
    assert kernels == ("int8",) and tile.dtype == want[0].dtype and est_sq == want[3]
    np.testing.assert_array_equal(tile, want[0])
    terms = resolution_terms(split, 0)
    assert one_kernel_pass(terms, a.length, b.length, k)
    te, kernels = kernel_published(0, a, fed, terms, product.a_stats.part(rows), product.b_stats.part(cols), sa, sb)
    want = tile_report(0, add_terms(None, a, b, terms)[0], product.a_stats, product.b_stats, rows, cols, sa, sb)
    assert kernels == ("int8",) and te.estimate.dtype == want[0].dtype
    np.testing.assert_array_equal(te.estimate, want[0])
    assert (reported_bound(te, sa), te.var_sum, te.estimate_sq) == want[1:]


def test_truncation_sums_left_for_later_are_those_of_one_pass():
    """The preparation takes resolution 0's truncation sums only (SideStats.add(now=)); the others
    come in one more pass when resolution 1 first needs them, also through a part's views, and
    equal the sums of one pass over every truncation."""
    from mpilayer.core.estimates import SideStats
    rng = np.random.default_rng(11)
    A, B = extremes(rng, np.int8, (37, 301)), extremes(rng, np.int8, (301, 45))
    product, _ = prepare(A, B, 8, 1)
    eager = []
    for q, axis, stats in ((product.a.values, 1, product.a_stats), (product.b.values, 0, product.b_stats)):
        want = SideStats(product.split, stats.zero, 301)
        want.add(q if axis == 1 else q.T)
        eager.append(want)
    rows = slice(3, 30)
    part = product.a_stats.part(rows)
    assert product.a_stats._deferred and product.b_stats._deferred
    product.increment()
    assert product.a_stats._deferred, "resolution 0 took the later resolutions' sums"
    np.testing.assert_array_equal(part.fit(4)[0], eager[0].part(rows).fit(4)[0])  # a part completes its whole
    assert not product.a_stats._deferred
    np.testing.assert_array_equal(product.b.truncated_sums[2], eager[1].rowsum_t(product.split.n_resolutions - 3))
    for stats, want in zip((product.a_stats, product.b_stats), eager):
        for name in ("sq", "sqq", "sabs", "sabs_full", "qmin", "qmax", "sd", "sdd", "sqd", "pos", "neg"):
            np.testing.assert_array_equal(getattr(stats, name), getattr(want, name), err_msg=name)


FIELDS = [(np.int8, 8, 0, 8, True), (np.int8, 8, 1, 7, True), (np.int8, 8, 0, 1, False), (np.int8, 8, 3, 4, False),
          (np.int8, 5, 2, 3, True), (np.int16, 16, 0, 16, True), (np.int16, 16, 8, 8, True),
          (np.int16, 16, 0, 8, False), (np.int16, 12, 0, 12, True), (np.int16, 12, 2, 10, True),
          (np.int16, 16, 3, 9, False), (np.int16, 11, 0, 3, False)]


@pytest.mark.parametrize("dtype,bits,lo,width,signed", FIELDS)
@pytest.mark.parametrize("d", [8, 7, 3])
def test_field_digits_one_pass(dtype, bits, lo, width, signed, d):
    """``field_digits`` gives, bit for bit, the digits the kernels take, computed here with numpy
    from their definition: x = the field (sign-extended when it is the top of sign-extended
    values), digit t = (x >> d t) & (2^d - 1), the top digit x >> d (n-1) (masked unless signed),
    each XORed with its flip; extremes and odd shapes included."""
    rng = np.random.default_rng(bits * 100 + lo * 10 + width + d)
    q = extremes(rng, dtype, (37, 301))
    q = np.clip(q, -(1 << (bits - 1)), (1 << (bits - 1)) - 1).astype(dtype)  # sign-extended `bits` values
    n = -(-width // d)
    flips = [int(f) for f in rng.integers(0, 256, n)]
    x = q.astype(np.int64) >> lo
    if not signed:
        x &= (1 << width) - 1
    want = []
    for t in range(n):
        y = x >> (d * t)
        if t < n - 1:
            y &= (1 << d) - 1
        elif not signed:
            y &= (1 << (width - d * t)) - 1
        want.append(((y ^ flips[t]) & 0xff).astype(np.uint8))
    got = K.field_digits(q, lo, width, signed, d, n, flips)
    assert len(got) == n
    for g, w in zip(got, want):
        assert g.dtype == np.uint8 and g.shape == q.shape
        np.testing.assert_array_equal(g, w)


def test_field_digits_errors():
    q = np.zeros((3, 4), np.int8)
    with pytest.raises(ValueError, match="bad field"):
        K.field_digits(q, 4, 8, False, 8, 1, [0])  # beyond int8
    with pytest.raises(ValueError, match="bad field"):
        K.field_digits(q, 0, 8, False, 4, 1, [0])  # 8 bits in one 4-bit digit
    with pytest.raises(TypeError, match="dtype"):
        K.field_digits(q.astype(np.int32), 0, 8, False, 8, 1, [0])
