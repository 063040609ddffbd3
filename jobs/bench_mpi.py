"""``mpilayer bench mpi``: one process against 1 master + 2 workers on the same problem.

Runs ``mpilayer matmul`` under mpiexec with 1 rank and with 3 ranks (the master sleep-waits,
so two workers share the two cores), alternating, on a generated int8 problem, and prints:
throughput of the work phase (after the inputs are read) relative to twice the single-process
throughput, time and bytes per resolution, the master's CPU share (of its wall time and of the
workers' compute), the bytes through rank 0 per resolution against the operand and result bytes,
the bytes the workers of each node read from the inputs, and the deadline overshoot of runs
stopped at half their full time.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys

from mpilayer.io.example_data import write_example
from mpilayer.io.result_store import read_result


def _mpiexec() -> str:
    found = os.environ.get("MPIEXEC") or shutil.which("mpiexec")
    if not found:
        raise SystemExit("mpilayer bench mpi: no mpiexec on PATH (set MPIEXEC)")
    return found


def run_matmul(ranks: int, a: str, b: str, out: str, extra=(), allowed=(0,)) -> dict:
    cmd = [_mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpilayer", "matmul", a, b, "-o", out,
           "--force", "-q", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode not in allowed:
        raise SystemExit(f"mpilayer bench mpi: run failed: {' '.join(cmd)}\n{proc.stderr}")
    return read_result(out)


def work_times(result: dict) -> list:
    """Seconds from the end of the input phase to each resolution."""
    setup = float(result["attrs"]["setup_s"])
    return [float(t) - setup for t in result["timeline"]["elapsed_s"]]


def rank0_bytes(result: dict, operand_and_result: int) -> tuple:
    """``(bytes through rank 0 per resolution, their share of operand + result bytes)``: rank 0's
    bytes_in + bytes_out over the run, spread over its resolutions, against ``operand_and_result``
    = the inputs' bytes plus one resolution of C as stored (8 bytes an element)."""
    master = result["ranks"][0]
    per_resolution = (int(master["bytes_in"]) + int(master["bytes_out"])) / max(1, len(result["timeline"]))
    return per_resolution, per_resolution / operand_and_result


def run(args) -> int:
    from mpilayer.cli.options import format_component_bits
    from mpilayer.io.run_guard import benchmark_directory

    n, repeat = args.n, args.repeat
    work = benchmark_directory("mpilayer-bench-")
    try:
        a_path, b_path = os.path.join(work, "a.h5"), os.path.join(work, "b.h5")
        write_example(a_path, b_path, (n, n, n), "int8", 0)
        a_bytes = 1  # int8 inputs
        a, b, out = f"{a_path}:/A", f"{b_path}:/B", os.path.join(work, "c.h5")
        extra = ["--component-bits", format_component_bits(args.component_bits)]
        runs = {1: [], 3: []}
        for _ in range(repeat):  # alternate, so that drifting machine load hits both alike
            for ranks in (1, 3):
                runs[ranks].append(run_matmul(ranks, a, b, out, extra))
        best = {r: min(rs, key=lambda res: work_times(res)[-1]) for r, rs in runs.items()}
        t1, t3 = work_times(best[1]), work_times(best[3])
        ratio = (t1[-1] / t3[-1]) / 2
        tiles = " vs ".join("x".join(map(str, best[r]["attrs"]["tile_shape"])) for r in (1, 3))
        print(f"mpilayer bench mpi: n = {n} int8, components {list(best[1]['attrs']['component_bits'])}, "
              f"tiles {tiles}, best of {repeat}, on {os.cpu_count()} cores")
        print(f"{'resolution':>10} {'1 rank (s)':>11} {'3 ranks (s)':>12} {'bytes sent, 3 ranks':>20} {'bound':>12} "
              f"{'rel. error (est.)':>18}")
        for r, (x, y) in enumerate(zip(t1, t3)):
            row = best[3]["timeline"][r]
            print(f"{r:>10} {x:11.3f} {y:12.3f} {int(row['bytes_sent']):20,d} {float(row['error_bound']):12.4g} "
                  f"{float(row['error_estimate']):18.4g}")
        print("rel. error (est.): the run's statistical estimate of |C_r - C|_F / |C|_F (not certified); "
              "bound: certified max |C_r - C|")
        print(f"throughput of 1 master + 2 workers = {t1[-1] / t3[-1]:.2f}x one process "
              f"= {ratio:.2f} of 2x single-core (target >= 0.85)")
        ranks = best[3]["ranks"]
        master, compute = ranks[0], sum(float(row["compute_s"]) for row in ranks[1:])
        print(f"master CPU {float(master['cpu_s']):.3f} s of {float(master['wall_s']):.3f} s wall "
              f"({100 * float(master['cpu_s']) / float(master['wall_s']):.0f}%): it sleep-waits instead of spinning; "
              f"{100 * float(master['cpu_s']) / compute:.1f}% of the workers' compute ({compute:.3f} s; target <= 5%)")
        through, share = rank0_bytes(best[3], n * n * (2 * a_bytes + 8))
        layout = best[3]["attrs"].get("layout", "single")
        print(f"bytes through rank 0 ({layout} result): {through:,.0f} per resolution "
              f"(its bytes_in + bytes_out in /ranks: job messages, results or their summaries, the preparation's "
              f"reductions) = {100 * share:.2f}% of operand + result bytes (target <= 5% with shared inputs)")
        per_node = {}
        for row in ranks[1:]:
            per_node[row["host"]] = per_node.get(row["host"], 0) + int(row["bytes_read"])
        inputs = 2 * n * n * a_bytes
        nodes = ", ".join(f"{host} {nbytes:,d} bytes = {nbytes / inputs:.2f}x the inputs"
                          for host, nbytes in sorted(per_node.items()))
        print(f"inputs read from HDF5 by the workers, per node: {nodes} "
              "(node_share.py; MPILAYER_NODE_SHARE=0: each worker reads the blocks it needs)")
        overshoots = []
        times = [float(t) for t in best[3]["timeline"]["elapsed_s"]]
        deadline = (times[0] + times[-1]) / 2  # between the first and the last resolution
        for _ in range(repeat):
            res = run_matmul(3, a, b, out, extra + ["--deadline", f"{deadline:.3f}"], allowed=(0, 3))
            if res["attrs"]["stopped_by"] == "deadline":
                overshoots.append(float(res["attrs"]["overshoot_s"]))
        if overshoots:
            print(f"deadline at {deadline:.2f} s: overshoot median {1e3 * statistics.median(overshoots):.1f} ms, "
                  f"max {1e3 * max(overshoots):.1f} ms over {len(overshoots)} runs (target <= 50 ms)")
        else:
            print(f"deadline at {deadline:.2f} s: every run finished before it (no overshoot to measure)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0
