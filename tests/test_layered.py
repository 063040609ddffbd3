"""Exactness and certified bounds of the single-process layered product."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import exact_int_product, random_ints

import mpilayer
from mpilayer.core.components import make_split

SPLITS = {
    8: [None, 1, (8,), (1, 1, 2, 4), (4, 4), (2, 6), (1, 7)],
}


def check_all_resolutions(A, B, bits, component_bits=None, kernel=None):
    exact = exact_int_product(A, B)
    res = list(mpilayer.layered_matmul(A, B, bits=bits, component_bits=component_bits, kernel=kernel))
    n_res = make_split(bits, component_bits).n_resolutions
    assert [r.index for r in res] == list(range(n_res))
    assert [r.exact for r in res] == [False] * (n_res - 1) + [True]
    assert res[-1].error_bound == 0
    assert res[-1].estimate.dtype == np.int64
    np.testing.assert_array_equal(res[-1].estimate, exact)
    for r in res:
        err = np.abs(exact - r.estimate)
        assert err.max(initial=0) <= r.error_bound, (r.index, err.max(), r.error_bound)
        lo, hi = r.error_interval()
        diff = exact - r.estimate
        assert np.all(lo <= diff) and np.all(diff <= hi)
    return res


@pytest.mark.parametrize("bits", range(2, 17))
@pytest.mark.parametrize("kernel", [None, "popcount", "int8"])
def test_every_bits_random_and_extremes(bits, kernel):
    rng = np.random.default_rng(bits)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    m, k, n = 7, 131, 5  # k not a multiple of 64 or of any block
    A, B = random_ints(rng, (m, k), bits), random_ints(rng, (k, n), bits)
    A[0], A[1] = lo, hi
    B[:, 0], B[:, 1] = lo, hi
    for comp in {None, 1, (bits,), (1, bits - 1), (bits - 1, 1)}:
        check_all_resolutions(A, B, bits, comp, kernel)


@pytest.mark.parametrize("value_a", ["min", "max"])
@pytest.mark.parametrize("value_b", ["min", "max"])
@pytest.mark.parametrize("bits", [2, 8, 9, 16])
def test_all_extreme_values(bits, value_a, value_b):
    extreme = {"min": -(1 << (bits - 1)), "max": (1 << (bits - 1)) - 1}
    k = 200
    A = np.full((3, k), extreme[value_a], dtype=np.int64)
    B = np.full((k, 4), extreme[value_b], dtype=np.int64)
    for comp in (None, 1, (bits,)):
        check_all_resolutions(A, B, bits, comp)


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 300, 1), (0, 5, 3), (3, 5, 0), (4, 0, 3),
                                   (65, 64, 63), (2, 1025, 70), (17, 1, 9)])
def test_shapes(shape):
    m, k, n = shape
    rng = np.random.default_rng(0)
    A, B = random_ints(rng, (m, k), 8).astype(np.int8), random_ints(rng, (k, n), 8).astype(np.int8)
    for comp in (None, (1, 1, 2, 4)):
        res = check_all_resolutions(A, B, 8, comp)
        assert res[-1].estimate.shape == (m, n)


@pytest.mark.parametrize("layout", ["fortran", "strided", "transposed_view"])
def test_non_contiguous_inputs(layout):
    rng = np.random.default_rng(3)
    A = random_ints(rng, (40, 90), 8).astype(np.int8)
    B = random_ints(rng, (90, 30), 8).astype(np.int8)
    if layout == "fortran":
        A2, B2 = np.asfortranarray(A), np.asfortranarray(B)
    elif layout == "strided":
        A2 = np.zeros((80, 180), np.int8)[::2, ::2]
        A2[...] = A
        B2 = np.zeros((180, 90), np.int8)[::2, ::3]
        B2[...] = B
    else:
        A2, B2 = np.ascontiguousarray(A.T).T, np.ascontiguousarray(B.T).T
    assert not A2.flags.c_contiguous
    for comp in (None, 1):
        check_all_resolutions(A2, B2, 8, comp)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16])
def test_integer_dtypes(dtype):
    rng = np.random.default_rng(5)
    info = np.iinfo(dtype)
    lo, hi = max(info.min, -128), min(info.max, 127)
    A = rng.integers(lo, hi + 1, (6, 33)).astype(dtype)
    B = rng.integers(lo, hi + 1, (33, 4)).astype(dtype)
    check_all_resolutions(A, B, 8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    bits=st.integers(2, 16),
    shape=st.tuples(st.integers(0, 9), st.integers(0, 150), st.integers(0, 9)),
    seed=st.integers(0, 2**32 - 1),
    split_seed=st.integers(0, 2**32 - 1),
    kernel=st.sampled_from([None, "popcount", "int8"]),
)
def test_property_bounds_hold(bits, shape, seed, split_seed, kernel):
    rng = np.random.default_rng(seed)
    m, k, n = shape
    A, B = random_ints(rng, (m, k), bits), random_ints(rng, (k, n), bits)
    # random composition of bits into components
    cuts = sorted(np.random.default_rng(split_seed).choice(np.arange(1, bits), size=min(bits - 1, split_seed % 4), replace=False))
    widths = tuple(np.diff([0, *cuts, bits]).tolist())
    check_all_resolutions(A, B, bits, widths, kernel)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), scale=st.sampled_from(["tensor", "axis"]),
       bits=st.integers(2, 16), dtype=st.sampled_from([np.float32, np.float64]))
def test_property_real_inputs(seed, scale, bits, dtype):
    rng = np.random.default_rng(seed)
    A = (rng.standard_normal((6, 40)) * rng.uniform(0.1, 100, (6, 1))).astype(dtype)
    B = (rng.standard_normal((40, 5)) * rng.uniform(0.1, 100, (1, 5))).astype(dtype)
    res = list(mpilayer.layered_matmul(A, B, bits=bits, scale=scale, component_bits=1))
    final = res[-1]
    assert final.exact and final.error_bound == 0 and final.estimate.dtype == np.float64
    for r in res:
        assert np.abs(final.estimate - r.estimate).max() <= r.error_bound
        lo, hi = r.error_interval()
        d = final.estimate - r.estimate
        assert np.all(lo <= d) and np.all(d <= hi)
    true = A.astype(np.float64) @ B.astype(np.float64)
    assert np.abs(true - final.estimate).max() <= final.quantization_error_bound


def test_real_exact_equals_scaled_quantised_product():
    rng = np.random.default_rng(9)
    A, B = rng.standard_normal((20, 64)), rng.standard_normal((64, 10))
    qa, qb = mpilayer.quantize(A, 8, "A"), mpilayer.quantize(B, 8, "B")
    ref = exact_int_product(qa.values, qb.values) * (float(qa.scale) * float(qb.scale))
    final = list(mpilayer.layered_matmul(A, B))[-1]
    np.testing.assert_allclose(final.estimate, ref, rtol=1e-15, atol=0)
    assert np.abs(qa.values).max() == 127


def test_each_resolution_is_incremental():
    """After resolution r the accumulator is the product of the zero-pointed operands truncated
    to r+1 components, and the exact end adds the zero points back (in the last kernel pass: the
    last accumulator is the exact product itself)."""
    from mpilayer.core.estimates import zero_points_of
    from mpilayer.core.layered import prepare
    rng = np.random.default_rng(11)
    A, B = random_ints(rng, (9, 77), 8), random_ints(rng, (77, 6), 8)
    A[:3] = np.abs(A[:3])  # nonnegative rows get a nonzero zero point
    split = make_split(8, (1, 1, 2, 4))
    product, _ = prepare(A, B, 8, (1, 1, 2, 4))
    za, zb = zero_points_of(A, 8, 1), zero_points_of(B, 8, 0)
    assert za[:3].min() > 0
    ap, bp = A - za[:, None], B - zb[None, :]
    for r in range(split.n_resolutions - 1):
        product.increment()
        s = split.shift(r)
        np.testing.assert_array_equal(product.acc, exact_int_product((ap >> s) << s, (bp >> s) << s))
    product.increment()
    np.testing.assert_array_equal(product.acc, exact_int_product(A, B))
    np.testing.assert_array_equal(product.tile(split.n_resolutions - 1).estimate, exact_int_product(A, B))


@pytest.mark.parametrize("bad, err, match", [
    (dict(A=np.zeros((2, 3)), B=np.zeros((4, 2))), ValueError, "do not chain"),
    (dict(A=np.zeros((2, 3), np.complex128), B=np.zeros((3, 2))), TypeError, "unsupported dtype"),
    (dict(A=np.array([[1.0, np.nan]]), B=np.ones((2, 1))), ValueError, "NaN or Inf"),
    (dict(A=np.ones((1, 2)), B=np.array([[np.inf], [1.0]])), ValueError, "B has NaN or Inf"),
    (dict(A=np.ones((2, 2), np.int8), B=np.ones((2, 2), np.int8), bits=1), ValueError, "out of range"),
    (dict(A=np.ones((2, 2), np.int8), B=np.ones((2, 2), np.int8), bits=17), ValueError, "out of range"),
    (dict(A=np.array([[300]], np.int16), B=np.ones((1, 1), np.int16)), ValueError, r"do not fit bits=8.*bits=10"),
    (dict(A=np.ones(3), B=np.ones((3, 1))), ValueError, "must be 2-D"),
    (dict(A="x", B=np.ones((3, 1))), TypeError, "numpy array"),
    (dict(A=np.ones((2, 2), np.int8), B=np.ones((2, 2), np.int8), component_bits=(3, 3)), ValueError, "summing to bits=8"),
    (dict(A=np.ones((2, 2)), B=np.ones((2, 2)), scale="rows"), ValueError, "scale="),
    (dict(A=np.ones((2, 2), bool), B=np.ones((2, 2))), TypeError, "unsupported dtype"),
])
def test_bad_input(bad, err, match):
    with pytest.raises(err, match=match):
        next(iter(mpilayer.layered_matmul(**bad)))


def test_default_schedule():
    assert mpilayer.default_component_bits(8) == (1, 7)
    assert mpilayer.default_component_bits(16) == (1, 7, 7, 1)
    assert mpilayer.default_component_bits(2) == (1, 1)


@pytest.mark.parametrize("bits", [2, 5, 8, 9, 16])
def test_side_sums_from_planes(bits):
    from reference import pos_neg_sums

    from mpilayer.core.products import OperandBlock
    rng = np.random.default_rng(bits)
    q = random_ints(rng, (13, 200), bits)
    q[0] = -(1 << (bits - 1))
    dtype = np.int8 if bits <= 8 else np.int16
    for side, axis, arr in (("A", 1, q), ("B", 0, q.T.copy())):
        block = OperandBlock(arr.astype(dtype), side, bits)
        for shift in range(bits):
            got = block.side_sums(shift)
            pos, neg = pos_neg_sums(arr, shift, axis)
            np.testing.assert_array_equal(got.pos, pos)
            np.testing.assert_array_equal(got.neg, neg)


@pytest.mark.parametrize("bits, comp", [(8, None), (8, 1), (16, None), (4, (1, 3)), (16, (8, 8))])
def test_increment_bound_holds(bits, comp):
    """The a-priori bound that lets workers send int32 increments is never exceeded."""
    from mpilayer.core.products import OperandBlock, add_terms, increment_bound, resolution_terms
    split = make_split(bits, comp)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    dtype = np.int8 if bits <= 8 else np.int16
    k = 300
    for A, B in ((np.full((3, k), lo), np.full((k, 2), lo)), (np.full((3, k), lo), np.full((k, 2), hi)),
                 (random_ints(np.random.default_rng(0), (3, k), bits), random_ints(np.random.default_rng(1), (k, 2), bits))):
        a, b = OperandBlock(A.astype(dtype), "A", bits), OperandBlock(B.astype(dtype), "B", bits)
        for r in range(split.n_resolutions):
            inc, _ = add_terms(None, a, b, resolution_terms(split, r))
            assert np.abs(inc).max() <= increment_bound(split, r, k)


@pytest.mark.parametrize("scale", ["tensor", "axis"])
def test_quantization_error_estimate_tracks_the_measured_error(scale):
    """Real inputs: the statistical estimate of |A B - exact|_F / |exact|_F (rounding to fixed
    point) is within a small factor of the measured one; integers have none."""
    rng = np.random.default_rng(7)
    for A, B in ((rng.standard_normal((120, 300)), rng.standard_normal((300, 90))),
                 (rng.standard_normal((60, 500)), np.maximum(rng.standard_normal((500, 70)), 0))):
        for bits in (6, 8, 12):
            last = list(mpilayer.layered_matmul(A, B, bits=bits, scale=scale))[-1]
            measured = np.linalg.norm(A @ B - last.estimate) / np.linalg.norm(last.estimate)
            assert 0.7 * measured <= last.quantization_error_estimate <= 1.5 * measured, (bits, measured)
    ints = rng.integers(-50, 50, (20, 30)), rng.integers(-50, 50, (30, 10))
    assert all(r.quantization_error_estimate == 0 for r in mpilayer.layered_matmul(*ints))


@pytest.mark.parametrize("kernel", [None, "popcount"])
@pytest.mark.parametrize("kind", ["int8", "float"])
@pytest.mark.parametrize("comp", [(7, 1), (1, 1, 2, 4), (4, 4), 1])
def test_in_place_publishing_changes_nothing(monkeypatch, kind, comp, kernel):
    """Publishing an estimate over the accumulator (when the next resolution is a whole product),
    the accumulator updated in place, and the exact product's zero-point terms written in the
    kernel's pass change nothing: every resolution equals, bit for bit, that of a run with whole
    products forced off (no accumulator overwritten), estimates yielded earlier are untouched by
    later resolutions, and the intervals (computed again once the product moved on) agree and
    hold the exact product. ``popcount``: the starts (offsets, zero-point terms) written by numpy
    before the binary-plane kernel instead of in the int8 kernel's pass."""
    rng = np.random.default_rng(5)
    if kind == "int8":
        A, B = random_ints(rng, (23, 150), 8), random_ints(rng, (150, 37), 8)
        A[:5] = np.abs(np.maximum(A[:5], -127))  # nonzero zero points
    else:
        A, B = np.maximum(rng.standard_normal((23, 150)), 0), rng.standard_normal((150, 37))
    runs = {}
    for full in ("0", "1"):
        monkeypatch.setenv("MPILAYER_FULL_PRODUCTS", full)
        res, copies = [], []
        for r in mpilayer.layered_matmul(A, B, component_bits=comp, kernel=kernel):
            res.append(r)
            copies.append(r.estimate.copy())
        for r, c in zip(res, copies):
            np.testing.assert_array_equal(r.estimate, c)
        runs[full] = res
    exact = runs["0"][-1].estimate
    want = exact_int_product(A, B) if kind == "int8" else None
    if want is not None:
        np.testing.assert_array_equal(exact, want)
    for x, y in zip(runs["0"], runs["1"]):
        np.testing.assert_array_equal(x.estimate, y.estimate)
        assert (x.error_bound, x.error_estimate, x.quantization_error_estimate) == \
            (y.error_bound, y.error_estimate, y.quantization_error_estimate)
        (lo, hi), (lo1, hi1) = x.error_interval(), y.error_interval()
        np.testing.assert_array_equal(lo, lo1)
        np.testing.assert_array_equal(hi, hi1)
        diff = np.asarray(exact, dtype=np.float64) - x.estimate
        assert np.all(lo <= diff) and np.all(diff <= hi)


@pytest.mark.parametrize("scale", ["tensor", "axis"])
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_prepare_quantizes_and_bounds_as_quantization_does(bits, scale):
    """prepare's compiled rounding and its quantisation bound from the statistics give exactly
    quantization.quantize's values and quantization_error_bound (real, integer and mixed
    operands, an all-zero one, float32, empty)."""
    from mpilayer.core.layered import prepare
    from mpilayer.core.quantization import quantization_error_bound, quantize
    rng = np.random.default_rng(bits)
    cases = [(rng.standard_normal((30, 70)), rng.standard_normal((70, 20))),
             (rng.integers(-7, 7, (30, 70)).astype(np.int8), rng.standard_normal((70, 20)).astype(np.float32)),
             (rng.standard_normal((30, 70)).astype(np.float32) * 1e6, rng.integers(-5, 5, (70, 20))),
             (np.maximum(rng.standard_normal((64, 900)), 0), rng.standard_normal((900, 33))),
             (np.zeros((3, 4)), np.arange(8.0).reshape(4, 2) * 0.5),
             (rng.standard_normal((0, 4)), rng.standard_normal((4, 2)))]
    axis_a, axis_b = {"tensor": (None, None), "axis": (0, 1)}[scale]
    for A, B in cases:
        product, bound = prepare(A, B, bits, None, scale)
        qa, qb = quantize(A, bits, "A", axis_a), quantize(B, bits, "B", axis_b)
        for got, want in ((product.qa, qa), (product.qb, qb)):
            assert got.values.dtype == want.values.dtype
            np.testing.assert_array_equal(got.values, want.values)
            np.testing.assert_array_equal(got.scale, want.scale)
        assert bound == quantization_error_bound(A, B, qa, qb)
