"""``mpilayer matmul``: the layered product of two HDF5 matrices under MPI.

Rank 0 is the master (mpilayer.master), every other rank a worker (mpilayer.worker); with
one rank, rank 0 does everything. Set-up errors (bad input, unwritable output) are found by
the master before any work and sent to the workers, so every rank exits cleanly with the
same status; an error during the run stops the workers the same way.

Exit status: 0 when the run completed, or was stopped by its deadline after at least one
resolution; 3 when the deadline passed before the first resolution; 4 when every worker
stopped answering (the output holds the best completed resolution); 2 for bad input, 1 for a
failure. A worker that does not answer the final stop is not waited for forever: after the
result is published, the master ends the MPI job with ``MPI_Abort`` and the same status.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from mpilayer.blocks import LRUCache, OperandReader
from mpilayer.coding import INT64_SAFE, parse_code
from mpilayer.components import make_split
from mpilayer.deadline import Deadline
from mpilayer.errors import InputError, MpilayerError
from mpilayer.h5io import MatrixSource, check_chain
from mpilayer.master import Master, WorkerFailed
from mpilayer.partition import TileGrid, default_tile
from mpilayer.products import increment_bound
from mpilayer.protocol import fail_setup, send_setup
from mpilayer.quantization import storage_dtype
from mpilayer.rank_stats import RankStats
from mpilayer.result_store import ResultStore
from mpilayer.tile_accumulators import TileAccumulators
from mpilayer.worker import serve_setups

EXIT_INPUT, EXIT_FAILED, EXIT_NOTHING, EXIT_WORKERS_LOST = 2, 1, 3, 4


def run(args, start: float) -> int:
    """Run the product on every rank; returns the process exit status."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.Get_rank() != 0:
        return serve_setups(comm)
    return _master_main(comm, args, start)


def _master_main(comm, args, start: float) -> int:
    log = (lambda *a, **k: None) if args.quiet else _log
    try:
        master = _set_up(comm, args, start, log)
    except MpilayerError as err:
        return fail_setup(comm, err, EXIT_INPUT)
    send_setup(comm, {"split": master.split, "service_time": master.service_time, "seed": args.seed, "last": True})
    try:
        summary = master.run()
    except (MpilayerError, Exception) as err:  # noqa: BLE001 - any failure must stop the workers
        print(f"mpilayer: error: {err}", file=sys.stderr)
        if os.environ.get("MPILAYER_DEBUG") and getattr(master, "worker_traceback", None):
            print(master.worker_traceback, file=sys.stderr)
        master.store.discard()
        master.acc.close()
        if comm.Get_size() > 1 and not master.stop_workers(timeout=10):
            comm.Abort(EXIT_FAILED)
        return EXIT_INPUT if isinstance(err, MpilayerError) and not isinstance(err, WorkerFailed) else EXIT_FAILED
    answered = comm.Get_size() == 1 or master.stop_workers()
    ranks = master.close()
    _report(summary, ranks, args, log)
    status = 0
    if summary["stopped_by"] == "workers-lost":
        res = summary["resolution"]
        lost = ", ".join(map(str, sorted(set(master.lost_ranks))))
        held = (f"{args.output} holds resolution {res + 1}/{summary['resolutions_total']} "
                f"(error bound {summary['error_bound']:.6g})" if res >= 0 else f"{args.output} holds no estimate")
        print(f"mpilayer: error: no worker left: rank(s) {lost} stopped answering (silent for more than "
              f"{master.lost_after():g} s); {held}" + ("" if answered else "; ending the MPI job (MPI_Abort)"),
              file=sys.stderr, flush=True)
        status = EXIT_WORKERS_LOST
    elif summary["resolution"] < 0:
        print(f"mpilayer: error: the deadline ({args.deadline:g} s) passed before the first resolution "
              f"completed; {args.output} holds no estimate (allow more time, or use smaller tiles)",
              file=sys.stderr)
        status = EXIT_NOTHING
    elif not answered:
        print(f"mpilayer: warning: worker rank(s) {', '.join(map(str, master.unanswered))} did not answer the "
              f"stop; {args.output} is complete up to its resolution; ending the MPI job (MPI_Abort({status}))",
              file=sys.stderr, flush=True)
    if not answered:  # a hung worker would keep mpiexec waiting: end every rank, with this status
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(0.2)  # let the launcher forward the lines above before it kills the ranks
        comm.Abort(status)
    return status


def _log(*parts, **kw):
    print(*parts, **kw, flush=True)


def _set_up(comm, args, start: float, log) -> Master:
    """Open and check the inputs, prepare the output, read the operands once; all on rank 0."""
    stats = RankStats(0, "master")
    startup_s = time.monotonic() - start  # interpreter, imports, MPI initialisation
    if args.deadline is not None and not args.deadline >= 0:
        raise InputError(f"--deadline must be >= 0 seconds, not {args.deadline}")
    deadline = Deadline(args.deadline, start)
    try:
        split = make_split(args.bits, args.component_bits)
    except (TypeError, ValueError) as err:
        raise InputError(f"--bits/--component-bits: {err}") from None
    cache_bytes = min(64 * 2**20, args.memory // 16)  # HDF5 chunk cache per input
    a_src, b_src = MatrixSource(args.a, chunk_cache_bytes=cache_bytes), MatrixSource(args.b, chunk_cache_bytes=cache_bytes)
    check_chain(a_src, b_src)
    (m, k), n = a_src.shape, b_src.shape[1]
    itemsize = storage_dtype(split.bits)().itemsize
    tr, tc, kp = default_tile(m, n, k, itemsize, args.memory)
    if args.tile:
        tr, tc = args.tile
    if args.k_panel:
        kp = args.k_panel
    grid = TileGrid(m, n, k, tr, tc, kp)
    code = _parse_code(args.code, comm.Get_size() - 1, split, grid)  # before the long preparation pass
    real = not (a_src.is_integer and b_src.is_integer)
    static = {
        "bits": split.bits, "component_bits": np.array(split.widths, dtype=np.int64),
        "a": a_src.label, "b": b_src.label, "scale_mode": args.scale if real else "integer",
        "ranks": comm.Get_size(), "tile": np.array([tr, tc, kp], dtype=np.int64),
        "dtype_a": str(a_src.dtype), "dtype_b": str(b_src.dtype),
    }
    store = ResultStore(args.output, (m, n), np.float64 if real else np.int64, (tr, tc),
                        split.n_resolutions, static, keep_all=args.keep == "all", force=args.force)
    try:
        cache = LRUCache(args.memory // 5)  # blocks and encoded components; see README, Memory
        a = OperandReader(a_src, "A", split, args.scale, tr, kp, cache)
        b = OperandReader(b_src, "B", split, args.scale, tc, kp, cache)
        with stats.timing("io"):  # one pass over each operand: checks, scales, bound sums
            a.prepare(split.bits)
            b.prepare(split.bits)
        store.static_attrs.update(_scale_attrs(a, "a"), **_scale_attrs(b, "b"))
    except BaseException:
        store.discard()
        raise
    log(f"mpilayer matmul: C = {a_src.label} ({m}x{k}) @ {b_src.label} ({k}x{n}) on {comm.Get_size()} "
        f"rank(s); {split.bits}-bit, components {'+'.join(map(str, split.widths))}, "
        f"tiles {tr}x{tc}x{kp} ({len(grid.tiles())} tiles, {len(grid.k_panels)} k-panel(s)); "
        f"deadline {'none' if args.deadline is None else f'{args.deadline:g} s'}; "
        f"{f'code {code.spec}; ' if code else ''}start-up {startup_s:.3f} s, "
        f"inputs read and checked in {deadline.elapsed() - startup_s:.3f} s")
    if not args.worker_timeout > 0:
        raise InputError(f"--worker-timeout must be > 0 seconds, not {args.worker_timeout}")
    if args.service_time is not None:
        try:
            args.service_time.check_ranks(comm.Get_size())
        except ValueError as err:
            raise InputError(str(err)) from None
    config = {"prefetch": args.prefetch, "grace": args.grace, "reissue": args.reissue == "on", "code": code,
              "worker_timeout": args.worker_timeout, "seed": args.seed,
              "service_time": args.service_time if args.service_time is not None and args.service_time.active
              else None}
    accumulators = TileAccumulators(args.memory // 5, _scratch_path(args.output, "acc"), (m, n), (tr, tc))
    return Master(comm, config, a, b, grid, split, store, deadline, args.memory, log, stats, accumulators,
                  bar=False if args.quiet else None)


def _parse_code(text: str, workers: int, split, grid: TileGrid):
    """The ``--code`` of the run, checked against its worker ranks and int64 sums (InputError)."""
    try:
        code = parse_code(text, workers)
    except ValueError as err:
        raise InputError(str(err)) from None
    if code is None:
        return None
    if workers < code.n:
        raise InputError(f"--code {text} puts the N={code.n} rows of a code group on different workers: it needs "
                         f"at least {code.n} worker ranks, this run has {workers} (mpiexec -n {code.n + 1} or more)")
    widest = max(code.coefficient_sum(row) for row in range(code.k, code.n))
    largest = max(increment_bound(split, r, min(grid.k_panel, grid.k)) for r in range(split.n_resolutions))
    if widest * largest >= INT64_SAFE:
        raise InputError(f"--code {text}: parity results could exceed int64 at {split.bits} bits and k-panel "
                         f"{grid.k_panel} (use a smaller code, --k-panel or --bits)")
    return code


def _scratch_path(output: str, what: str) -> str:
    directory, name = os.path.split(os.path.abspath(output))
    return os.path.join(directory, f".{name}.{what}.h5")


def _scale_attrs(reader: OperandReader, name: str) -> dict:
    if reader.scale is None:
        return {f"scale_{name}": 1.0}
    if np.ndim(reader.scale) == 0:
        return {f"scale_{name}": float(reader.scale)}
    return {f"scale_{name}": "per-row" if name == "a" else "per-column"}


def _report(summary: dict, ranks: list, args, log) -> None:
    """The final line (always on stdout, even with -q): resolution reached, bound, timing."""
    res, total = summary["resolution"], summary["resolutions_total"]
    if res < 0:
        why = "the deadline" if summary["stopped_by"] == "deadline" else "lost workers"
        print(f"reached no resolution (stopped by {why} after {summary['elapsed_s']:.3f} s) "
              f"-> {args.output}", flush=True)
        return
    line = (f"reached resolution {res + 1}/{total} ({'exact' if summary['exact'] else 'stopped by ' + summary['stopped_by']}), "
            f"error bound {summary['error_bound']:.6g}, {summary['elapsed_s']:.3f} s")
    if summary["overshoot_s"] is not None:
        line += f", deadline overshoot {1e3 * summary['overshoot_s']:.1f} ms"
    print(line + f" -> {args.output}", flush=True)
    if summary["reissued"] or summary["requeued"] or summary["code"] != "none":
        text = (f"  stragglers: {summary['reissued']} copies re-issued, {summary['cancelled']} cancelled, "
                f"{summary['requeued']} jobs re-queued")
        if summary["code"] != "none":
            text += (f"; code {summary['code']}: {summary['parity_results']} of {summary['parity_jobs']} parity jobs "
                     f"computed, {summary['decoded']} blocks decoded, {summary['superseded']} results not needed")
        log(text)
    for row in ranks:
        log(f"  rank {row['rank']:>3} {row['role']:<13} jobs {row['jobs']:>5}  compute {row['compute_s']:7.3f} s  "
            f"comm {row['comm_s']:6.3f} s  idle {row['idle_s']:7.3f} s  io {row['io_s']:6.3f} s  "
            f"cpu {row['cpu_s']:7.3f} s of {row['wall_s']:7.3f} s  peak rss {row['peak_rss_bytes'] / 2**20:7.1f} MiB")
