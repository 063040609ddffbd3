"""Exact coded redundancy (--code): the code, its decoder, and the parity-block products.

References are independent of mpilayer: Python ints (object arrays), float64 on small
integers, and determinants by fraction-free elimination written here.
"""
from itertools import combinations, permutations

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import random_ints

from mpilayer.core.coding import Code, det_adjugate, parse_code
from mpilayer.core.components import make_split
from mpilayer.core.products import (CodedBlock, OperandBlock, add_coded_terms, add_terms, integer_matmul,
                                    resolution_terms)
from mpilayer.io.h5io import MatrixSource
from mpilayer.io.operand_readers import CodedOperand, LRUCache, OperandReader

# -- independent helpers ------------------------------------------------------

def coeffs(k, row):
    """Code row ``row`` of the systematic [I; P] code, P[j][i] = (j+1)**i."""
    return [int(i == row) for i in range(k)] if row < k else [(row - k + 1) ** i for i in range(k)]


def combine(blocks, row):
    """sum_i row[i] * blocks[i] in Python ints (object array)."""
    total = np.zeros(np.shape(blocks[0]), dtype=object)
    for c, b in zip(row, blocks):
        total = total + c * np.asarray(b).astype(object)
    return total


def bareiss_det(matrix):
    """Exact integer determinant by fraction-free (Bareiss) elimination."""
    m, n, sign, prev = [list(r) for r in matrix], len(matrix), 1, 1
    for c in range(n - 1):
        if m[c][c] == 0:
            swap = next((r for r in range(c + 1, n) if m[r][c] != 0), None)
            if swap is None:
                return 0
            m[c], m[swap], sign = m[swap], m[c], -sign
        for r in range(c + 1, n):
            for j in range(c + 1, n):
                m[r][j] = (m[r][j] * m[c][c] - m[r][c] * m[c][j]) // prev
        prev = m[c][c]
    return sign * m[n - 1][n - 1]


def leibniz_det(matrix):
    """Determinant by the permutation expansion (tiny matrices only)."""
    n, total = len(matrix), 0
    for p in permutations(range(n)):
        inversions = sum(p[i] > p[j] for i in range(n) for j in range(i + 1, n))
        term = (-1) ** inversions
        for i in range(n):
            term *= matrix[i][p[i]]
        total += term
    return total


def field_of(q, f):
    """Bits [f.lo, f.hi) of every entry of q (Python ints), signed when the field holds the sign bit."""
    def one(v):
        u = ((int(v) % (1 << f.bits)) >> f.lo) & ((1 << f.width) - 1)
        return u - (1 << f.width) if f.hi == f.bits and u >> (f.width - 1) else u
    q = np.asarray(q)
    return np.array([one(v) for v in q.ravel()], dtype=object).reshape(q.shape)


def truncated(q, split, r):
    """q with the bits below resolution r cleared (zero for r = -1), as float64."""
    if r < 0:
        return np.zeros(np.shape(q))
    s = split.shift(r)
    return ((np.asarray(q, dtype=np.int64) >> s) << s).astype(np.float64)


def storage(bits):
    return np.int8 if bits <= 8 else np.int16


def with_extremes(rng, shape, bits):
    """Random bits-bit integers (storage dtype) containing -2**(bits-1) and 2**(bits-1)-1."""
    q = random_ints(rng, shape, bits)
    if q.size >= 2:
        q.flat[0], q.flat[-1] = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return q.astype(storage(bits))


# -- the code and its decoder -------------------------------------------------

@pytest.mark.parametrize("n,k", [(n, k) for n in range(2, 9) for k in range(1, n)])
def test_every_k_subset_decodes_exactly(n, k):
    """Any K of the N code rows give back the K blocks bit-exactly (int64 path, values at +-bound)."""
    code, bound = Code(n, k), 2**45  # 2**45 keeps every decode of N <= 8 in int64, near its limit
    rng = np.random.default_rng(100 * n + k)
    for shape in [(1, 1), (3, 5), (0, 4)]:
        blocks = [rng.integers(-bound, bound + 1, shape) for _ in range(k)]
        if blocks[0].size:
            blocks[0].flat[0], blocks[-1].flat[-1] = bound, -bound
        rows = {c: combine(blocks, coeffs(k, c)).astype(np.int64) for c in range(n)}
        for subset in combinations(range(n), k):
            decoded = code.decode({c: rows[c] for c in subset}, bound)
            assert sorted(decoded) == [i for i in range(k) if i not in subset]
            for i, value in decoded.items():
                assert value.dtype == np.int64 and value.shape == shape
                assert value.tolist() == blocks[i].tolist(), (subset, i)


def test_code_rows_and_total_positivity():
    """Code.row is [I; Vandermonde on nodes 1, 2, ...], and every square submatrix of the parity
    part (N <= 12; all are submatrices of P(12, K)) has a positive determinant, so [I; P] is MDS."""
    for n in range(2, 13):
        for k in range(1, n):
            assert [list(Code(n, k).row(c)) for c in range(n)] == [coeffs(k, c) for c in range(n)]
    checked = 0
    for k in range(1, 12):
        p = [Code(12, k).row(c) for c in range(k, 12)]
        for size in range(1, min(len(p), k) + 1):
            for rows in combinations(range(len(p)), size):
                for cols in combinations(range(k), size):
                    assert bareiss_det([[p[r][c] for c in cols] for r in rows]) > 0, (k, rows, cols)
                    checked += 1
    assert checked == 2**12 - 2 - 11  # sum over K of C(12, K) - 1


def test_det_adjugate_random_and_singular():
    """adj @ M == M @ adj == det * I with det equal to the permutation expansion; singular raises."""
    rng = np.random.default_rng(7)
    seen_singular = 0
    for trial in range(300):
        n = 1 + trial % 5
        m = rng.integers(-4 if trial % 3 else -1, 5 if trial % 3 else 2, (n, n)).tolist()
        det = leibniz_det(m)
        if det == 0:
            seen_singular += 1
            with pytest.raises(ValueError, match="singular"):
                det_adjugate(m)
            continue
        d, adj = det_adjugate(m)
        assert d == det and all(isinstance(x, int) for row in adj for x in row)
        ident = [[det * (i == j) for j in range(n)] for i in range(n)]
        assert [[sum(adj[i][t] * m[t][j] for t in range(n)) for j in range(n)] for i in range(n)] == ident
        assert [[sum(m[i][t] * adj[t][j] for t in range(n)) for j in range(n)] for i in range(n)] == ident
    assert seen_singular > 0
    for singular in ([[0]], [[1, 2], [2, 4]], [[1, 2, 3], [4, 5, 6], [7, 8, 9]]):
        with pytest.raises(ValueError):
            det_adjugate(singular)


@pytest.mark.parametrize("n,k,present", [(5, 3, (0, 3, 4)), (4, 3, (1, 2, 3)), (6, 3, (3, 4, 5))])
def test_decode_python_int_path(n, k, present):
    """Blocks of ~2**62 whose combinations overflow int64 decode exactly (Python-int path),
    both with object-array results and with int64 results under a bound too large for int64."""
    rng = np.random.default_rng(n)
    bound = 2**62 - 12345
    blocks = [rng.integers(-bound, bound + 1, (2, 3)) for _ in range(k)]
    for b in blocks:
        b[0, 0], b[1, 2] = bound, -bound
    results = {c: combine(blocks, coeffs(k, c)) for c in present}
    assert any(abs(v) >= 2**63 for c in present if c >= k for v in results[c].ravel())
    decoded = Code(n, k).decode(results, bound)
    assert {i: v.tolist() for i, v in decoded.items()} == {
        i: blocks[i].tolist() for i in range(k) if i not in present}
    small = [b >> 20 for b in blocks]  # int64 results, but the bound forbids the int64 path
    decoded = Code(n, k).decode({c: combine(small, coeffs(k, c)).astype(np.int64) for c in present}, bound)
    assert {i: v.tolist() for i, v in decoded.items()} == {
        i: small[i].tolist() for i in range(k) if i not in present}


def test_decode_errors_and_unchecked_extra_rows():
    """Fewer than K results: ValueError. A result not divisible by the determinant (rows 3, 4 of
    mds:5,3 on blocks 1, 2 have det 2): ArithmeticError. Only the first parity rows are used, so
    a wrong extra parity row is ignored; all systematic rows present decodes nothing."""
    code, blocks = Code(5, 3), [np.array([[5, -7]]), np.array([[7, 0]]), np.array([[-3, 11]])]
    rows = {c: combine(blocks, coeffs(3, c)).astype(np.int64) for c in range(5)}
    with pytest.raises(ValueError, match="needs 3"):
        code.decode({0: rows[0], 4: rows[4]}, 100)
    bad = rows[4].copy()
    bad[0, 1] += 1
    with pytest.raises(ArithmeticError, match="inconsistent"):
        code.decode({0: rows[0], 3: rows[3], 4: bad}, 100)
    decoded = code.decode({0: rows[0], 1: rows[1], 3: rows[3], 4: bad}, 100)
    assert list(decoded) == [2] and decoded[2].tolist() == blocks[2].tolist()
    assert code.decode({0: rows[0], 1: rows[1], 2: rows[2], 3: bad}, 100) == {}


def test_parse_code():
    """Accepted specs give the right Code; bad ones a one-line ValueError naming --code."""
    assert parse_code("none", 4) is None and parse_code(" none ", 1) is None
    assert parse_code("parity", 4) == Code(4, 3) and parse_code("parity:3", 9) == Code(4, 3)
    assert parse_code("mds:5,3", 2) == Code(5, 3)
    assert Code(4, 3).spec == "parity:3" and Code(5, 3).spec == "mds:5,3"
    for text, workers in [("foo", 4), ("mds:3,3", 4), ("mds:2", 4), ("parity:0", 4), ("mds:40,3", 4),
                          ("parity", 1)]:
        with pytest.raises(ValueError) as info:
            parse_code(text, workers)
        message = str(info.value)
        assert "--code" in message and "\n" not in message, (text, message)


# -- products with parity blocks ---------------------------------------------

def check_integer_matmul(x, bq, bits, widths, r, truncate):
    split = make_split(bits, widths)
    fb = split.truncated(r) if truncate else split.component(r)
    got = integer_matmul(x, OperandBlock(bq, "B", bits), fb)
    expected = x.astype(object) @ field_of(bq, fb)
    assert got.dtype == np.int64 and got.shape == expected.shape
    assert got.tolist() == expected.tolist(), (bits, widths, r, truncate)


@pytest.mark.parametrize("x_kind", ["negative", "equal", "positive", "wide", "zero"])
@pytest.mark.parametrize("mkn", [(3, 130, 4), (2, 1, 3), (0, 5, 2), (3, 5, 0), (1, 64, 1)])
@pytest.mark.parametrize("bits,widths", [(8, (1, 7)), (12, (4, 4, 4)), (16, (1, 7, 8)), (16, (16,))])
def test_integer_matmul_cases(x_kind, mkn, bits, widths):
    """x @ (B field) exactly: negative minimum, all-equal x, positive offset, >14-bit x (three
    7-bit digits), k = 1 / 130 / 64, empty m or n; every component and truncation of B."""
    m, k, n = mkn
    rng = np.random.default_rng(sum(mkn) + bits)
    x = {"negative": rng.integers(-2**20, 2**10, (m, k)), "equal": np.full((m, k), -12345),
         "positive": rng.integers(1000, 1200, (m, k)), "wide": rng.integers(-2**30, 2**30, (m, k)),
         "zero": np.zeros((m, k), dtype=np.int64)}[x_kind].astype(np.int64)
    if x_kind == "negative" and x.size:
        x.flat[0] = -2**20
    bq = with_extremes(rng, (k, n), bits)
    for r in range(len(widths)):
        for truncate in (False, True):
            check_integer_matmul(x, bq, bits, widths, r, truncate)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bits_widths=st.sampled_from([(8, (1, 7)), (8, (1, 3, 4)), (8, (2, 2, 2, 2)), (12, (4, 4, 4)),
                                    (12, (1, 11)), (16, (1, 7, 8)), (16, (16,))]),
       shape=st.tuples(st.integers(0, 5), st.integers(0, 150), st.integers(0, 5)),
       x_lo=st.integers(-2**36, 2**36), x_span=st.integers(0, 2**36), seed=st.integers(0, 2**32 - 1),
       pick=st.integers(0, 100), truncate=st.booleans())
def test_integer_matmul_property(bits_widths, shape, x_lo, x_span, seed, pick, truncate):
    """integer_matmul equals the Python-int product for random x ranges, shapes and B fields."""
    bits, widths = bits_widths
    m, k, n = shape
    rng = np.random.default_rng(seed)
    x = rng.integers(x_lo, x_lo + x_span + 1, (m, k), dtype=np.int64)
    check_integer_matmul(x, with_extremes(rng, (k, n), bits), bits, widths, pick % len(widths), truncate)


@pytest.mark.parametrize("bits,widths", [(8, (1, 7)), (8, (1, 3, 4)), (8, (2, 2, 2, 2)), (12, (4, 4, 4)),
                                         (16, (1, 7, 8))])
def test_add_coded_terms_equals_combined_increments(bits, widths):
    """A CodedBlock holding parity row j's combination of the components of K = 3 blocks of A gives,
    at every resolution, the same combination of the blocks' increments (via add_terms and via
    float64 products of truncated operands)."""
    split, k = make_split(bits, widths), 3
    rng = np.random.default_rng(bits + len(widths))
    blocks = [with_extremes(rng, (4, 70), bits) for _ in range(k)]
    bq = with_extremes(rng, (70, 5), bits)
    b = OperandBlock(bq, "B", bits)
    for j in range(3):
        row = coeffs(k, k + j)
        coded = CodedBlock((4, 70), split)
        for comp in range(split.n_resolutions):
            coded.add_component(comp, combine([field_of(a, split.component(comp)) for a in blocks], row)
                                .astype(np.int64))
        for r in range(split.n_resolutions):
            terms = resolution_terms(split, r)
            got = add_coded_terms(coded, b, terms)
            via_add_terms = sum(c * add_terms(None, OperandBlock(a, "A", bits), b, terms)[0]
                                for c, a in zip(row, blocks))
            exact = sum(c * (truncated(a, split, r) @ truncated(bq, split, r)
                             - truncated(a, split, r - 1) @ truncated(bq, split, r - 1))
                        for c, a in zip(row, blocks))
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, via_add_terms, err_msg=f"row {j}, r {r}")
            np.testing.assert_array_equal(got, exact.astype(np.int64), err_msg=f"row {j}, r {r}")


def narrowest_dtype(width, signed, coefficient_sum):
    """The narrowest signed numpy type holding coefficient_sum times any value of the field."""
    lo, hi = (-2**(width - 1), 2**(width - 1) - 1) if signed else (0, 2**width - 1)
    for dtype in (np.int8, np.int16, np.int32, np.int64):
        top = 2**(8 * np.dtype(dtype).itemsize - 1)
        if -top <= lo * coefficient_sum and hi * coefficient_sum < top:
            return dtype


@pytest.mark.parametrize("bits,widths,n,k", [(8, (1, 7), 5, 3), (12, (4, 4, 4), 4, 2), (16, (1, 7, 8), 7, 4)])
def test_coded_operand_encoded(tmp_path, bits, widths, n, k):
    """CodedOperand.encoded of every (group, code row, panel, component) is the row's combination
    of the group's blocks, as tall as its first block (a shorter or missing member counts as zero
    rows; mds:5,3 pads the short last block under a full one), in the narrowest signed dtype
    of its value range; repeated calls are served from the cache."""
    rng = np.random.default_rng(bits)
    data = with_extremes(rng, (23, 13), bits)  # row blocks of 5: 5, 5, 5, 5, 3
    path = tmp_path / "a.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("/A", data=data)
    split, code = make_split(bits, widths), Code(n, k)
    with MatrixSource(f"{path}:/A") as source:
        coded = CodedOperand(OperandReader(source, "A", split, "tensor", 5, 5, LRUCache(1 << 24)), code)
        assert coded.n_groups == -(-5 // k)
        for g in range(coded.n_groups):
            members = [data[5 * t:5 * t + 5] if t < 5 else data[:0] for t in range(g * k, g * k + k)]
            for pi, panel in enumerate([slice(0, 5), slice(5, 10), slice(10, 13)]):
                for comp in range(len(widths)):
                    f = split.component(comp)
                    padded = []
                    for blk in members:
                        values = np.zeros((len(members[0]), panel.stop - panel.start), dtype=object)
                        values[:len(blk)] = field_of(blk[:, panel], f)
                        padded.append(values)
                    for row in range(n):
                        buf = coded.encoded((g, row), pi, comp)
                        total = sum(coeffs(k, row))
                        assert buf.dtype == narrowest_dtype(widths[comp], comp == 0, total), (g, row, comp)
                        assert buf.tolist() == combine(padded, coeffs(k, row)).tolist(), (g, row, pi, comp)
                        assert coded.encoded((g, row), pi, comp) is buf
