"""``mpilayer adaptive``: adaptive resolution of A @ B with a decision rule, under MPI.

The rows of A are the items: after each resolution, a row whose decision (``--rule top1``:
the argmax of its output row; ``--rule threshold:T``: the sign of every output against T) is
certified by the bounds stops receiving work, the others go on (mpilayer.apps.adaptive). Rank 0
checks the inputs; every rank then reads its own block of rows of A, and all of B, computes
them adaptively, and sends decisions, settling resolutions and work back; rank 0 checks every
decision against the rule on the exact product, writes the output and prints the table.
Real inputs are quantised with one scale per row of A and per column of B, so the results do
not depend on how the rows are split over the ranks.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from mpilayer.errors import InputError, MpilayerError
from mpilayer.mpi.protocol import TAG_ADAPTIVE_RESULT, TAG_ADAPTIVE_SETUP

EXIT_INPUT, EXIT_MISMATCH = 2, 1


def parse_rule(text: str):
    """``top1`` or ``threshold:T`` -> an mpilayer.apps.adaptive rule."""
    from mpilayer.apps.adaptive import threshold, top1

    if text == "top1":
        return top1()
    if text.startswith("threshold:"):
        try:
            return threshold(float(text.split(":", 1)[1]))
        except ValueError:
            pass
    raise InputError(f"--rule {text!r}: expected top1 or threshold:T (T a number)")


def run(args) -> int:
    from mpi4py import MPI

    from mpilayer.mpi.protocol import recv_when_ready

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if rank == 0:
        try:
            setup = _check(args, size)
        except MpilayerError as err:
            for dest in range(1, size):
                comm.send({"error": str(err)}, dest=dest, tag=TAG_ADAPTIVE_SETUP)
            print(f"mpilayer: error: {err}", file=sys.stderr)
            return EXIT_INPUT
        for dest in range(1, size):
            comm.send(setup, dest=dest, tag=TAG_ADAPTIVE_SETUP)
    else:
        setup = recv_when_ready(comm, 0, TAG_ADAPTIVE_SETUP)
        if "error" in setup:
            return EXIT_INPUT
    args.component_bits = setup["component_bits"]
    mine = _compute(args, setup["rows"][rank])
    if rank != 0:
        comm.send(mine, dest=0, tag=TAG_ADAPTIVE_RESULT)
        return 0
    parts = [mine] + [recv_when_ready(comm, source, TAG_ADAPTIVE_RESULT) for source in range(1, size)]
    return _report(args, setup, parts)


def _check(args, size: int) -> dict:
    """Rank 0: open and check the inputs and the output path; split the rows over the ranks."""
    from mpilayer.core.partition import block_slices
    from mpilayer.core.schedule import resolve_split
    from mpilayer.io.h5io import MatrixSource, check_chain, check_output_path

    parse_rule(args.rule)
    with MatrixSource(args.a) as a, MatrixSource(args.b) as b:
        check_chain(a, b)
        m = a.shape[0]
        try:  # one schedule for every rank's rows: resolved here, for the whole product
            args.component_bits = resolve_split(args.bits, args.component_bits, m, b.shape[1], a.shape[1],
                                                args.budget).widths
        except (TypeError, ValueError) as err:
            raise InputError(f"--bits/--component-bits: {err}") from None
    check_output_path(args.output, args.force)
    per_rank = -(-m // size)
    rows = block_slices(m, per_rank) + [slice(m, m)] * size
    return {"rows": [(s.start, s.stop) for s in rows[:size]], "m": m, "component_bits": args.component_bits}


def _compute(args, rows) -> dict:
    """One rank's rows: adaptive product, and the rule on the exact product for the check."""
    from mpilayer.apps.adaptive import adaptive_matmul
    from mpilayer.core.layered import layered_matmul
    from mpilayer.io.h5io import MatrixSource

    start, stop = rows
    with MatrixSource(args.a) as a, MatrixSource(args.b) as b:
        A = a.read(slice(start, stop), slice(None))
        B = b.read(slice(None), slice(None))
        for src, block in ((a, A), (b, B)):
            if not src.is_integer:
                src.check_finite(block, slice(start, stop) if src is a else slice(None), slice(None))
    rule = parse_rule(args.rule)
    t0 = time.perf_counter()
    result = adaptive_matmul(A, B, rule, args.bits, args.component_bits, scale="axis")
    elapsed = time.perf_counter() - t0
    estimates = [res.estimate for res in layered_matmul(A, B, args.bits, args.component_bits, scale="axis")]
    exact = estimates[-1]
    same = bool(np.array_equal(np.asarray(result.decisions), np.asarray(rule.exact(exact))))
    # squared errors of every resolution's estimate of all rows, for its relative error
    ref = np.asarray(exact, dtype=np.float64)
    error_sq = [float(np.sum(np.square(np.asarray(e, dtype=np.float64) - ref))) for e in estimates]
    return {"decisions": np.asarray(result.decisions), "resolution": result.resolution, "same": same,
            "active": result.active, "work_s": result.work_s, "full_work_s": result.full_work_s,
            "one_shot_work_s": result.one_shot_work_s, "elapsed_s": elapsed,
            "resolutions_total": result.resolutions_total, "error_sq": error_sq,
            "exact_sq": float(np.sum(np.square(ref)))}


def _report(args, setup: dict, parts: list) -> int:
    from mpilayer.io.h5io import atomic_h5_file

    R = parts[0]["resolutions_total"]
    decisions = np.concatenate([p["decisions"] for p in parts if len(p["resolution"])])
    resolution = np.concatenate([p["resolution"] for p in parts])
    m = setup["m"]
    active = np.sum([p["active"] for p in parts], axis=0)
    work = np.sum([p["work_s"] for p in parts], axis=0)
    full = np.sum([p["full_work_s"] for p in parts], axis=0)
    one_shot = sum(p["one_shot_work_s"] for p in parts)
    settled = np.bincount(resolution, minlength=R)
    same = all(p["same"] for p in parts)
    exact_sq = sum(p["exact_sq"] for p in parts)  # relative error of each resolution's estimate, all rows
    rel_error = np.sqrt(np.sum([p["error_sq"] for p in parts], axis=0) / exact_sq) if exact_sq else np.zeros(R)
    with atomic_h5_file(args.output) as f:
        f["decisions"] = decisions
        f["resolution"] = resolution
        f["resolution"].attrs["resolutions_total"] = R
        f["decisions"].attrs["rule"] = args.rule
        f["decisions"].attrs["equal_to_exact"] = same
        f["per_resolution"] = np.rec.fromarrays(
            [np.arange(R), active, settled, np.cumsum(settled) / max(m, 1), np.cumsum(work), np.cumsum(full),
             rel_error],
            names="resolution,rows_computed,rows_settled,fraction_settled,cumulative_work_s,work_to_final_s,"
                  "relative_error")
    say = (lambda *a, **k: None) if getattr(args, "quiet", False) else print  # -q: the last line only
    say(f"mpilayer adaptive: {m} rows, rule {args.rule}, {len(parts)} rank(s); work = kernel cost model seconds")
    say(f"{'res':>3} {'computed':>9} {'settled':>8} {'cum. settled':>13} {'cum. work / all rows to final':>30} "
        f"{'/ one-shot':>11} {'rel. error':>10}")
    for r in range(R):
        say(f"{r:>3} {active[r]:>9} {settled[r]:>8} {np.cumsum(settled)[r] / max(m, 1):>12.1%} "
            f"{np.cumsum(work)[r] / max(full.sum(), 1e-300):>30.3f} {np.cumsum(work)[r] / max(one_shot, 1e-300):>11.3f}"
            f" {rel_error[r]:>10.4f}")
    say("rel. error = |C_r - C|_F / |C|_F of resolution r's estimate of all rows (0 = exact, 1 = zeros)")
    say(f"rows needing the final resolution: {settled[-1]}/{m}; work saved vs computing every row to the "
        f"final resolution: {1 - work.sum() / max(full.sum(), 1e-300):.1%}")
    print(f"decisions equal to the rule on the exact product: {'yes' if same else 'NO'} -> {args.output}")
    return 0 if same else EXIT_MISMATCH
