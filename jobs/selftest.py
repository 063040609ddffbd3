"""``mpilayer selftest``: every SIMD kernel path this CPU runs against the portable C path.

Run it once on a new node type. Each path must give the portable path's result bit for bit on
random operands, extreme ones (all -128 / 127 / 255 digits, all-ones bit planes) and odd sizes
(m, n, k not multiples of any vector width, k = 1, empty); the portable path itself is checked
against numpy's int64 product. One line per path (ok/FAIL and its rate); the exit status is 1
if anything differs.
"""
from __future__ import annotations

import time

import numpy as np

from mpilayer import \
    _kernels  # (m, n, k): odd sizes around the vector widths and micro-tiles, k = 1 and empty operands.

SHAPES = [(0, 5, 3), (3, 0, 5), (3, 4, 0), (1, 1, 1), (7, 13, 1), (5, 67, 3), (13, 65, 1027),
          (6, 64, 512), (19, 130, 70), (4, 9, 4097)]


def int8_cases(rng, x_max: int):
    """(name, X uint8 [m, k], Y int8 [k, n]) operand pairs for the int8 product."""
    for m, n, k in SHAPES:
        yield f"random {m}x{n}x{k}", rng.integers(0, x_max + 1, (m, k), dtype=np.uint8), \
            rng.integers(-128, 128, (k, n), dtype=np.int8)
    m, n, k = 7, 70, 1030
    for yv in (-128, 127):
        yield f"extreme x={x_max} y={yv}", np.full((m, k), x_max, np.uint8), np.full((k, n), yv, np.int8)
    alt = np.where(np.arange(k)[:, None] % 3 == 0, -128, 127).astype(np.int8).repeat(n, 1)
    yield "extreme alternating", np.full((m, k), x_max, np.uint8), alt


def popcount_cases(rng):
    """(name, Xp uint64 [m, W], Yp uint64 [n, W]) packed-plane pairs for the popcount product."""
    for m, n, k in SHAPES:
        X = rng.integers(-128, 128, (m, k), dtype=np.int8)
        Y = rng.integers(-128, 128, (k, n), dtype=np.int8)
        yield f"planes {m}x{n}x{k}", _kernels.pack_row_planes(X, 3, 1)[0], _kernels.pack_col_planes(Y, 7, 1)[0]
    for W in (1, 3, 9, 33):  # word counts that are no multiple of a vector
        yield f"all-ones W={W}", np.full((5, W), 2**64 - 1, np.uint64), np.full((11, W), 2**64 - 1, np.uint64)
        yield f"random words W={W}", rng.integers(0, 2**64, (7, W), dtype=np.uint64), \
            rng.integers(0, 2**64, (9, W), dtype=np.uint64)


def _run(fn, m: int, n: int, weight: int) -> np.ndarray:
    """fn(C, weight) on a C that starts from fixed nonzero values, returned."""
    C = np.arange(m * n, dtype=np.int64).reshape(m, n) * 7 - 3
    fn(C, weight)
    return C


def check_int8(method: str, rng=None) -> list:
    """Mismatches of int8 path ``method`` against the portable path (empty list: all equal)."""
    rng = rng or np.random.default_rng(7)
    x_max = 255 if method in _kernels.FULL_8BIT_METHODS else 127
    bad = []
    for name, X, Y in int8_cases(rng, x_max):
        m, n = X.shape[0], Y.shape[1]
        for weight in (1, -3, 2**40 + 1):
            ref = _run(lambda C, w: _kernels.int8_matmul_acc(X, Y, C, w, x_max=x_max, method="c"), m, n, weight)
            exact = _run(lambda C, w: C.__iadd__(w * (X.astype(np.int64) @ Y.astype(np.int64))), m, n, weight)
            inputs = [Y] + ([_kernels.pack_int8(Y)] if method in _kernels.FULL_8BIT_METHODS else [])
            for y in inputs:
                got = _run(lambda C, w: _kernels.int8_matmul_acc(X, y, C, w, x_max=x_max, method=method), m, n, weight)
                if not np.array_equal(got, ref) or not np.array_equal(ref, exact):
                    bad.append(f"{name}, weight {weight}{', packed B' if y is not Y else ''}")
    return bad


def check_popcount(method: str, rng=None) -> list:
    """Mismatches of popcount path ``method`` against the portable path."""
    rng = rng or np.random.default_rng(8)
    bad = []
    for name, Xp, Yp in popcount_cases(rng):
        m, n = Xp.shape[0], Yp.shape[0]
        xb = np.unpackbits(Xp.view(np.uint8), axis=1).astype(np.int64)
        yb = np.unpackbits(Yp.view(np.uint8), axis=1).astype(np.int64)
        for weight in (1, -(2**13), 3 * 2**40):
            ref = _run(lambda C, w: _kernels.popcount_matmul_acc(Xp, Yp, C, w, method="c"), m, n, weight)
            exact = _run(lambda C, w: C.__iadd__(w * (xb @ yb.T)), m, n, weight)
            got = _run(lambda C, w: _kernels.popcount_matmul_acc(Xp, Yp, C, w, method=method), m, n, weight)
            if not np.array_equal(got, ref) or not np.array_equal(ref, exact):
                bad.append(f"{name}, weight {weight}")
    return bad


def rate(kernel: str, method: str, n: int = 512, k: int = 2048) -> float:
    """MAC/s (bit-MAC/s for popcount) of one path on an n x n x k product, best of 3."""
    rng = np.random.default_rng(9)
    C = np.zeros((n, n), np.int64)
    if kernel == "popcount":
        Xp = rng.integers(0, 2**64, (n, k // 64), dtype=np.uint64)
        Yp = rng.integers(0, 2**64, (n, k // 64), dtype=np.uint64)
        fn = lambda: _kernels.popcount_matmul_acc(Xp, Yp, C, 1, method=method)  # noqa: E731
    else:
        full = method in _kernels.FULL_8BIT_METHODS
        X = rng.integers(0, 256 if full else 128, (n, k), dtype=np.uint8)
        Y = rng.integers(-128, 128, (k, n), dtype=np.int8)
        Y = _kernels.pack_int8(Y) if full and method != "c" else Y
        fn = lambda: _kernels.int8_matmul_acc(X, Y, C, 1, x_max=255 if full else 127, method=method)  # noqa: E731
    fn()
    best = min(_timed(fn) for _ in range(3))
    return float(n) * n * k / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(args=None) -> int:
    f = _kernels.cpu_features()
    isa = ", ".join(k for k in ("avx2", "avx512", "avx512_vpopcntdq", "avx512_vnni", "avx_vnni") if f[k]) or "none"
    print(f"mpilayer selftest: SIMD paths this CPU runs ({isa}) against the portable C path")
    failed = 0
    paths = [("popcount", m) for m in _kernels.popcount_methods()] + \
            [("int8", m) for m in _kernels.int8_methods()]
    for kernel, method in paths:
        bad = (check_popcount if kernel == "popcount" else check_int8)(method)
        unit = "G bitMAC/s" if kernel == "popcount" else "GMAC/s"
        shape = "512x512x2048" if method != "c" else "128x128x2048"
        n = 512 if method != "c" else 128
        speed = rate(kernel, method, n=n) / 1e9
        status = "ok  " if not bad else "FAIL"
        print(f"{kernel:<9} {method:<15} {status} {speed:8.1f} {unit} ({shape})"
              + ("" if not bad else f": {len(bad)} mismatches, first: {bad[0]}"))
        failed += bool(bad)
    if not f["avx_vnni"]:
        print("avxvnni (VEX ymm) path: not run, this CPU has no AVX-VNNI")
    print("all paths equal the portable path bit for bit" if not failed else f"{failed} path(s) FAILED")
    return 1 if failed else 0
