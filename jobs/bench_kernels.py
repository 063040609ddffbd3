"""``mpilayer bench kernels``: the layered product against numpy matmul, one core, one run.

Everything is timed side by side in this process with one BLAS thread, so the ratios hold
on a noisy machine even when the absolute times do not: numpy float64 and float32 matmul,
the binary-plane and int8 kernels alone, and the layered product of int8 operands for each
component schedule, resolution by resolution.
"""
from __future__ import annotations

import json
import time

import numpy as np

from mpilayer import _kernels
from mpilayer.components import make_split
from mpilayer.layered import layered_matmul
from mpilayer.products import n_a_digits, n_b_digits, resolution_terms


def best_time(fn, repeat: int) -> float:
    """Minimum wall time of ``repeat`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def parse_schedules(text: str) -> list:
    out = []
    for item in text.split(";"):
        item = item.strip()
        if item == "default":
            out.append(None)
        elif item:
            widths = tuple(int(v) for v in item.split(","))
            out.append(widths[0] if len(widths) == 1 else widths)
    return out


def resolution_work(split, r: int, kernels, n: int) -> tuple:
    """``(bit-MACs through popcount, MACs through int8)`` of resolution r's terms."""
    pop = mac = 0
    for (fa, fb), kernel in zip(resolution_terms(split, r), kernels):
        if kernel == "popcount":
            pop += fa.width * fb.width * n ** 3
        elif kernel == "int8":
            mac += n_a_digits(fa) * n_b_digits(fb) * n ** 3
    return pop, mac


def time_schedule(A, B, exact, component_bits, repeat: int) -> list:
    """Per-resolution rows of the fastest of ``repeat`` full layered runs."""
    best = None
    for _ in range(repeat + 1):  # the first run warms up caches and allocations
        t0 = time.perf_counter()
        marks = []
        for res in layered_matmul(A, B, component_bits=component_bits):
            marks.append((time.perf_counter() - t0, res))
        if best is None or marks[-1][0] < best[-1][0]:
            best = [(t, res.index, res.kernels, res.error_bound, float(np.abs(exact - res.estimate).max()))
                    for t, res in marks]
    return best


def kernel_rates(n: int, repeat: int) -> dict:
    """Rates of the two kernels alone on n x n x n: one plane pair, one int8 digit product."""
    rng = np.random.default_rng(1)
    X = rng.integers(-128, 128, (n, n), dtype=np.int8)
    Y = rng.integers(-128, 128, (n, n), dtype=np.int8)
    Xp, Yp = _kernels.pack_row_planes(X, 7, 1)[0], _kernels.pack_col_planes(Y, 7, 1)[0]
    C = np.zeros((n, n), dtype=np.int64)
    Xu = (X & 127).astype(np.uint8)
    out = {"pack_rows_1plane_s": best_time(lambda: _kernels.pack_row_planes(X, 7, 1), repeat),
           "pack_cols_1plane_s": best_time(lambda: _kernels.pack_col_planes(Y, 7, 1), repeat),
           "popcount_s": best_time(lambda: _kernels.popcount_matmul_acc(Xp, Yp, C, 1), repeat),
           "int8_s": best_time(lambda: _kernels.int8_matmul_acc(Xu, Y, C, 1), repeat)}
    return out


def run(args) -> int:
    n, repeat = args.n, args.repeat
    rng = np.random.default_rng(0)
    A = rng.integers(-128, 128, (n, n), dtype=np.int8)
    B = rng.integers(-128, 128, (n, n), dtype=np.int8)
    A64, B64 = A.astype(np.float64), B.astype(np.float64)
    A32, B32 = A.astype(np.float32), B.astype(np.float32)
    t64 = best_time(lambda: A64 @ B64, repeat)
    t32 = best_time(lambda: A32 @ B32, repeat)
    exact = (A64 @ B64).astype(np.int64)  # exact: |sum| < 2**53
    macs = float(n) ** 3
    features = _kernels.cpu_features()
    print(f"mpilayer bench kernels: n = {n}, one core, best of {repeat}; CPU features {features}")
    print(f"numpy float64 matmul {t64 * 1e3:9.1f} ms  {macs / t64 / 1e9:6.1f} GMAC/s   (ratio 1.00)")
    print(f"numpy float32 matmul {t32 * 1e3:9.1f} ms  {macs / t32 / 1e9:6.1f} GMAC/s   (ratio {t32 / t64:.2f})")
    rates = kernel_rates(n, repeat)
    pop_rate, i8_rate = macs / rates["popcount_s"], macs / rates["int8_s"]
    print(f"binary-plane kernel  {rates['popcount_s'] * 1e3:9.1f} ms  {pop_rate / 1e9:6.1f} G bit-MAC/s "
          f"= {pop_rate * t64 / macs:.1f}x the float64 MAC rate")
    print(f"int8 digit kernel    {rates['int8_s'] * 1e3:9.1f} ms  {i8_rate / 1e9:6.1f} GMAC/s  "
          f"= {i8_rate * t32 / macs:.2f}x the float32 MAC rate")
    print(f"packing one plane: rows {rates['pack_rows_1plane_s'] * 1e3:.2f} ms, "
          f"columns (bit-transposed) {rates['pack_cols_1plane_s'] * 1e3:.2f} ms")
    report = {"n": n, "float64_s": t64, "float32_s": t32, "kernels": rates, "schedules": []}
    for comp in parse_schedules(args.schedules):
        split = make_split(8, comp)
        rows = time_schedule(A, B, exact, comp, repeat)
        name = "+".join(map(str, split.widths))
        print(f"\nschedule {name} ({'default' if comp is None else 'component_bits=' + str(comp)})")
        print(f"{'res':>3} {'kernels':>17} {'step ms':>9} {'cum ms':>9} {'cum/f64':>8} {'rate':>16} "
              f"{'bound':>11} {'true err':>11} {'bound/true':>10}")
        prev = 0.0
        for t, r, kernels, bound, err in rows:
            step = t - prev
            prev = t
            pop, mac = resolution_work(split, r, kernels, n)
            rate = (f"{pop / step / 1e9:6.1f} G bitMAC/s" if pop and not mac
                    else f"{mac / step / 1e9:6.1f} GMAC/s" if mac and not pop else "mixed")
            ratio = f"{bound / err:10.2f}" if err else ("      exact" if bound == 0 else "       inf")
            print(f"{r:>3} {'+'.join(kernels):>17} {step * 1e3:9.1f} {t * 1e3:9.1f} {t / t64:8.3f} {rate:>16} "
                  f"{bound:11.4g} {err:11.4g} {ratio}")
        report["schedules"].append({"widths": split.widths, "rows": [
            {"resolution": r, "cumulative_s": t, "kernels": list(k), "bound": b, "true_error": e}
            for t, r, k, b, e in rows]})
        print(f"first resolution {rows[0][0] / t64:.3f}x float64 one-shot; exact product with every "
              f"resolution {rows[-1][0] / t64:.3f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0
