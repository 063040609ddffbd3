"""Every SIMD path against the portable one, bit for bit; 8-bit digits; the cost model; and a
portable-only build (MPL_NO_SIMD) that must give the same results.

A path this CPU lacks is skipped with the feature it needs as the reason; everything else runs.
"""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mpilayer import _kernels as K
from mpilayer.core import products
from mpilayer.core.components import BitField, make_split
from mpilayer.jobs import selftest

ROOT = Path(__file__).resolve().parent.parent
FEATURES = K.cpu_features()
NEEDS = {"avx2": "AVX2", "avx512": "AVX-512 F/BW/VL/DQ + VPOPCNTDQ", "avx512vnni": "AVX512-VNNI",
         "avx512vnni-ymm": "AVX512-VNNI + VL", "avxvnni": "AVX-VNNI", "blas": "", "c": ""}
POPCOUNT_PATHS = ["c", "avx2", "avx512"]
INT8_PATHS = ["c", "blas", "avx2", "avx512vnni", "avx512vnni-ymm", "avxvnni"]


def require(method, available):
    if method not in available:
        pytest.skip(f"this CPU lacks {NEEDS[method]} (path {method!r})")


@pytest.mark.parametrize("method", POPCOUNT_PATHS)
def test_popcount_path_equals_portable(method):
    require(method, K.popcount_methods())
    assert selftest.check_popcount(method) == []


@pytest.mark.parametrize("method", INT8_PATHS)
def test_int8_path_equals_portable(method):
    require(method, K.int8_methods())
    assert selftest.check_int8(method) == []


@pytest.mark.parametrize("method", [m for m in INT8_PATHS if m in K.FULL_8BIT_METHODS])
def test_int8_full_digits_long_k(method):
    """All-255 digits times -128 over k = 70000: 255*128*70000 > 2^31, so the int32 sums must
    be flushed in time (the VNNI super-blocks of 65536 k, the C path's k blocks)."""
    require(method, K.int8_methods())
    X = np.full((2, 70000), 255, np.uint8)
    Y = np.full((70000, 3), -128, np.int8)
    Y[::5] = 127
    want = X.astype(np.int64) @ Y.astype(np.int64)
    for y in (Y, K.pack_int8(Y)):
        C = np.zeros((2, 3), np.int64)
        K.int8_matmul_acc(X, y, C, -1, x_max=255, method=method)
        np.testing.assert_array_equal(C, -want)


def test_packed_operand():
    rng = np.random.default_rng(0)
    Y = rng.integers(-128, 128, (130, 67), dtype=np.int8)
    P = K.pack_int8(Y)
    assert P.shape == (130, 67) and P.nbytes >= 130 * 67
    X = rng.integers(0, 256, (5, 130), dtype=np.uint8)
    C = np.zeros((5, 67), np.int64)
    K.int8_matmul_acc(X, P, C, 1, x_max=255)  # auto: VNNI, or the portable path on packed B
    np.testing.assert_array_equal(C, X.astype(np.int64) @ Y.astype(np.int64))
    if "avx2" in K.int8_methods():
        with pytest.raises(ValueError):
            K.int8_matmul_acc(X & 127, P, C, 1, method="avx2")
    with pytest.raises(ValueError):
        K.int8_matmul_acc(X[:, :129].copy(), P, C, 1)
    empty = K.pack_int8(np.zeros((0, 4), np.int8))
    K.int8_matmul_acc(np.zeros((3, 0), np.uint8), empty, np.zeros((3, 4), np.int64), 1)


def test_features_and_peaks():
    assert FEATURES["popcount_path"] == K.popcount_methods()[-1]
    assert FEATURES["int8_path"] in K.int8_methods()
    if FEATURES["avx512_vpopcntdq"] or FEATURES["avx512_vnni"]:
        assert FEATURES["avx512"]  # both need the OS-saved zmm state
    for name, flag in [("vnni512", "avx512_vnni"), ("popcnt512", "avx512_vpopcntdq"),
                       ("avxvnni256", "avx_vnni"), ("maddubs256", "avx2")]:
        assert (K.peak_loop(name, 10) > 0) == FEATURES[flag], name
    with pytest.raises(ValueError):
        K.peak_loop("nope", 1)


def test_selftest_command(capsys):
    from mpilayer.cli import main
    assert main(["selftest"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and out.count(" ok ") == len(K.popcount_methods()) + len(K.int8_methods())


# ------------------------------------------------------------------ digits and cost model

def test_digit_width_follows_the_dispatched_kernel():
    vnni = FEATURES["int8_path"] in ("avx512vnni", "avxvnni")
    assert products.DIGIT_BITS == (8 if vnni else 7)
    full = BitField(0, 8, 8)
    assert products.n_a_digits(full) == 1 and products.n_b_digits(full) == 1
    wide = BitField(0, 16, 16)
    assert products.n_a_digits(wide) * products.n_b_digits(wide) == (4 if vnni else 9)


@pytest.mark.parametrize("digit_bits", [7, 8])
@pytest.mark.parametrize("bits,widths", [(8, None), (8, (4, 4)), (16, (8, 8)), (16, (1, 15)),
                                         (16, None), (12, (3, 9)), (16, (4, 4, 8))])
def test_products_exact_with_either_digit_width(monkeypatch, digit_bits, bits, widths):
    """Both digit widths give the exact product on any CPU (8-bit digits fall back to the
    portable path without VNNI), extremes included; popcount agrees term by term."""
    monkeypatch.setattr(products, "DIGIT_BITS", digit_bits)
    rng = np.random.default_rng(bits * 100 + digit_bits)
    dtype = np.int8 if bits <= 8 else np.int16
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    m, n, k = 9, 70, 131
    A = rng.integers(lo, hi + 1, (m, k)).astype(dtype)
    B = rng.integers(lo, hi + 1, (k, n)).astype(dtype)
    A[0], A[1], B[:, 0], B[:, 1] = lo, hi, lo, hi
    split = make_split(bits, widths)
    a, b = products.OperandBlock(A, "A", bits), products.OperandBlock(B, "B", bits)
    prev = None
    for r in range(split.n_resolutions):
        terms = products.resolution_terms(split, r)
        out, _ = products.add_terms(prev, a, b, terms, kernel="int8")
        pop, _ = products.add_terms(prev, a, b, terms, kernel="popcount")
        np.testing.assert_array_equal(out, pop)
        prev = out
    np.testing.assert_array_equal(prev, A.astype(np.int64) @ B.astype(np.int64))


def test_cost_model_picks_sensible_kernels():
    m = n = 512
    k = 2048
    one, full8 = BitField(7, 8, 8), BitField(0, 8, 8)
    assert products.choose_kernel(m, n, k, one, one) == "popcount"   # one plane pair
    assert products.choose_kernel(m, n, k, full8, full8) == "int8"   # 64 plane pairs
    assert products.choose_kernel(m, n, k, BitField(0, 16, 16), BitField(0, 16, 16)) == "int8"
    for kern in ("popcount", "int8"):
        assert products.term_cost(kern, m, n, k, full8, full8) > 0
    # rates are those of the paths this CPU dispatches to
    assert products.POPCOUNT_RATE == products.PATH_RATES["popcount"][FEATURES["popcount_path"]]
    assert products.INT8_RATES == products.PATH_RATES["int8"][FEATURES["int8_path"]]


# ------------------------------------------------------------------ portable-only build

PORTABLE_CHECK = textwrap.dedent("""
    import importlib.util, sys
    import numpy as np
    from mpilayer import _kernels as simd
    spec = importlib.util.spec_from_file_location("_kernels", sys.argv[1])
    port = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(port)
    f = port.cpu_features()
    assert not f["simd_compiled"] and f["popcount_path"] == "c" and f["int8_path"] == "blas", f
    assert port.popcount_methods() == ["c"] and port.int8_methods() == ["c", "blas"]
    rng = np.random.default_rng(5)
    for m, n, k in [(1, 1, 1), (7, 13, 1), (13, 65, 1027), (0, 3, 4), (6, 64, 300)]:
        X = rng.integers(-128, 128, (m, k), dtype=np.int8)
        Y = rng.integers(-128, 128, (k, n), dtype=np.int8)
        for mod in (simd, port):
            np.testing.assert_array_equal(mod.pack_row_planes(X, 0, 8), simd.pack_row_planes(X, 0, 8))
            np.testing.assert_array_equal(mod.pack_col_planes(Y, 0, 8), simd.pack_col_planes(Y, 0, 8))
        Xp, Yp = simd.pack_row_planes(X, 0, 8), simd.pack_col_planes(Y, 0, 8)
        for p, q in [(0, 7), (7, 7), (3, 2)]:
            a, b = np.zeros((m, n), np.int64), np.zeros((m, n), np.int64)
            simd.popcount_matmul_acc(Xp[p], Yp[q], a, -5)
            port.popcount_matmul_acc(Xp[p], Yp[q], b, -5)
            np.testing.assert_array_equal(a, b)
        U = X.view(np.uint8)
        a, b, c = (np.zeros((m, n), np.int64) for _ in range(3))
        simd.int8_matmul_acc(U, Y, a, 3, x_max=255)
        port.int8_matmul_acc(U, Y, b, 3, x_max=255)                       # portable C
        port.int8_matmul_acc(U, port.pack_int8(Y), c, 3, x_max=255)       # C on packed B
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
        a, b = np.zeros((m, n), np.int64), np.zeros((m, n), np.int64)
        simd.int8_matmul_acc(U & 127, Y, a, 7)
        port.int8_matmul_acc(U & 127, Y, b, 7)                            # BLAS path
        np.testing.assert_array_equal(a, b)
        # a product's start (C written, not read), rank-one terms included
        start = (rng.integers(-2**40, 2**40, (m, n)), rng.integers(-9, 9, m), rng.integers(-9, 9, n),
                 [(rng.integers(-2**30, 2**30, m), rng.integers(-2**30, 2**30, n))])
        a, b, c = (np.full((m, n), 5, np.int64) for _ in range(3))
        simd.int8_matmul_acc(U, simd.pack_int8(Y), a, -3, x_max=255, start=start)
        port.int8_matmul_acc(U, Y, b, -3, x_max=255, start=start)
        port.int8_matmul_acc(U, port.pack_int8(Y), c, -3, x_max=255, start=start)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    # the operand sums (clones vs the baseline): int8 and int16, extremes included, rows and
    # columns read in place, odd sizes, rows longer than a chunk (4096), columns past 256 rows
    for dt in (np.int8, np.int16):
        lo, hi = np.iinfo(dt).min, np.iinfo(dt).max
        for r, c in [(1, 1), (37, 301), (67, 4100), (3, 9000)]:
            q = rng.integers(lo, hi + 1, (r, c)).astype(dt)
            q[0] = lo
            q[-1, ::2] = hi
            z = rng.integers(-40000, 40000, r)
            for src in (q, np.ascontiguousarray(q.T).T):
                for shifts in ([], [1, 3, 7]):
                    np.testing.assert_array_equal(simd.direct_sums(src, z, shifts), port.direct_sums(src, z, shifts))
                np.testing.assert_array_equal(simd.line_range(src), port.line_range(src))
                outs = [np.empty_like(src) for _ in range(2)]  # q - z written in the sums' pass
                got = [mod.direct_sums(src, z, [1, 3], shifted=o) for mod, o in zip((simd, port), outs)]
                np.testing.assert_array_equal(got[0], got[1])
                np.testing.assert_array_equal(outs[0], outs[1])
    # the estimate kernels: bit for bit, with and without the interval, integers and scaled
    # reals, odd sizes, rows longer than a block (512)
    def side(length, scaled):
        f = lambda: rng.standard_normal(length) * 1e3
        i = lambda: rng.integers(-10**6, 10**6, length)
        v = {name: f() for name in ("alpha", "ta", "b")}
        v.update({name: np.abs(f()) for name in ("dinf", "r2", "h1", "h2", "q1", "q2")})
        v.update({name: i() for name in ("pos_full", "neg_full", "pos_trunc", "neg_trunc", "zc", "z")})
        v["scale"] = rng.uniform(0.1, 2, length) if scaled else None
        return v
    for m, n in [(1, 1), (5, 17), (33, 70), (3, 1030)]:
        acc = rng.integers(-10**9, 10**9, (m, n))
        for scaled in (False, True):
            a, b = side(m, scaled), side(n, scaled)
            for interval, as_published in ((False, False), (True, False), (False, scaled)):
                got = [mod.estimate_tile(acc, 300, 127, 1e-14, a, b, not scaled, True, interval, as_published)
                       for mod in (simd, port)]
                for x, y in zip(*got):
                    if x is None:
                        assert y is None
                    else:
                        np.testing.assert_array_equal(x, y)
            # the same estimate written by the int8 kernel (int8_matmul_acc's estimate)
            U, Y8 = rng.integers(0, 256, (m, 37), dtype=np.uint8), rng.integers(-128, 128, (37, n), dtype=np.int8)
            est = (300, 1e-14, a, b, not scaled, scaled)
            outs = [np.zeros((m, n), np.int64) for _ in range(2)]
            got = [mod.int8_matmul_acc(U, mod.pack_int8(Y8), o, 3, 255, estimate=est) for mod, o in zip((simd, port), outs)]
            assert got[0] == got[1]
            np.testing.assert_array_equal(outs[0], outs[1])
    print("portable build ok")
""")


def test_portable_only_build_gives_identical_results(tmp_path):
    """Build the extension with MPILAYER_CFLAGS=-DMPL_NO_SIMD into a temp dir and compare it
    with the installed (SIMD) build on every entry point."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "cython_kernels", src / "cython_kernels",
                    ignore=shutil.ignore_patterns("*.so", "*.o"))
    shutil.copy(ROOT / "setup.py", src / "setup.py")
    for pkg in ("mpilayer", "jobs"):
        (src / pkg).mkdir()
        (src / pkg / "__init__.py").write_text("")
    env = dict(os.environ, MPILAYER_CFLAGS="-DMPL_NO_SIMD -O0")  # -O0: the fastest build; integer results do not depend on it
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "-j", "2", "--build-temp", str(tmp_path / "T"),
                            "--build-lib", str(tmp_path / "L")], cwd=src, env=env, capture_output=True,
                           text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (so,) = (tmp_path / "L" / "mpilayer").glob("_kernels*.so")
    run = subprocess.run([sys.executable, "-c", PORTABLE_CHECK, str(so)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and "portable build ok" in run.stdout, run.stderr[-3000:]


def _start_cases(rng, m, n):
    """Starts of a product (kernel's ``start``): every combination of src, row, col and 0-2
    rank-one terms, with values that wrap mod 2**64 when multiplied."""
    big = lambda *shape: rng.integers(-2**62, 2**62, shape, dtype=np.int64)  # noqa: E731
    src, row, col = big(m, n), big(m), big(n)
    outer = [(big(m), big(n)), (rng.integers(-5, 6, m), rng.integers(-2**40, 2**40, n))]
    for s in (None, src):
        for r in (None, row):
            for c in (None, col):
                for t in (0, 1, 2):
                    yield (s, r, c, outer[:t] or None)


def _start_value(start, m, n):
    src, row, col, outer = start
    out = np.zeros((m, n), np.int64) if src is None else src.copy()
    with np.errstate(over="ignore"):
        if row is not None:
            out += row[:, None]
        if col is not None:
            out += col[None, :]
        for u, v in outer or ():
            out += np.multiply.outer(u, v)
    return out


@pytest.mark.parametrize("method", INT8_PATHS)
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (5, 17, 3), (7, 65, 130), (13, 64, 9), (9, 3, 0)])
def test_int8_start_path_equals_portable(method, m, n, k):
    """``start`` (C written, not read: src + row + col + outer products + weight * X @ Y) on every
    path, packed and not, in place (src is C) too, against the portable path and numpy."""
    require(method, K.int8_methods())
    rng = np.random.default_rng(m * 1000 + n * 10 + k)
    x_max = 255 if method in K.FULL_8BIT_METHODS else 127
    X = rng.integers(0, x_max + 1, (m, k), dtype=np.uint8)
    Y = rng.integers(-128, 128, (k, n), dtype=np.int8)
    prod = X.astype(np.int64) @ Y.astype(np.int64)
    inputs = [Y] + ([K.pack_int8(Y)] if method in K.FULL_8BIT_METHODS else [])
    for weight in (1, -3, 2**40 + 1):
        for start in _start_cases(rng, m, n):
            with np.errstate(over="ignore"):
                want = _start_value(start, m, n) + weight * prod
            for y in inputs:
                ref = np.full((m, n), 7, np.int64)
                K.int8_matmul_acc(X, y if method != "c" else K.pack_int8(Y), ref, weight, x_max=x_max,
                                  method="c", start=start)
                got = np.full((m, n), 7, np.int64)
                K.int8_matmul_acc(X, y, got, weight, x_max=x_max, method=method, start=start)
                np.testing.assert_array_equal(got, ref)
                np.testing.assert_array_equal(got, want)
                if start[0] is not None:  # in place: the start's src is C itself
                    C = start[0].copy()
                    K.int8_matmul_acc(X, y, C, weight, x_max=x_max, method=method, start=(C, *start[1:]))
                    np.testing.assert_array_equal(C, want)


@pytest.mark.parametrize("method", [m for m in INT8_PATHS if m in K.FULL_8BIT_METHODS])
def test_int8_start_long_k(method):
    """With k beyond one int32 super-block (65536), the start is written by the first and the
    later super-blocks add to it."""
    require(method, K.int8_methods())
    X = np.full((3, 70000), 255, np.uint8)
    Y = np.full((70000, 5), -128, np.int8)
    Y[::7] = 127
    src = np.arange(15, dtype=np.int64).reshape(3, 5) * 10**12
    col = np.arange(5, dtype=np.int64) - 2
    want = src + col[None, :] + np.multiply.outer(np.arange(3), col) - 3 * (X.astype(np.int64) @ Y.astype(np.int64))
    C = np.zeros((3, 5), np.int64)
    K.int8_matmul_acc(X, K.pack_int8(Y), C, -3, x_max=255, method=method,
                      start=(src, None, col, [(np.arange(3), col)]))
    np.testing.assert_array_equal(C, want)


def test_int8_start_errors():
    X, Y, C = np.zeros((2, 3), np.uint8), np.zeros((3, 4), np.int8), np.zeros((2, 4), np.int64)
    with pytest.raises(ValueError, match="start must be"):
        K.int8_matmul_acc(X, Y, C, 1, start=(None, None))
    with pytest.raises(ValueError, match="src must have shape"):
        K.int8_matmul_acc(X, Y, C, 1, start=(np.zeros((4, 2), np.int64), None, None))
    with pytest.raises(ValueError, match="col must have shape"):
        K.int8_matmul_acc(X, Y, C, 1, start=(None, None, np.zeros(3, np.int64)))
    with pytest.raises(TypeError, match="row must have dtype int64"):
        K.int8_matmul_acc(X, Y, C, 1, start=(None, np.zeros(2, np.int32), None))
    with pytest.raises(ValueError, match="at most 2 rank-one terms"):
        K.int8_matmul_acc(X, Y, C, 1, start=(None, None, None, [(np.zeros(2, np.int64), np.zeros(4, np.int64))] * 3))
