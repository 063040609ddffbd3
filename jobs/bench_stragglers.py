"""``mpilayer bench stragglers``: time to each resolution with a straggler rank, with and without
speculative re-issue.

Runs ``mpilayer matmul`` under mpiexec on a generated int8 problem with emulated service times
(``--service-time``: workers *sleep*, so many ranks share few cores) in four configurations,
interleaved ``--repeat`` times (median kept):

    no straggler, re-issue off | no straggler, re-issue on | straggler, re-issue off | straggler, re-issue on

and prints, side by side, the seconds from the first mini-job to each resolution, the copies
re-issued and the late duplicates ignored. Every run's result is checked to be bit-identical to
the first one's, at every resolution.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import h5py
import numpy as np

from mpilayer.example_data import write_example
from mpilayer.result_store import read_result

CONFIGS = [("no straggler", False, "off"), ("no straggler", False, "on"),
           ("straggler", True, "off"), ("straggler", True, "on")]


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
    n, ranks = args.n, args.ranks
    if ranks < 3:
        raise SystemExit("mpilayer bench stragglers: --ranks must be >= 3 (a master, a straggler, another worker)")
    work = tempfile.mkdtemp(prefix="mpilayer-bench-stragglers-")
    try:
        a_path, b_path = os.path.join(work, "a.h5"), os.path.join(work, "b.h5")
        write_example(a_path, b_path, (n, n, n), "int8", 0)
        a, b, out = f"{a_path}:/A", f"{b_path}:/B", os.path.join(work, "c.h5")
        common = ["--tile", f"{args.tile},{args.tile}", "--component-bits", args.component_bits]
        runs = {i: [] for i in range(len(CONFIGS))}
        reference = None
        for rep in range(args.repeat):  # interleaved, so drifting machine load hits all alike
            for i, (_, straggler, reissue) in enumerate(CONFIGS):
                model = args.service_time + (f"+straggler:1:{args.factor:g}" if straggler else "")
                res = _run(ranks, a, b, out, common + ["--service-time", model, "--seed", str(rep),
                                                       "--reissue", reissue])
                if reference is None:
                    reference = res["resolutions"]
                for r, c in res["resolutions"].items():  # bit-identical to the first run
                    if not np.array_equal(c, reference[r]):
                        raise SystemExit(f"mpilayer bench stragglers: resolution {r} differs between runs")
                runs[i].append(res)
        attrs = runs[0][0]["attrs"]
        n_res = int(attrs["resolutions_total"])
        tiles = int(np.prod(runs[0][0]["tile_resolution"].shape))
        print(f"mpilayer bench stragglers: n = {n} int8, components {args.component_bits}, {tiles} tiles of "
              f"{args.tile}x{args.tile} ({tiles * n_res} mini-jobs), {ranks} ranks (1 master + {ranks - 1} workers) "
              f"on {os.cpu_count()} cores")
        print(f"service time {args.service_time} per mini-job; straggler: rank 1 takes {args.factor:g}x; "
              f"median of {args.repeat} interleaved runs; seconds from the first mini-job")
        heads = [f"{name}, re-issue {reissue}" for name, _, reissue in CONFIGS]
        width, first = max(len(h) for h in heads) + 2, 24
        print(f"{'time to resolution (s)':<{first}}" + "".join(f"{h:>{width}}" for h in heads))
        med = {i: [statistics.median(_work_times(res)[r] for res in rs) for r in range(n_res)]
               for i, rs in runs.items()}
        for r in range(n_res):
            print(f"{f'  {r + 1}/{n_res}':<{first}}" + "".join(f"{med[i][r]:>{width}.3f}" for i in range(len(CONFIGS))))
        for key, label in (("reissued", "copies re-issued"), ("cancelled", "copies cancelled"),
                           ("duplicates_ignored", "late duplicates ignored")):
            print(f"{label:<{first}}" + "".join(f"{statistics.median(int(res['attrs'][key]) for res in runs[i]):>{width}g}"
                                               for i in range(len(CONFIGS))))
        slow = [float(res["ranks"][1]["jobs"]) for res in runs[2]]
        print(f"jobs done by the straggler without re-issue: median {statistics.median(slow):g} of {tiles * n_res}")
        off, on = med[2][-1], med[3][-1]
        print(f"with the straggler, re-issue reaches the exact result {off / on:.2f}x sooner "
              f"({off:.3f} s -> {on:.3f} s; no straggler: {med[0][-1]:.3f} s); every result bit-identical")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0
