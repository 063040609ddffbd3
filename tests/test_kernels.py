"""Tests of the compiled kernels (mpilayer._kernels) against independent
numpy / Python-int references: packing vs np.packbits, products vs exact
int64 matmul.  Every method the CPU supports is exercised (tests/test_simd_paths.py
adds the 8-bit digit paths and the portable-only build)."""
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# A hard failure, not a skip: without the built extension nothing here would run.
from mpilayer import _kernels as K# noqa: E402

FEATURES = K.cpu_features()
POP_METHODS = ["auto"] + K.popcount_methods()
INT8_METHODS = ["auto"] + K.int8_methods()
ODD_K = [0, 1, 63, 64, 65, 127, 1000, 1025]


# ------------------------------------------------------------ references ---

def ref_planes(A, low_bit, n_planes, axis):
    """Bit planes of A packed along `axis` (1: rows of A, 0: columns of A)."""
    A = A if axis == 1 else A.T
    m, k = A.shape
    bits = 8 * A.dtype.itemsize
    U = A.view(np.uint8 if bits == 8 else np.uint16).astype(np.uint64)
    W = K.plane_words(k)
    out = np.zeros((n_planes, m, W), np.uint64)
    for p in range(n_planes):
        b = ((U >> np.uint64(low_bit + p)) & np.uint64(1)).astype(np.uint8)
        padded = np.zeros((m, 64 * W), np.uint8)
        padded[:, :k] = b
        packed = np.packbits(padded.reshape(m, W, 64), axis=2, bitorder="little")
        out[p] = packed.reshape(m, 8 * W).view("<u8").astype(np.uint64)
    return out


def ref_popcount(Xp, Yp):
    """sum_w popcount(Xp[i, w] & Yp[j, w]) as an exact int64 matrix."""
    xb = np.unpackbits(Xp.view(np.uint8), axis=1).astype(np.int64)
    yb = np.unpackbits(Yp.view(np.uint8), axis=1).astype(np.int64)
    return xb @ yb.T


def rand_int(rng, dtype, shape, lo=None, hi=None):
    info = np.iinfo(dtype)
    lo = info.min if lo is None else lo
    hi = info.max if hi is None else hi
    return rng.integers(lo, hi + 1, size=shape, dtype=dtype)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


# ------------------------------------------------------------- features ---

def test_cpu_features():
    f = K.cpu_features()
    assert isinstance(f["avx2"], bool) and isinstance(f["popcnt"], bool)


@pytest.mark.parametrize("k", [0, 1, 63, 64, 65, 255, 256, 257, 4096, 32768, 65536, 10**6])
def test_plane_words(k):
    W = K.plane_words(k)
    assert W >= -(-k // 64)
    assert (8 * W) % 4096 != 0 or W == 0
    with pytest.raises(ValueError):
        K.plane_words(-1)


# -------------------------------------------------------------- packing ---

@pytest.mark.parametrize("dtype", [np.int8, np.int16])
@pytest.mark.parametrize("shape", [(0, 5), (4, 0), (0, 0), (1, 1), (3, 63), (5, 65),
                                   (2, 127), (7, 1000), (33, 1025), (40, 200)])
def test_pack_rows_and_cols(rng, dtype, shape):
    bits = 8 * np.dtype(dtype).itemsize
    A = rand_int(rng, dtype, shape)
    for low_bit, n_planes in [(0, bits), (1, 3), (bits - 1, 1), (bits - 2, 2), (0, 0)]:
        want = ref_planes(A, low_bit, n_planes, axis=1)
        got = K.pack_row_planes(A, low_bit, n_planes)
        assert got.dtype == np.uint64 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        # packing the columns of A.T must give the same planes
        got_c = K.pack_col_planes(np.ascontiguousarray(A.T), low_bit, n_planes)
        np.testing.assert_array_equal(got_c, want)


def test_pack_int16_high_planes_extremes():
    vals = np.array([-32768, -32767, -1, 0, 1, 255, 256, 32767, -256, 0x5555, -0x5556],
                    dtype=np.int16)
    A = np.tile(vals, (3, 13))[:, :130].copy()  # 130 columns: crosses a word
    for low_bit in (8, 12, 15):
        n = 16 - low_bit
        np.testing.assert_array_equal(K.pack_row_planes(A, low_bit, n),
                                      ref_planes(A, low_bit, n, axis=1))
        np.testing.assert_array_equal(K.pack_col_planes(A, low_bit, n),
                                      ref_planes(A, low_bit, n, axis=0))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(0, 70), k=st.integers(0, 300), dtype=st.sampled_from([np.int8, np.int16]),
       data=st.data())
def test_pack_hypothesis(m, k, dtype, data):
    bits = 8 * np.dtype(dtype).itemsize
    low_bit = data.draw(st.integers(0, bits))
    n_planes = data.draw(st.integers(0, bits - low_bit))
    A = rand_int(np.random.default_rng(m * 1000 + k), dtype, (m, k))
    np.testing.assert_array_equal(K.pack_row_planes(A, low_bit, n_planes),
                                  ref_planes(A, low_bit, n_planes, axis=1))
    np.testing.assert_array_equal(K.pack_col_planes(A, low_bit, n_planes),
                                  ref_planes(A, low_bit, n_planes, axis=0))


def test_pack_errors():
    A = np.zeros((4, 8), np.int8)
    for f in (K.pack_row_planes, K.pack_col_planes):
        with pytest.raises(TypeError):
            f(A.astype(np.int32), 0, 1)
        with pytest.raises(TypeError):
            f([[1, 2]], 0, 1)
        with pytest.raises(ValueError):
            f(np.zeros(8, np.int8), 0, 1)
        with pytest.raises(ValueError):
            f(np.zeros((8, 8), np.int8)[:, ::2], 0, 1)
        with pytest.raises(ValueError):
            f(A, 7, 2)  # bit 8 of an int8
        with pytest.raises(ValueError):
            f(A, -1, 1)
        with pytest.raises(ValueError):
            f(A.astype(np.int16), 15, 2)


# ------------------------------------------------------- popcount GEMM ---

@pytest.mark.parametrize("method", POP_METHODS)
@pytest.mark.parametrize("m,n,k", [(0, 3, 64), (3, 0, 64), (3, 4, 0), (1, 1, 1), (5, 7, 65),
                                   (4, 9, 127), (10, 11, 1000), (8, 5, 1025), (13, 17, 300)])
def test_popcount_shapes(rng, method, m, n, k):
    X = rand_int(rng, np.int8, (m, k))
    Y = rand_int(rng, np.int8, (k, n))
    Xp = K.pack_row_planes(X, 0, 8)
    Yp = K.pack_col_planes(Y, 0, 8)
    C0 = rand_int(rng, np.int64, (m, n), -10**12, 10**12)
    for p, q, w in [(0, 0, 1), (3, 5, -7), (7, 2, -(2**40)), (6, 7, 2**13)]:
        C = C0.copy()
        K.popcount_matmul_acc(Xp[p], Yp[q], C, w, method=method)
        np.testing.assert_array_equal(C, C0 + w * ref_popcount(Xp[p], Yp[q]))


@pytest.mark.parametrize("method", POP_METHODS)
@pytest.mark.parametrize("W", [1, 3, 5, 33, 130, 1100])
def test_popcount_arbitrary_words(rng, method, W):
    """Word counts that are not plane_words(k) (no multiple of 4, > k block,
    > 31 vector steps): the kernels must still be exact.  All-ones inputs hit
    the largest per-byte counts."""
    for Xp, Yp in [(rand_int(rng, np.uint64, (7, W)), rand_int(rng, np.uint64, (5, W))),
                   (np.full((4, W), 2**64 - 1, np.uint64), np.full((8, W), 2**64 - 1, np.uint64))]:
        C = np.zeros((Xp.shape[0], Yp.shape[0]), np.int64)
        K.popcount_matmul_acc(Xp, Yp, C, 3, method=method)
        np.testing.assert_array_equal(C, 3 * ref_popcount(Xp, Yp))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(1, 20), n=st.integers(1, 150), W=st.integers(1, 700), w=st.integers(-(2**31), 2**31),
       method=st.sampled_from(K.popcount_methods()))
def test_popcount_hypothesis(m, n, W, w, method):
    """Row tails of every tile height, several column blocks of the lane kernels (a block holds
    256 KiB of words: 64 columns at 512 words), several k blocks and byte-counter folds."""
    rng = np.random.default_rng(m * 10**6 + n * 1000 + W)
    Xp, Yp = rand_int(rng, np.uint64, (m, W)), rand_int(rng, np.uint64, (n, W))
    C0 = rand_int(rng, np.int64, (m, n), -10**6, 10**6)
    C = C0.copy()
    K.popcount_matmul_acc(Xp, Yp, C, w, method=method)
    np.testing.assert_array_equal(C, C0 + w * ref_popcount(Xp, Yp))


@pytest.mark.parametrize("method", POP_METHODS)
def test_popcount_reconstructs_int_product(rng, method):
    """sum_{p,q} +-2^(p+q) <X_p, Y_q> = X @ Y for two's-complement planes."""
    m, n, k = 9, 14, 777
    X = rand_int(rng, np.int8, (m, k))
    Y = rand_int(rng, np.int8, (k, n))
    Xp, Yp = K.pack_row_planes(X, 0, 8), K.pack_col_planes(Y, 0, 8)
    C = np.zeros((m, n), np.int64)
    for p in range(8):
        for q in range(8):
            sign = -1 if (p == 7) != (q == 7) else 1
            K.popcount_matmul_acc(Xp[p], Yp[q], C, sign << (p + q), method=method)
    np.testing.assert_array_equal(C, X.astype(np.int64) @ Y.astype(np.int64))


@pytest.mark.parametrize("method", POP_METHODS)
def test_popcount_subblock_view(rng, method):
    big = rand_int(rng, np.int64, (40, 50), -1000, 1000)
    orig = big.copy()
    Xp = rand_int(rng, np.uint64, (11, 12))
    Yp = rand_int(rng, np.uint64, (13, 12))
    C = big[5:16, 7:20]
    K.popcount_matmul_acc(Xp, Yp, C, -5, method=method)
    expect = orig.copy()
    expect[5:16, 7:20] += -5 * ref_popcount(Xp, Yp)
    np.testing.assert_array_equal(big, expect)  # rest of `big` untouched


def test_popcount_errors():
    Xp = np.zeros((3, 4), np.uint64)
    Yp = np.zeros((5, 4), np.uint64)
    C = np.zeros((3, 5), np.int64)
    with pytest.raises(TypeError):
        K.popcount_matmul_acc(Xp.astype(np.int64), Yp, C, 1)
    with pytest.raises(TypeError):
        K.popcount_matmul_acc(Xp, Yp, C.astype(np.int32), 1)
    with pytest.raises(ValueError):
        K.popcount_matmul_acc(Xp, np.zeros((5, 3), np.uint64), C, 1)
    with pytest.raises(ValueError):
        K.popcount_matmul_acc(Xp, Yp, np.zeros((3, 4), np.int64), 1)
    with pytest.raises(ValueError):
        K.popcount_matmul_acc(Xp, Yp, np.zeros((3, 10), np.int64)[:, ::2], 1)
    with pytest.raises(ValueError):
        K.popcount_matmul_acc(np.zeros((3, 8), np.uint64)[:, ::2], Yp, C, 1)
    with pytest.raises(ValueError):
        K.popcount_matmul_acc(Xp, Yp, C, 1, method="fast")
    C.flags.writeable = False
    with pytest.raises(ValueError):
        K.popcount_matmul_acc(Xp, Yp, C, 1)


# ------------------------------------------------------------ int8 GEMM ---

def ref_int8(C0, X, Y, w):
    return C0 + w * (X.astype(np.int64) @ Y.astype(np.int64))


@pytest.mark.parametrize("method", INT8_METHODS)
@pytest.mark.parametrize("m,n,k", [(0, 4, 5), (4, 0, 5), (4, 5, 0), (1, 1, 1), (5, 17, 3),
                                   (3, 33, 63), (7, 15, 65), (6, 31, 127), (9, 50, 1000),
                                   (5, 20, 1025), (97, 35, 130)])
def test_int8_shapes(rng, method, m, n, k):
    X = rand_int(rng, np.uint8, (m, k), 0, 127)
    Y = rand_int(rng, np.int8, (k, n))
    C0 = rand_int(rng, np.int64, (m, n), -10**9, 10**9)
    for w in (1, -3, -(2**40)):
        C = C0.copy()
        K.int8_matmul_acc(X, Y, C, w, method=method)
        np.testing.assert_array_equal(C, ref_int8(C0, X, Y, w))


@pytest.mark.parametrize("method", INT8_METHODS)
@pytest.mark.parametrize("x_max", [0, 1, 3, 15, 127])
def test_int8_extremes(method, x_max):
    m, n, k = 6, 19, 2100  # k crosses the AVX2 and BLAS k blocks
    X = np.full((m, k), x_max, np.uint8)
    for yv in (-128, 127):
        Y = np.full((k, n), yv, np.int8)
        C = np.full((m, n), 7, np.int64)
        K.int8_matmul_acc(X, Y, C, -1, x_max=x_max, method=method)
        np.testing.assert_array_equal(C, 7 - x_max * yv * k)
    # alternating signs along k so int16/int32 partials swing both ways
    Y = np.where(np.arange(k)[:, None] % 3 == 0, -128, 127).astype(np.int8).repeat(n, 1)
    C = np.zeros((m, n), np.int64)
    K.int8_matmul_acc(X, Y, C, 5, x_max=x_max, method=method)
    np.testing.assert_array_equal(C, ref_int8(np.zeros((m, n), np.int64), X, Y, 5))


@pytest.mark.parametrize("method", INT8_METHODS)
@pytest.mark.parametrize("x_max", [1, 15, 127])
def test_int8_small_digits(rng, method, x_max):
    m, n, k = 13, 37, 3001
    X = rand_int(rng, np.uint8, (m, k), 0, x_max)
    Y = rand_int(rng, np.int8, (k, n))
    C = np.zeros((m, n), np.int64)
    K.int8_matmul_acc(X, Y, C, 2**20, x_max=x_max, method=method)
    np.testing.assert_array_equal(C, ref_int8(np.zeros((m, n), np.int64), X, Y, 2**20))


@pytest.mark.parametrize("method", INT8_METHODS)
def test_int8_long_k(method):
    """k = 70000 crosses the plain-C int32 block (65536): all-extreme values
    would overflow int32 without blocking (70000*127*128 > 2^31)."""
    m, n, k = 2, 3, 70000
    X = np.full((m, k), 127, np.uint8)
    Y = np.full((k, n), -128, np.int8)
    Y[::7] = 127
    C = np.zeros((m, n), np.int64)
    K.int8_matmul_acc(X, Y, C, -1, method=method)
    np.testing.assert_array_equal(C, -(X.astype(np.int64) @ Y.astype(np.int64)))


@pytest.mark.parametrize("method", INT8_METHODS)
def test_int8_wide(rng, method):
    """n > 8192 crosses the BLAS path's column block."""
    X = rand_int(rng, np.uint8, (3, 5), 0, 127)
    Y = rand_int(rng, np.int8, (5, 8200))
    C = np.ones((3, 8200), np.int64)
    K.int8_matmul_acc(X, Y, C, -2, method=method)
    np.testing.assert_array_equal(C, ref_int8(np.ones((3, 8200), np.int64), X, Y, -2))


@pytest.mark.parametrize("method", INT8_METHODS)
def test_int8_subblock_view(rng, method):
    big = rand_int(rng, np.int64, (60, 70), -1000, 1000)
    orig = big.copy()
    X = rand_int(rng, np.uint8, (21, 45), 0, 127)
    Y = rand_int(rng, np.int8, (45, 33))
    K.int8_matmul_acc(X, Y, big[10:31, 20:53], 9, method=method)
    expect = orig.copy()
    expect[10:31, 20:53] = ref_int8(orig[10:31, 20:53], X, Y, 9)
    np.testing.assert_array_equal(big, expect)
    # a view with a non-contiguous row stride and a reversed row order
    big2 = orig.copy()
    K.int8_matmul_acc(X, Y, big2[50:8:-2, 1:34], 1, method=method)
    expect2 = orig.copy()
    expect2[50:8:-2, 1:34] = ref_int8(orig[50:8:-2, 1:34], X, Y, 1)
    np.testing.assert_array_equal(big2, expect2)


@pytest.mark.parametrize("method", INT8_METHODS)
def test_int8_wraps_mod_2_64(rng, method):
    """Beyond int64 the result wraps like numpy int64 arithmetic (no UB)."""
    X = np.full((2, 300), 127, np.uint8)
    Y = np.full((300, 3), -128, np.int8)
    C = np.zeros((2, 3), np.int64)
    w = 2**62 + 12345
    K.int8_matmul_acc(X, Y, C, w, method=method)
    expect = (w * 300 * 127 * -128) % 2**64
    expect = expect - 2**64 if expect >= 2**63 else expect
    assert (C == expect).all()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(0, 23), n=st.integers(0, 40), k=st.integers(0, 140),
       x_max=st.sampled_from([1, 7, 15, 63, 127]), w=st.integers(-(2**31), 2**31),
       method=st.sampled_from(INT8_METHODS))
def test_int8_hypothesis(m, n, k, x_max, w, method):
    rng = np.random.default_rng(m * 10**6 + n * 1000 + k)
    X = rand_int(rng, np.uint8, (m, k), 0, x_max)
    Y = rand_int(rng, np.int8, (k, n))
    C0 = rand_int(rng, np.int64, (m, n), -10**6, 10**6)
    C = C0.copy()
    K.int8_matmul_acc(X, Y, C, w, x_max=x_max, method=method)
    np.testing.assert_array_equal(C, ref_int8(C0, X, Y, w))


def test_int8_errors():
    X = np.zeros((3, 4), np.uint8)
    Y = np.zeros((4, 5), np.int8)
    C = np.zeros((3, 5), np.int64)
    with pytest.raises(TypeError):
        K.int8_matmul_acc(X.astype(np.int8), Y, C, 1)
    with pytest.raises(TypeError):
        K.int8_matmul_acc(X, Y.astype(np.uint8), C, 1)
    with pytest.raises(TypeError):
        K.int8_matmul_acc(X, Y, C.astype(np.float64), 1)
    with pytest.raises(ValueError):
        K.int8_matmul_acc(X, np.zeros((5, 5), np.int8), C, 1)
    with pytest.raises(ValueError):
        K.int8_matmul_acc(X, Y, np.zeros((5, 3), np.int64), 1)
    with pytest.raises(ValueError):
        K.int8_matmul_acc(np.zeros((3, 8), np.uint8)[:, ::2], Y, C, 1)
    with pytest.raises(ValueError):
        K.int8_matmul_acc(X, Y, C, 1, x_max=256)
    for method in ("blas", "avx2"):  # 7-bit paths refuse 8-bit digits
        with pytest.raises(ValueError):
            K.int8_matmul_acc(X, Y, C, 1, x_max=128, method=method)
    with pytest.raises(ValueError):
        K.int8_matmul_acc(X, Y, C, 1, method="gpu")


def test_threads_run_concurrently_and_correctly(rng):
    """Concurrent calls on separate outputs stay exact."""
    X = rand_int(rng, np.uint8, (64, 512), 0, 127)
    Y = rand_int(rng, np.int8, (512, 64))
    want = X.astype(np.int64) @ Y.astype(np.int64)
    outs = [np.zeros((64, 64), np.int64) for _ in range(4)]

    def work(C):
        for _ in range(5):
            K.int8_matmul_acc(X, Y, C, 1)

    threads = [threading.Thread(target=work, args=(C,)) for C in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for C in outs:
        np.testing.assert_array_equal(C, 5 * want)


def progress_during(call) -> tuple:
    """Run ``call()`` (a long kernel) while a Python thread records timestamps; return the
    call's (start, end) and how many timestamps fall in the middle 60% of it. Holding the GIL
    for the whole call would leave none there (a 5 ms switch interval at the edges at most)."""
    stamps, stop = [], threading.Event()

    def ticker():
        while not stop.is_set():
            stamps.append(time.perf_counter())

    t = threading.Thread(target=ticker)
    t.start()
    time.sleep(0.01)
    t0 = time.perf_counter()
    call()
    t1 = time.perf_counter()
    stop.set()
    t.join()
    lo, hi = t0 + 0.2 * (t1 - t0), t1 - 0.2 * (t1 - t0)
    return t1 - t0, sum(lo <= s <= hi for s in stamps)


@pytest.mark.parametrize("kernel", ["int8", "popcount"])
def test_gil_released_during_kernel(rng, kernel):
    """A Python thread makes progress while a long kernel runs: the GIL is released."""
    if kernel == "int8":  # the portable path: slow enough for a ~0.1-0.3 s call
        X = rand_int(rng, np.uint8, (256, 16384), 0, 127)
        Y = rand_int(rng, np.int8, (16384, 256))
        C = np.zeros((256, 256), np.int64)
        call = lambda: K.int8_matmul_acc(X, Y, C, 1, method="c")  # noqa: E731
    else:
        Xp = rand_int(rng, np.uint64, (1024, 256))
        Yp = rand_int(rng, np.uint64, (1024, 256))
        C = np.zeros((1024, 1024), np.int64)
        call = lambda: K.popcount_matmul_acc(Xp, Yp, C, 1, method="c")  # noqa: E731
    duration, inside = progress_during(call)
    assert duration > 0.02, f"kernel call too short ({duration:.3f} s) to tell"
    assert inside > 0, f"no Python progress during a {duration:.3f} s kernel call: GIL held"
