"""``mpilayer bench stragglers``: time to each resolution with a straggler rank: plain, with
speculative re-issue, and with exact coded redundancy (``--code``).

Runs ``mpilayer matmul`` under mpiexec on a generated int8 problem with emulated service times
(``--service-time``: workers *sleep*, so many ranks share few cores) in six configurations,
interleaved ``--repeat`` times (median kept): without and with a straggler on rank 1, each
plain (re-issue off), with re-issue, and with the code (re-issue off). It prints, side by side,
the seconds from the first mini-job to each resolution, the copies re-issued, the parity jobs
computed and blocks decoded, and the overhead: mini-jobs computed and bytes the master sent,
relative to the plain run without a straggler. Every run's result is checked to be
bit-identical to the first one's, at every resolution.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys

import h5py
import numpy as np

from mpilayer.io.example_data import write_example
from mpilayer.io.result_store import read_result

MODES = ("plain", "re-issue", "code")  # re-issue off/on/off; the code only in "code"
CONFIGS = [(straggler, mode) for straggler in (False, True) for mode in MODES]


def _mpiexec() -> str:
    found = os.environ.get("MPIEXEC") or shutil.which("mpiexec")
    if not found:
        raise SystemExit("mpilayer bench stragglers: no mpiexec on PATH (set MPIEXEC)")
    return found


def _run(ranks: int, a: str, b: str, out: str, extra: list) -> dict:
    cmd = [_mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpilayer", "matmul", a, b, "-o", out,
           "--force", "-q", "--keep", "all", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"mpilayer bench stragglers: run failed: {' '.join(cmd)}\n{proc.stderr}")
    result = read_result(out)
    with h5py.File(out, "r") as f:
        result["resolutions"] = {int(k): v[...] for k, v in f["resolutions"].items()}
    return result


def _work_times(result: dict) -> list:
    setup = float(result["attrs"]["setup_s"])
    return [float(t) - setup for t in result["timeline"]["elapsed_s"]]


def run(args) -> int:
    from mpilayer.cli.options import format_component_bits
    from mpilayer.io.run_guard import benchmark_directory

    n, ranks = args.n, args.ranks
    if ranks < 3:
        raise SystemExit("mpilayer bench stragglers: --ranks must be >= 3 (a master, a straggler, another worker)")
    work = benchmark_directory("mpilayer-bench-stragglers-")
    try:
        a_path, b_path = os.path.join(work, "a.h5"), os.path.join(work, "b.h5")
        write_example(a_path, b_path, (n, n, n), "int8", 0)
        a, b, out = f"{a_path}:/A", f"{b_path}:/B", os.path.join(work, "c.h5")
        tile, components = "x".join(map(str, args.tile)), format_component_bits(args.component_bits)
        common = ["--tile", ",".join(map(str, args.tile)), "--component-bits", components]
        runs = {i: [] for i in range(len(CONFIGS))}
        reference = None
        for rep in range(args.repeat):  # interleaved, so drifting machine load hits all alike
            for i, (straggler, mode) in enumerate(CONFIGS):
                model = args.service_time + (f"+straggler:1:{args.factor:g}" if straggler else "")
                res = _run(ranks, a, b, out, common + ["--service-time", model, "--seed", str(rep),
                                                       "--reissue", "on" if mode == "re-issue" else "off",
                                                       "--code", args.code if mode == "code" else "none"])
                if reference is None:
                    reference = res["resolutions"]
                for r, c in res["resolutions"].items():  # bit-identical to the first run
                    if not np.array_equal(c, reference[r]):
                        raise SystemExit(f"mpilayer bench stragglers: resolution {r} differs between runs")
                runs[i].append(res)
        attrs = runs[0][0]["attrs"]
        n_res = int(attrs["resolutions_total"])
        tiles = int(np.prod(runs[0][0]["tile_resolution"].shape))
        print(f"mpilayer bench stragglers: n = {n} int8, components {components}, {tiles} tiles of "
              f"{tile} ({tiles * n_res} mini-jobs), {ranks} ranks (1 master + {ranks - 1} workers) "
              f"on {os.cpu_count()} cores")
        print(f"service time {args.service_time} per mini-job; straggler: rank 1 takes {args.factor:g}x; "
              f"median of {args.repeat} interleaved runs; seconds from the first mini-job")
        code = runs[2][0]["attrs"]["code"]
        print(f"code: {code} (re-issue off); columns: no straggler | straggler")
        heads = [mode if mode != "code" else code for _, mode in CONFIGS]
        width, first = max(12, max(len(h) for h in heads) + 2), 30
        print(f"{'':<{first}}" + "".join(f"{h:>{width}}" for h in heads))
        med = {i: [statistics.median(_work_times(res)[r] for res in rs) for r in range(n_res)]
               for i, rs in runs.items()}

        def row(label, values, fmt):
            print(f"{label:<{first}}" + "".join(f"{v:>{width}{fmt}}" for v in values))

        for r in range(n_res):
            row(f"  to resolution {r} of 0..{n_res - 1} (s)", [med[i][r] for i in range(len(CONFIGS))], ".3f")
        rel = runs[0][0]["timeline"]["error_estimate"]  # the same in every run: the results are bit-identical
        print("  relative error per resolution (the run's statistical estimate of |C_r - C|_F / |C|_F): "
              + ", ".join(f"{r}: {float(e):.4g}" for r, e in enumerate(rel)))
        for key, label in (("reissued", "copies re-issued"), ("parity_results", "parity jobs computed"),
                           ("decoded", "blocks decoded")):
            row(label, [statistics.median(int(res["attrs"][key]) for res in runs[i]) for i in range(len(CONFIGS))], "g")
        jobs = {i: statistics.median(sum(int(rk["jobs"]) for rk in res["ranks"][1:]) for res in rs)
                for i, rs in runs.items()}
        sent = {i: statistics.median(int(res["ranks"][0]["bytes_out"]) for res in rs) for i, rs in runs.items()}
        row("mini-jobs computed (x)", [jobs[i] / jobs[0] for i in range(len(CONFIGS))], ".3f")
        row("bytes sent (x)", [sent[i] / sent[0] for i in range(len(CONFIGS))], ".3f")
        slow = [float(res["ranks"][1]["jobs"]) for res in runs[3]]
        print(f"jobs done by the straggler in the plain run: median {statistics.median(slow):g} of {tiles * n_res}")
        plain, reissue, coded = med[3][-1], med[4][-1], med[5][-1]
        print(f"with the straggler, the exact result comes {plain / reissue:.2f}x sooner with re-issue and "
              f"{plain / coded:.2f}x sooner with {code} ({plain:.3f} s -> {reissue:.3f} s / {coded:.3f} s; "
              f"no straggler: {med[0][-1]:.3f} s); every result bit-identical")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0
