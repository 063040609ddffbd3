"""The master's compiled passes (cython_kernels/quantize.c) against their numpy definitions,
bit for bit: fused quantise-and-encode, component encoding, the direct sums of SideStats (bits >
8) and the exact tile as published."""
import numpy as np
import pytest
from reference import add_direct

from mpilayer import _kernels
from mpilayer.core.components import BitField, ComponentSplit
from mpilayer.core.estimates import SideStats, shifted, tile_estimate
from mpilayer.core.layered import scaled_estimate
from mpilayer.core.quantization import quantize_real_block
from mpilayer.core.wire_format import encode_component, encode_component_numpy

SHAPES = [(0, 5), (5, 0), (1, 1), (1, 13), (13, 1), (7, 9), (3, 64), (17, 33), (64, 70)]


def reference(x, scale, zero, bits, axis, fields):
    """quantize_real_block, shifted and encode_component_numpy, as the master did before."""
    s = scale if np.ndim(scale) == 0 else (scale[:, None] if axis == 0 else scale[None, :])
    q = quantize_real_block(x, s, bits)
    if zero is not None and zero.any():
        q = shifted(q, zero, 1 if axis == 0 else 0)
    q = np.ascontiguousarray(q)
    return q, [encode_component_numpy(q, BitField(lo, lo + w, bits)) for lo, w in fields]


def split_fields(rng, bits):
    """Random component widths covering ``bits``, most significant first, as (lo, width)."""
    out, hi = [], bits
    while hi > 0:
        w = int(rng.integers(1, min(hi, 9) + 1))
        out.append((hi - w, w))
        hi -= w
    return out


def make_x(rng, shape, dtype, kind, qmax):
    x = rng.standard_normal(shape)
    if kind == "ties":  # x / s exactly halfway between integers: half to even must win
        x = rng.integers(-qmax, qmax + 1, shape) + 0.5
    elif kind == "extreme":  # overflowing x / s and huge values, both signs
        big = np.finfo(dtype).max
        x = np.where(rng.random(shape) < 0.3, big, x) * np.where(rng.random(shape) < 0.5, 1, -1)
    elif kind == "tiny":
        x = np.where(rng.random(shape) < 0.5, np.finfo(dtype).tiny, x) * np.where(rng.random(shape) < 0.5, 1, -1)
    elif kind == "zeros":
        x = np.where(rng.random(shape) < 0.5, 0.0, -0.0) * np.ones(shape)
    return np.ascontiguousarray(x.astype(dtype))


def assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("method", _kernels.quantize_methods())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["gauss", "ties", "extreme", "tiny", "zeros", "max_scaled"])
def test_quantize_encode_matches_numpy(dtype, kind, method):
    """Every quantising loop the CPU runs (portable, AVX-512), on whole blocks and on blocks cut
    from wider rows (read in place), against numpy."""
    rng = np.random.default_rng(abs(hash((np.dtype(dtype).name, kind))) % 2**32)
    for trial, shape in enumerate(SHAPES * 3 + [(3, 1000), (2, 4099)]):
        bits = int(rng.integers(2, 17))
        qmax = (1 << (bits - 1)) - 1
        x = make_x(rng, shape, dtype, kind, qmax)
        axis = trial % 2
        length = shape[axis]
        if kind == "max_scaled":  # the master's scale: max|x| maps to qmax
            amax = np.abs(x).max(axis=1 - axis).astype(np.float64) if x.size else np.zeros(length)
            scale = np.where(amax > 0, amax / qmax, 1.0) if trial % 3 else np.asarray(max(amax.max(initial=0), 1e-3) / qmax)
        elif kind == "ties":
            scale = np.ones(length) if trial % 3 else np.asarray(1.0)
        else:
            scale = rng.random(length) * 3 + 1e-3 if trial % 3 else np.asarray(np.float64(rng.random() + 1e-3))
        zero = None if trial % 4 == 0 else rng.integers(-(qmax // 2), qmax // 2 + 1, length).astype(np.int64)
        fields = split_fields(rng, bits)
        with np.errstate(over="ignore"):
            q_ref, bufs_ref = reference(x, scale, zero, bits, axis, fields)
        q, bufs = _kernels.quantize_encode(x, scale, zero, bits, axis, fields, method=method)
        assert q.flags.c_contiguous
        assert_same([q], [q_ref])
        assert_same(bufs, bufs_ref)
        wide = np.zeros((shape[0], shape[1] + 5), dtype=dtype)  # x as a column range of wider rows
        wide[:, 3:3 + shape[1]] = x
        q, bufs = _kernels.quantize_encode(wide[:, 3:3 + shape[1]], scale, zero, bits, axis, fields, method=method)
        assert_same([q], [q_ref])
        assert_same(bufs, bufs_ref)


def test_rounding_is_half_to_even_and_divides():
    # 0.5, 1.5, 2.5, -0.5, -1.5, -2.5 over scale 1; and x / s where x * (1 / s) rounds differently
    x = np.array([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.4999999, 126.5]], dtype=np.float64)
    q, _ = _kernels.quantize_encode(x, np.asarray(1.0), None, 8, 0)
    np.testing.assert_array_equal(q, np.rint(x).astype(np.int8))
    rng = np.random.default_rng(5)
    s = np.asarray(0.1)
    x = (rng.integers(-1200, 1200, (1, 4096)) + 0.5) * 0.1  # near ties after division by 0.1
    q, _ = _kernels.quantize_encode(np.ascontiguousarray(x), s, None, 12, 0)
    np.testing.assert_array_equal(q, quantize_real_block(x, s, 12))


def test_quantize_encode_rejects_bad_arguments():
    x = np.zeros((3, 4), dtype=np.float32)
    with pytest.raises(TypeError):
        _kernels.quantize_encode(x, np.asarray(1.0, dtype=np.float32), None, 8, 0)  # float32 scale
    with pytest.raises(ValueError):
        _kernels.quantize_encode(x, np.ones(4), None, 8, 0)  # scale along the wrong axis
    with pytest.raises(ValueError):
        _kernels.quantize_encode(x, np.asarray(1.0), None, 8, 0, [(6, 3)])  # field beyond 8 bits
    with pytest.raises(ValueError):
        _kernels.quantize_encode(x, np.asarray(1.0), None, 8, 0, method="sse")
    fortran = np.asfortranarray(np.arange(12.0).reshape(3, 4))  # copied to rows first: same result
    np.testing.assert_array_equal(_kernels.quantize_encode(fortran, np.asarray(1.0), None, 8, 0)[0],
                                  np.arange(12).reshape(3, 4))


@pytest.mark.parametrize("dtype, bits", [(np.int8, 8), (np.int8, 5), (np.int16, 16), (np.int16, 11)])
def test_encode_component_matches_numpy(dtype, bits):
    rng = np.random.default_rng(bits)
    lim = 1 << (bits - 1)
    for shape in SHAPES:
        q = rng.integers(-lim, lim, shape).astype(dtype)
        q.flat[::7] = -lim
        for view in (q, q.T, q[:, ::-1] if q.size else q):
            for lo, w in split_fields(rng, bits) + [(0, bits)]:
                field = BitField(lo, lo + w, bits)
                assert_same([encode_component(view, field)], [encode_component_numpy(view, field)])


@pytest.mark.parametrize("bits", [9, 12, 16])
@pytest.mark.parametrize("transposed", [False, True])
def test_direct_sums_match_numpy(bits, transposed):
    rng = np.random.default_rng(bits + 100 * transposed)
    lim = 1 << (bits - 1)
    for length, k in [(0, 4), (3, 0), (1, 1), (5, 33), (40, 7), (37, 129)]:
        widths = tuple(w for _, w in split_fields(rng, bits))
        split = ComponentSplit(bits, widths)
        q = rng.integers(-lim, lim, (k, length) if transposed else (length, k)).astype(np.int16)
        q.flat[::5] = -lim
        q.flat[1::5] = lim - 1
        qp = q.T if transposed else q
        zero = rng.integers(-100, 100, length).astype(np.int64)
        want, got = SideStats(split, zero, k), SideStats(split, zero, k)
        if qp.size:
            add_direct(want, np.ascontiguousarray(qp))
        got.add(qp)
        for name in ("sq", "sqq", "sabs", "sabs_full", "qmin", "qmax", "sd", "sdd", "sqd", "pos", "neg"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("zero", [False, True])
def test_exact_tile_matches_numpy(scaled, zero):
    rng = np.random.default_rng(7 + scaled + 2 * zero)
    split = ComponentSplit(8, (1, 7))
    for m, n, k in [(0, 3, 5), (3, 0, 5), (1, 1, 1), (9, 13, 40), (32, 20, 70)]:
        qa = rng.integers(-127, 128, (m, k)).astype(np.int8)
        qb = rng.integers(-127, 128, (k, n)).astype(np.int8)
        za = rng.integers(-20, 20, m) if zero else np.zeros(m, dtype=np.int64)
        zb = rng.integers(-20, 20, n) if zero else np.zeros(n, dtype=np.int64)
        a, b = SideStats(split, za, k), SideStats(split, zb, k)
        a.add(qa)
        b.add(qb.T)
        acc = qa.astype(np.int64) @ qb.astype(np.int64)
        sa = rng.random(m) + 0.5 if scaled else None
        sb = rng.random(n) + 0.5 if scaled else None
        te = tile_estimate(acc, split.n_resolutions - 1, a, b, sa, sb, interval=False)
        exact = acc + np.multiply.outer(a.sq + k * za, zb) + np.multiply.outer(za, b.sq)  # A'B' + Z
        want = scaled_estimate(exact, sa, sb)
        got, est_sq, peak = _kernels.exact_tile(acc, a.sq + k * za if zero else None, za if zero else None,
                                                zb if zero else None, b.sq if zero else None, sa, sb)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
        assert est_sq == pytest.approx(te.estimate_sq, rel=1e-12, abs=0)
        assert peak == te.peak


@pytest.mark.parametrize("scaled", [False, True])
def test_exact_tile_sums_rows_in_order_past_a_segment(scaled):
    """exact_tile on rows longer than its 512-column segments: the values numpy's, the sum of
    squares that of each row added column by column, the rows added in order (Python floats,
    the same IEEE additions), the peak the largest magnitude."""
    rng = np.random.default_rng(11 + scaled)
    m, n = 3, 1100
    acc = rng.integers(-2**40, 2**40, (m, n))
    zca, za = rng.integers(-99, 99, m), rng.integers(-9, 9, m)
    zb, sqb = rng.integers(-99, 99, n), rng.integers(-2**20, 2**20, n)
    sa = rng.random(m) + 0.5 if scaled else None
    sb = rng.random(n) * 1e-3 if scaled else None
    exact = acc + np.multiply.outer(zca, zb) + np.multiply.outer(za, sqb)
    want = scaled_estimate(exact, sa, sb)
    got, est_sq, peak = _kernels.exact_tile(acc, zca, za, zb, sqb, sa, sb)
    np.testing.assert_array_equal(got, want)
    total = 0.0
    for row in want.astype(np.float64):
        s = 0.0
        for y in row.tolist():
            s += y * y
        total += s
    assert est_sq == total and peak == float(np.abs(want).max())
