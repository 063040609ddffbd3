"""``mpilayer bench master``: how many workers can one master keep busy?

Runs ``mpilayer matmul`` under mpiexec with *null workers* (``MPILAYER_NULL_WORKERS=1``,
worker.NullState: they answer every job at once with a zero tile of the right shape), so the
master alone sets the pace. For each data path -- ``master-sent`` (rank 0 reads, quantises,
encodes and sends every operand component) and ``worker-read`` (workers read their blocks from
the shared HDF5 inputs; jobs carry descriptors) -- and each tile size it measures mini-jobs/s,
bytes/s and bytes through rank 0 per job, and fits the master's time per job as
``c0 + c1 * bytes through rank 0``. From that fit and the worker kernel rate it projects how
many workers one master keeps busy for n = 16k..256k and p = 16..4096, printing its assumptions.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

PATHS = {"master-sent": ({"MPILAYER_DATA_PLANE": "0"}, "single"),   # path -> (environment, --layout)
         "worker-read": ({"MPILAYER_DATA_PLANE": "1"}, "single"),
         "distributed": ({"MPILAYER_DATA_PLANE": "1"}, "distributed")}
SIZES = (16384, 32768, 65536, 131072, 262144)
WORKERS = (16, 64, 256, 1024, 4096)


def _mpiexec() -> str:
    found = os.environ.get("MPIEXEC") or shutil.which("mpiexec")
    if not found:
        raise SystemExit("mpilayer bench master: no mpiexec on PATH (set MPIEXEC)")
    return found


def measure(ranks: int, a: str, b: str, out: str, tile: int, path: str) -> dict:
    """One null-worker run: jobs, work-phase seconds, master CPU and bytes through rank 0."""
    import h5py

    env = dict(os.environ, MPILAYER_NULL_WORKERS="1", **PATHS[path][0])
    cmd = [_mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpilayer", "matmul", a, b, "-o", out, "--force",
           "-q", "--tile", f"{tile},{tile}", "--layout", PATHS[path][1]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"mpilayer bench master: run failed: {' '.join(cmd)}\n{proc.stderr}")
    with h5py.File(out) as f:  # (the null workers of a distributed run write no part files)
        attrs, ranks, timeline = dict(f["C"].attrs), f["ranks"][...], f["timeline"][...]
    master, workers = ranks[0], ranks[1:]
    setup = float(attrs["setup_s"])
    work = float(timeline["elapsed_s"][-1]) - setup
    work_cpu = float(master["cpu_s"]) - float(attrs["setup_cpu_s"])
    jobs = sum(int(w["jobs"]) for w in workers)
    through = int(master["bytes_out"]) + int(master["bytes_in"])
    return {"path": path, "tile": tile, "jobs": jobs, "work_s": work, "setup_s": setup,
            "cpu_s": float(master["cpu_s"]), "work_cpu_s": work_cpu, "bytes": through,
            "job_s": work_cpu / max(jobs, 1),
            "bytes_per_job": through / max(jobs, 1), "out_per_job": int(master["bytes_out"]) / max(jobs, 1)}


def fit(rows: list) -> tuple:
    """``(c0 seconds per job, c1 seconds per byte)`` by least squares over a path's runs (>= 0).
    The distributed path moves a few KiB per job, so its runs are fitted as a fixed cost per run
    (final publish, stop; left out) plus ``c0`` per job, ``c1 = 0``."""
    import numpy as np

    if rows and rows[0]["path"] == "distributed" and len(rows) > 1:
        jobs = np.array([r["jobs"] for r in rows], dtype=float)
        cpu = np.array([r["work_cpu_s"] for r in rows])
        if np.ptp(jobs) > 0:
            c0 = np.polyfit(jobs, cpu, 1)[0]
            if c0 > 0:
                return float(c0), 0.0
        return float(np.mean(cpu / jobs)), 0.0
    x = np.array([r["bytes_per_job"] for r in rows])
    y = np.array([r["job_s"] for r in rows])
    if len(rows) < 2 or np.ptp(x) < 0.2 * x.mean():  # bytes hardly vary: a cost per job only
        return float(y.mean()), 0.0
    c1, c0 = np.polyfit(x, y, 1)
    if c0 < 0:
        return 0.0, float(np.dot(x, y) / np.dot(x, x))
    if c1 < 0:
        return float(y.mean()), 0.0
    return float(c0), float(c1)


def projection_tile(n: int, p: int, path: str, per_worker: float = 4.0) -> tuple:
    """``(t, kp)``: square tiles giving each worker >= ``per_worker`` tiles per resolution, 256 <= t <= 4096;
    k-panels of at most 8192 (a job's operands then fit a worker's memory), all of k for the
    distributed layout (one k-panel: a t x n block of int8 per operand, 128 MiB at t = 2048,
    n = 64k)."""
    t = n // math.ceil(math.sqrt(per_worker * p))
    t = max(256, min(4096, 1 << max(0, t.bit_length() - 1)))
    return t, n if path == "distributed" else min(n, 8192)


def bytes_per_job(path: str, n: int, p: int, t: int, kp: int, control: float) -> float:
    """Bytes through rank 0 per job in the model of ``path`` (one int8 term per job, int32 results).

    master-sent: operands 2 n^2 sqrt(p) bytes per resolution (every worker needs its share of rows of A
    and columns of B), spread over the jobs, plus a 4 t^2 result; worker-read: the result plus
    ``control``, the bytes per job rank 0 sent in the measured runs (descriptors); distributed:
    ``control`` only (descriptors and summaries, measured)."""
    jobs = (n // t) ** 2 * max(1, n // kp)
    result = 4 * t * t
    if path == "master-sent":
        return min(2 * n * n * math.sqrt(p), jobs * 2 * t * kp) / jobs + result
    if path == "distributed":
        return control
    return result + control


def project(path: str, c0: float, c1: float, control: float, rate: float, link: float,
            per_worker: float = 4.0) -> dict:
    """Workers one master keeps busy, per (n, p): min(p, worker s per job / master s per job)."""
    out = {}
    for n in SIZES:
        for p in WORKERS:
            t, kp = projection_tile(n, p, path, per_worker)
            worker_s = t * t * kp / rate
            nbytes = bytes_per_job(path, n, p, t, kp, control)
            master_s = max(c0 + c1 * nbytes, nbytes / link)
            out[n, p] = min(p, worker_s / master_s)
    return out


def run(args) -> int:
    from mpilayer.io.example_data import write_example
    from mpilayer.io.h5io import check_output_path
    from mpilayer.io.run_guard import benchmark_directory

    if args.output:
        check_output_path(args.output, args.force)
    work = benchmark_directory("mpilayer-bench-master-", args.tmpdir)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    for path in paths:
        if path not in PATHS:
            raise SystemExit(f"mpilayer bench master: unknown path {path!r} (choose from {', '.join(PATHS)})")
    tiles = [int(t) for t in args.tiles.split(",")]
    try:
        a_path, b_path = os.path.join(work, "bm_a.h5"), os.path.join(work, "bm_b.h5")
        write_example(a_path, b_path, (args.n, args.n, args.n), args.dtype, 0, force=True)
        a, b, out = f"{a_path}:/A", f"{b_path}:/B", os.path.join(work, "bm_c.h5")
        rows = []
        for tile in tiles:
            for path in paths:  # alternating paths, so drifting load hits both alike
                best = min((measure(args.ranks, a, b, out, tile, path) for _ in range(args.repeat)),
                           key=lambda r: r["job_s"])
                rows.append(best)
        _print_measured(args, rows)
        fits = {}
        for path in paths:
            mine = [r for r in rows if r["path"] == path]
            c0, c1 = fit(mine)
            control = _control_bytes(mine)
            fits[path] = (c0, c1, control)
            print(f"  {path}: master CPU per job = {1e6 * c0:.1f} us + {1e9 * c1:.3f} ns/byte through rank 0 "
                  f"(bytes sent per job, measured: {control:,.0f})")
        rate, link = args.rate * 1e9, args.link * 1e9
        projections = {path: project(path, *fits[path], rate, link, args.tiles_per_worker) for path in paths}
        _print_projection(args, projections)
        if args.output:
            _plot(projections, args.output)
            print(f"plot -> {args.output}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _control_bytes(rows: list) -> float:
    """Measured bytes per job through rank 0 besides the model's operands and results: those it
    sent (descriptors; the worker-read path), or all of them (the distributed path: descriptors
    out, summaries in)."""
    key = "bytes_per_job" if rows and rows[0]["path"] == "distributed" else "out_per_job"
    return sum(r[key] for r in rows) / max(1, len(rows))


def _print_measured(args, rows: list) -> None:
    print(f"mpilayer bench master: n = {args.n} {args.dtype}, {args.ranks} ranks (1 master + {args.ranks - 1} null "
          f"workers), fastest of {args.repeat}, on {os.cpu_count()} cores")
    print("  jobs/s, MB/s: over the work phase's wall time; cpu us/job: the master's CPU seconds after set-up per "
          "job (its capacity: 1/that jobs/s); bytes/job: through rank 0 (components, descriptors, results)")
    print(f"{'path':<12} {'tile':>5} {'jobs':>6} {'work s':>8} {'jobs/s':>9} {'MB/s':>8} {'cpu us/job':>11} "
          f"{'bytes/job':>11} {'setup s':>8} {'master cpu s':>13}")
    for r in rows:
        print(f"{r['path']:<12} {r['tile']:>5} {r['jobs']:>6} {r['work_s']:8.3f} {r['jobs'] / r['work_s']:9.0f} "
              f"{r['bytes'] / r['work_s'] / 1e6:8.1f} {1e6 * r['job_s']:11.1f} {r['bytes_per_job']:11,.0f} "
              f"{r['setup_s']:8.3f} {r['cpu_s']:13.3f}")


def _print_projection(args, projections: dict) -> None:
    print("projection: workers one master keeps busy = min(p, worker seconds per job / master seconds per job)")
    print(f"  assumptions: square tiles t = n / ceil(sqrt({args.tiles_per_worker:g} p)) rounded down to a power "
          f"of 2 in [256, 4096], "
          f"k-panels min(n, 8192) (distributed: n); one int8 term per job (8-bit, components 7+1, whole products) at "
          f"{args.rate:g} GMAC/s per worker core; int32 results; master CPU per job c0 + c1 x bytes "
          f"through rank 0 (fit above), at least bytes / {args.link:g} GB/s (its link); master-sent operands "
          f"2 n^2 sqrt(p) bytes per resolution; the per-resolution publish is in the measured cost per job. "
          f"Not included: reading the inputs (master-sent: a serial pass on rank 0 that grows with n^2; "
          f"worker-read, distributed: shared by the workers) and the workers' file system bandwidth.")
    for path, proj in projections.items():
        print(f"  {path}:")
        print("  " + f"{'n':>8}" + "".join(f"{'p=' + str(p):>10}" for p in WORKERS))
        for n in SIZES:
            print("  " + f"{n:>8}" + "".join(f"{proj[n, p]:10.3g}" for p in WORKERS))


def _plot(projections: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(projections), figsize=(5.5 * len(projections), 4.2), squeeze=False)
    for ax, (name, proj) in zip(axes[0], projections.items()):
        for n in SIZES:
            ax.plot(WORKERS, [proj[n, p] for p in WORKERS], marker="o", label=f"n = {n // 1024}k")
        ax.plot(WORKERS, WORKERS, color="grey", linestyle=":", label="all busy")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("workers p")
        ax.set_ylabel("workers one master keeps busy")
        ax.set_title(name)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
