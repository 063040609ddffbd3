"""``mpilayer bench kernels``: the layered product against numpy matmul, one core, one run.

Everything is timed side by side in this process with one BLAS thread, so the ratios hold
on a noisy machine even when the absolute times do not: the instruction peaks of this core
(register-only loops of each kernel's inner instructions, ``_kernels.peak_loop``), numpy
float64 and float32 matmul, every SIMD path of the binary-plane and int8 kernels alone with
its fraction of the matching peak, and the layered product of int8 operands for each
component schedule, resolution by resolution.
"""
from __future__ import annotations

import json
import time

import numpy as np

from mpilayer import _kernels
from mpilayer.core import products
from mpilayer.core.layered import layered_matmul
from mpilayer.core.products import n_a_digits, n_b_digits, resolution_terms
from mpilayer.core.schedule import resolve_split

# The peak loop each kernel path is measured against (None: no SIMD peak, scalar code).
PEAK_OF = {("popcount", "avx512"): "popcnt512", ("popcount", "avx2"): "popcnt256",
           ("popcount", "c"): None, ("int8", "avx512vnni"): "vnni512",
           ("int8", "avx512vnni-ymm"): "vnni512/2", ("int8", "avxvnni"): "avxvnni256",
           ("int8", "avx2"): "maddubs256", ("int8", "blas"): "fma512x2", ("int8", "c"): None}


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
        elif item == "auto":
            out.append("auto")
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


def time_schedule(A, B, exact, component_bits, repeat: int, reference) -> tuple:
    """Per-resolution rows of the fastest of ``repeat`` full layered runs, and the best time of
    ``reference`` (the float64 product) timed in turn with them: the schedule's ratios to it are
    then taken side by side, whatever the shared machine does between schedules."""
    best, ref = None, float("inf")
    for i in range(repeat + 1):  # the first run warms up caches and allocations
        t0 = time.perf_counter()
        reference()
        if i:
            ref = min(ref, time.perf_counter() - t0)
        t0 = time.perf_counter()
        marks = []
        for res in layered_matmul(A, B, component_bits=component_bits):
            marks.append((time.perf_counter() - t0, res))
        if best is None or marks[-1][0] < best[-1][0]:
            best = [(t, res.index, res.kernels, res.error_bound, float(np.abs(exact - res.estimate).max()),
                     res.relative_error(exact), res.error_estimate) for t, res in marks]
    return best, ref


def cpu_model() -> str:
    """``model name`` of /proc/cpuinfo with its family/model numbers (or platform's guess)."""
    info = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if ":" in line:
                    key, value = (t.strip() for t in line.split(":", 1))
                    info.setdefault(key, value)
                if not line.strip() and info:
                    break
    except OSError:
        import platform
        return platform.processor() or platform.machine()
    return f"{info.get('model name', '?')} (family {info.get('cpu family', '?')}, model {info.get('model', '?')})"


def interleaved_best(fns, repeat: int) -> list:
    """Best wall time of each function, timed in turn ``repeat`` times after a warm-up, so that
    a busy moment of the shared machine hits a kernel and its peak loop alike."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def peak_loops(seconds: float = 0.02) -> dict:
    """``name -> (loop, iters)`` for every peak loop this CPU runs, ~``seconds`` per call."""
    out = {}
    for name in ("vnni512", "popcnt512", "fma512", "avxvnni256", "maddubs256", "popcnt256", "fma256"):
        if not _kernels.peak_loop(name, 1):
            continue
        t0 = time.perf_counter()
        _kernels.peak_loop(name, 100_000)
        out[name] = max(1, int(100_000 * seconds / max(time.perf_counter() - t0, 1e-6)))
    return out


def peak_call(loops: dict, name: str):
    """``(fn, scale)``: a call of peak loop ``name`` (``vnni512/2``: half of vnni512, the ymm
    form; ``fma512x2``: float32 FMA, twice the f64 lanes) and its MACs, or (None, 0)."""
    base, factor = (name[:-2], 0.5) if name.endswith("/2") else (name[:-2], 2.0) if name.endswith("x2") \
        else (name, 1.0)
    if base not in loops:
        return None, 0.0
    iters = loops[base]
    return (lambda: _kernels.peak_loop(base, iters)), factor * _kernels.peak_loop(base, 1) * iters


def kernel_rates(n: int, repeat: int) -> dict:
    """Rates of the two kernels alone on n x n x n, per path this CPU runs, each timed in turn
    with its instruction-peak loop: one plane pair, one int8 digit product (B packed once for
    VNNI, as products.py caches it; its packing timed apart). The portable C paths are timed
    on n/4 (they are slow)."""
    rng = np.random.default_rng(1)
    X = rng.integers(-128, 128, (n, n), dtype=np.int8)
    Y = rng.integers(-128, 128, (n, n), dtype=np.int8)
    Xp, Yp = _kernels.pack_row_planes(X, 7, 1)[0], _kernels.pack_col_planes(Y, 7, 1)[0]
    C = np.zeros((n, n), dtype=np.int64)
    X7, X8 = (X & 127).astype(np.uint8), X.view(np.uint8)
    packed = _kernels.pack_int8(Y)
    out = {"pack_rows_1plane_s": best_time(lambda: _kernels.pack_row_planes(X, 7, 1), repeat),
           "pack_cols_1plane_s": best_time(lambda: _kernels.pack_col_planes(Y, 7, 1), repeat),
           "pack_int8_s": best_time(lambda: _kernels.pack_int8(Y), repeat), "paths": []}
    q = n // 4
    small = (Xp[:q], Yp[:q], X7[:q, :q].copy(), Y[:q, :q].copy(), C[:q, :q])
    loops = peak_loops()
    jobs = []
    for method in _kernels.popcount_methods():
        xp, yp, c, size = (small[0], small[1], small[4], q) if method == "c" else (Xp, Yp, C, n)
        jobs.append(("popcount", method, size, size * size * 64.0 * xp.shape[1],
                     lambda xp=xp, yp=yp, c=c, m=method: _kernels.popcount_matmul_acc(xp, yp, c, 1, method=m)))
    for method in _kernels.int8_methods():
        if method == "c":
            x, y, c, size, x_max = small[2], small[3], small[4], q, 127
        elif method in _kernels.FULL_8BIT_METHODS:  # VNNI: 8-bit digits, packed B
            x, y, c, size, x_max = X8, packed, C, n, 255
        else:
            x, y, c, size, x_max = X7, Y, C, n, 127
        jobs.append(("int8", method, size, float(size) ** 3,
                     lambda x=x, y=y, c=c, xm=x_max, m=method: _kernels.int8_matmul_acc(x, y, c, 1, x_max=xm, method=m)))
    for kernel, method, size, macs, fn in jobs:
        peak_name = PEAK_OF.get((kernel, method))
        pfn, pmacs = peak_call(loops, peak_name) if peak_name else (None, 0.0)
        t, *tp = interleaved_best([fn] + ([pfn] if pfn else []), repeat)
        out["paths"].append((kernel, method, size, t, macs / t, peak_name if pfn else None,
                             pmacs / tp[0] if pfn else None))
    return out


def print_rates(rates: dict, features: dict) -> None:
    """One line per kernel path: time, rate and fraction of its instruction peak."""
    auto = {"popcount": features["popcount_path"], "int8": features["int8_path"]}
    print(f"\n{'kernel':<9} {'path':<15} {'n':>5} {'ms':>8} {'rate':>18} {'peak loop':>11} "
          f"{'peak':>18} {'of peak':>8}")
    for kernel, method, size, t, rate, peak_name, peak in rates["paths"]:
        unit = "G bitMAC/s" if kernel == "popcount" else "GMAC/s"
        frac = f"{rate / peak:8.0%}" if peak else "       -"
        mark = "*" if auto[kernel] == method else " "
        print(f"{kernel:<9} {method + mark:<15} {size:>5} {t * 1e3:8.2f} {rate / 1e9:7.1f} {unit:<10} "
              f"{peak_name or '-':>11} {(f'{peak / 1e9:7.1f} {unit}' if peak else '-'):>18} {frac}")
    print("* = the path method='auto' (and so the layered product) uses on this CPU; each kernel and its "
          "peak loop timed in turn")


def run(args) -> int:
    from mpilayer.io.h5io import check_output_path

    if args.output:
        check_output_path(args.output, args.force)
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
    isa = ", ".join(f for f in ("avx2", "avx512", "avx512_vpopcntdq", "avx512_vnni", "avx_vnni") if features[f])
    print(f"mpilayer bench kernels: n = {n}, one core, best of {repeat}")
    print(f"CPU: {cpu_model()}; ISA: {isa or 'baseline (no SIMD paths)'}")
    print(f"paths used: popcount {features['popcount_path']}, int8 {features['int8_path']} "
          f"({products.DIGIT_BITS}-bit digits)")
    loops = peak_loops()
    fma_fn, fma_macs = peak_call(loops, "fma512" if "fma512" in loops else "fma256")
    if fma_fn:
        t64, t32, tf = interleaved_best([lambda: A64 @ B64, lambda: A32 @ B32, fma_fn], repeat)
    fma = fma_macs / tf if fma_fn else None
    frac64 = f" = {macs / t64 / fma:.0%} of the f64 FMA peak ({fma / 1e9:.1f} GMAC/s)" if fma else ""
    print(f"numpy float64 matmul {t64 * 1e3:9.1f} ms  {macs / t64 / 1e9:6.1f} GMAC/s   (ratio 1.00){frac64}")
    print(f"numpy float32 matmul {t32 * 1e3:9.1f} ms  {macs / t32 / 1e9:6.1f} GMAC/s   (ratio {t32 / t64:.2f})")
    rates = kernel_rates(n, repeat)
    print_rates(rates, features)
    best = {kernel: rate for kernel, method, size, t, rate, *_ in rates["paths"]
            if method == features[f"{kernel}_path"]}
    print(f"\nbinary-plane kernel = {best['popcount'] * t64 / macs:.1f}x the float64 MAC rate; "
          f"int8 digit kernel = {best['int8'] * t32 / macs:.2f}x the float32 MAC rate")
    print(f"packing: one plane rows {rates['pack_rows_1plane_s'] * 1e3:.2f} ms, "
          f"columns (bit-transposed) {rates['pack_cols_1plane_s'] * 1e3:.2f} ms; "
          f"int8 B for VNNI {rates['pack_int8_s'] * 1e3:.2f} ms")
    report = {"n": n, "cpu": cpu_model(), "features": features, "float64_s": t64,
              "float32_s": t32, "kernels": rates, "schedules": []}
    for comp in parse_schedules(args.schedules):
        split = resolve_split(8, comp, n, n, n)
        rows, t64 = time_schedule(A, B, exact, split.widths, repeat, lambda: A64 @ B64)
        name = "+".join(map(str, split.widths))
        label = {None: "default", "auto": "auto"}.get(comp if not isinstance(comp, tuple) else 0,
                                                       "component_bits=" + str(comp))
        print(f"\nschedule {name} ({label}); float64 product timed in turn with it: {t64 * 1e3:.1f} ms")
        print(f"{'res':>3} {'kernels':>17} {'step ms':>9} {'cum ms':>9} {'cum/f64':>8} {'rate':>16} "
              f"{'bound':>11} {'true err':>11} {'bound/true':>10} {'rel. error':>10} {'(estimated)':>11}")
        prev = 0.0
        for t, r, kernels, bound, err, rel, rel_est in rows:
            step = t - prev
            prev = t
            pop, mac = resolution_work(split, r, kernels, n)
            rate = (f"{pop / step / 1e9:6.1f} G bitMAC/s" if pop and not mac
                    else f"{mac / step / 1e9:6.1f} GMAC/s" if mac and not pop else "mixed")
            ratio = f"{bound / err:10.2f}" if err else ("      exact" if bound == 0 else "       inf")
            print(f"{r:>3} {'+'.join(kernels):>17} {step * 1e3:9.1f} {t * 1e3:9.1f} {t / t64:8.3f} {rate:>16} "
                  f"{bound:11.4g} {err:11.4g} {ratio} {rel:10.4f} {rel_est:11.4f}")
        report["schedules"].append({"widths": split.widths, "float64_s": t64, "rows": [
            {"resolution": r, "cumulative_s": t, "kernels": list(k), "bound": b, "true_error": e}
            for t, r, k, b, e, *_ in rows]})
        print(f"first resolution {rows[0][0] / t64:.3f}x float64 one-shot; exact product with every "
              f"resolution {rows[-1][0] / t64:.3f}x")
    if args.output:
        with open(args.output, "w") as fh:
            json.dump(report, fh, indent=2)
        print(f"wrote {args.output}")
    return 0
