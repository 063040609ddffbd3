"""``mpilayer matmul``: the layered product of two HDF5 matrices under MPI.

Rank 0 is the master (mpilayer.mpi.master), every other rank a worker (mpilayer.mpi.worker); with
one rank, rank 0 does everything. Set-up errors (bad input, unwritable output) are found by
the master before any work and sent to the workers, so every rank exits cleanly with the
same status; an error during the run stops the workers the same way.

Exit status: 0 when the run completed, or was stopped by its deadline after at least one
resolution; 3 when the deadline passed before the first resolution; 4 when every worker
stopped answering (the output holds the best completed resolution); 2 for bad input or an
output that cannot be written (full disk, I/O error, lock held by another run, input changed
under the run), 1 for a failure; 128 + N when stopped by signal N (SIGTERM 143, SIGINT 130,
SIGUSR1 138: every tile published at its best resolution, ``stopped_by = "signal"``). A worker
that does not answer the final stop is not waited for forever: after the result is published,
the master ends the MPI job with ``MPI_Abort`` and the same status.

Rank 0 locks the output (``<output>.lock``, run_guard.OutputLock) before it touches any of its
files, and removes its scratch files on every exit path it survives.
"""
from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np

from mpilayer.errors import InputError, MpilayerError, one_line
from mpilayer.io.run_guard import Interrupted, OutputLock, StopSignals, exit_status, ignore_on_worker
from mpilayer.mpi.rank_stats import RankStats, return_freed_memory
from mpilayer.mpi.worker import serve_setups


def _import_master_side() -> None:
    """Rank 0's modules (HDF5, the result store, the master), imported on rank 0 only: workers
    then start with less to import, which leaves more of a shared node's cores to the master."""
    global LRUCache, OperandReader, INT64_SAFE, parse_code, Deadline, MatrixSource, check_chain
    global Master, WorkerFailed, straggler_config, TileGrid, default_tile, increment_bound, fail_setup, send_setup
    global storage_dtype, ResultStore, resolve_split, TileAccumulators, DistributedStore, choose_layout, planned_layout
    global data_plane, parallel_prep
    from mpilayer.core.coding import INT64_SAFE, parse_code
    from mpilayer.core.deadline import Deadline
    from mpilayer.core.partition import TileGrid, default_tile
    from mpilayer.core.products import increment_bound
    from mpilayer.core.quantization import storage_dtype
    from mpilayer.core.schedule import resolve_split
    from mpilayer.io.distributed_store import DistributedStore, choose_layout, planned_layout
    from mpilayer.io.h5io import MatrixSource, check_chain
    from mpilayer.io.operand_readers import LRUCache, OperandReader
    from mpilayer.io.result_store import ResultStore
    from mpilayer.io.tile_accumulators import TileAccumulators
    from mpilayer.mpi import data_plane, parallel_prep
    from mpilayer.mpi.engine import WorkerFailed, straggler_config
    from mpilayer.mpi.master import Master
    from mpilayer.mpi.protocol import fail_setup, send_setup

EXIT_INPUT, EXIT_FAILED, EXIT_NOTHING, EXIT_WORKERS_LOST = 2, 1, 3, 4
SIGNAL_STOP_S = 3.0  # after a stop signal, each worker gets this long to acknowledge the stop


def run(args) -> int:
    """Run the product on every rank; returns the process exit status. ``args.start``: when the
    process started (time.monotonic), so start-up counts against --deadline."""
    start = args.start
    from mpi4py import MPI

    return_freed_memory(args.memory)  # every rank: freed tiles leave the resident set (--memory)
    comm = MPI.COMM_WORLD
    if comm.Get_rank() != 0:
        ignore_on_worker()  # the master stops the workers
        return serve_setups(comm)
    _import_master_side()
    signals = StopSignals().install()
    lock = master = None
    try:
        try:
            lock = OutputLock(args.output)  # before anything touches the output's files
            master = _set_up(comm, args, start, lock)
        except MpilayerError as err:
            signals.running()  # a signal from now on is only recorded: end cleanly
            return fail_setup(comm, err, exit_status(err.signum) if isinstance(err, Interrupted) else EXIT_INPUT)
        signals.running(master.deadline)
        return _master_main(comm, master, args)
    finally:  # every exit path the process survives: no scratch file, no lock left
        signals.running(master.deadline if master is not None else None)
        if master is not None:
            master.store.discard()
            master.acc.close()
        if lock is not None:
            lock.remove_stale_scratch()  # ours (we hold the lock): .work, .acc, .tmp-<pid>
            lock.release()


def _master_main(comm, master: Master, args) -> int:
    log = master.log
    send_setup(comm, master.setup_message(args.seed))
    answered = None  # whether the workers acknowledged the stop, once asked
    try:
        summary = master.run()
        signalled = master.deadline.signal is not None
        answered = comm.Get_size() == 1 or master.engine.stop_workers(timeout=SIGNAL_STOP_S if signalled else None)
        if master.engine.stop_error is not None:  # e.g. a final part not on disk: not published as done
            raise master.engine.stop_error
        nothing = summary["stopped_by"] == "signal" and summary["tiles_per_resolution"][0] == 0
        ranks = [] if nothing else master.close()  # after a signal with no tile done: keep the old output
    except (MpilayerError, Exception) as err:  # noqa: BLE001 - any failure must stop the workers
        print(f"mpilayer: error: {one_line(err)}", file=sys.stderr)
        if os.environ.get("MPILAYER_DEBUG") and master.engine.worker_traceback:
            print(master.engine.worker_traceback, file=sys.stderr)
        status = EXIT_INPUT if isinstance(err, MpilayerError) and not isinstance(err, WorkerFailed) else EXIT_FAILED
        if comm.Get_size() > 1 and not (answered if answered is not None else master.engine.stop_workers(timeout=10)):
            _abort(comm, master, status)
        return status
    _report(summary, ranks, args, log)
    status = 0
    if summary["stopped_by"] == "signal":
        status = exit_status(master.deadline.signal)
        name = signal.Signals(master.deadline.signal).name
        held = ("every tile at its best resolution" if not nothing
                else "its previous content (no tile had a resolution yet)")
        print(f"mpilayer: stopped by {name} after {summary['elapsed_s']:.3f} s: {args.output} holds {held}; "
              f"exit status {status}", file=sys.stderr, flush=True)
    elif summary["stopped_by"] == "workers-lost":
        res = summary["resolution"]
        lost = ", ".join(map(str, sorted(set(master.engine.lost_ranks))))
        held = (f"{args.output} holds resolution {res} of 0..{summary['resolutions_total'] - 1} "
                f"(error bound {summary['error_bound']:.6g})" if res >= 0 else f"{args.output} holds no estimate")
        print(f"mpilayer: error: no worker left: rank(s) {lost} stopped answering (silent for more than "
              f"{master.engine.lost_after():g} s); {held}" + ("" if answered else "; ending the MPI job (MPI_Abort)"),
              file=sys.stderr, flush=True)
        status = EXIT_WORKERS_LOST
    elif summary["resolution"] < 0:
        print(f"mpilayer: error: the deadline ({args.deadline:g} s) passed before the first resolution "
              f"completed; {args.output} holds no estimate (allow more time, or use smaller tiles)",
              file=sys.stderr)
        status = EXIT_NOTHING
    elif not answered:
        print(f"mpilayer: warning: worker rank(s) {', '.join(map(str, master.engine.unanswered))} did not answer the "
              f"stop; {args.output} is complete up to its resolution; ending the MPI job (MPI_Abort({status}))",
              file=sys.stderr, flush=True)
    if not answered:  # a hung worker would keep mpiexec waiting: end every rank, with this status
        _abort(comm, master, status)
    return status


def _abort(comm, master: Master, status: int) -> None:
    """End every rank with ``status`` (MPI_Abort does not return): scratch files first."""
    master.store.discard()
    master.acc.close()
    master.store.lock.remove_stale_scratch()
    master.store.lock.release()
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(0.2)  # let the launcher forward the lines above before it kills the ranks
    comm.Abort(status)


def _log(*parts, **kw):
    print(*parts, **kw, flush=True)


def _set_up(comm, args, start: float, lock: OutputLock) -> Master:
    """Open and check the inputs, prepare the output, read the operands once; all on rank 0."""
    log = (lambda *a, **k: None) if args.quiet else _log
    stats = RankStats(0, "master")
    startup_s = time.monotonic() - start  # interpreter, imports, MPI initialisation
    if args.deadline is not None and not args.deadline >= 0:
        raise InputError(f"--deadline must be >= 0 seconds, not {args.deadline}")
    deadline = Deadline(args.deadline, start)
    cache_bytes = min(64 * 2**20, args.memory // 32)  # HDF5 chunk cache per input
    a_src, b_src = MatrixSource(args.a, chunk_cache_bytes=cache_bytes), MatrixSource(args.b, chunk_cache_bytes=cache_bytes)
    check_chain(a_src, b_src)
    (m, k), n = a_src.shape, b_src.shape[1]
    try:
        split = resolve_split(args.bits, args.component_bits, m, n, k, args.budget)
    except (TypeError, ValueError) as err:
        raise InputError(f"--bits/--component-bits: {err}") from None
    itemsize = storage_dtype(split.bits)().itemsize
    code = _parse_code(args.code, comm.Get_size() - 1)  # before the long preparation pass
    workers = comm.Get_size() - 1 if data_plane.enabled() else 0  # workers that may read their own blocks
    planned = planned_layout(args.layout, workers, code is not None, m * n * 8)
    tr, tc, kp = default_tile(m, n, k, itemsize, args.memory, workers if planned == "distributed" else 0)
    if args.tile:
        tr, tc = args.tile
    if args.k_panel:
        kp = args.k_panel
    grid = TileGrid(m, n, k, tr, tc, kp)
    if code is not None:
        _check_code_sums(code, args.code, split, grid)
    real = not (a_src.is_integer and b_src.is_integer)
    static = {
        "bits": split.bits, "component_bits": np.array(split.widths, dtype=np.int64),
        "a": a_src.label, "b": b_src.label, "scale_mode": args.scale if real else "integer",
        "ranks": comm.Get_size(), "tile": np.array([tr, tc, kp], dtype=np.int64),
        "dtype_a": str(a_src.dtype), "dtype_b": str(b_src.dtype),
    }
    store_args = dict(path=args.output, shape=(m, n), dtype=np.float64 if real else np.int64, tile_shape=(tr, tc),
                      n_resolutions=split.n_resolutions, attrs=static, keep_all=args.keep == "all", force=args.force,
                      inputs=(a_src.path, b_src.path), lock=lock,
                      before_publish=lambda: (a_src.check_unchanged(), b_src.check_unchanged()))
    stores = {"single": ResultStore, "distributed": DistributedStore}
    store = stores[planned](**store_args)  # checks the output before the preparation pass
    try:
        cache = LRUCache(args.memory // 5)  # blocks and encoded components; see README, Memory
        a = OperandReader(a_src, "A", split, args.scale, tr, kp, cache)
        b = OperandReader(b_src, "B", split, args.scale, tc, kp, cache)
        with stats.timing("io"):  # checks, scales, zero points, statistics
            worker_reads, stats.bytes_out = _prepare(comm, a, b, split.bits, log)
        layout = choose_layout(args.layout, comm.Get_size() - 1, worker_reads, code is not None, m * n * 8)
        if layout != store.layout:  # the plan assumed that every worker reads both inputs
            store.discard()
            store = stores[layout](**store_args)
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
    config = {**straggler_config(args, comm.Get_size()), "prefetch": args.prefetch, "grace": args.grace,
              "code": code, "worker_reads": worker_reads, "layout": layout}
    accumulators = TileAccumulators(args.memory // 5, _scratch_path(args.output, "acc"), (m, n), (tr, tc))
    return Master(comm, config, a, b, grid, split, store, deadline, args.memory, log, stats, accumulators,
                  bar=False if args.quiet else None, progress_every=args.progress_every)


def _prepare(comm, a, b, bits: int, log) -> tuple:
    """Checks, scales, zero points and statistics of both operands: by every rank on a share
    (parallel_prep.py), the workers then reading their own blocks; alone on rank 0 with one rank
    or MPILAYER_DATA_PLANE=0 (a first pass here, blocks quantised when first sent). Returns
    ``({worker rank: sides it reads}, bytes rank 0 sent in the reductions)``."""
    if comm.Get_size() > 1 and data_plane.enabled():
        return parallel_prep.master_prepare(comm, a, b, bits, log)
    a.prepare(bits, lazy=True)
    b.prepare(bits, lazy=True)
    return {}, 0


def _parse_code(text: str, workers: int):
    """The ``--code`` of the run (None for none), checked against its worker ranks (InputError)."""
    try:
        code = parse_code(text, workers)
    except ValueError as err:
        raise InputError(str(err)) from None
    if code is not None and workers < code.n:
        raise InputError(f"--code {text} puts the N={code.n} rows of a code group on different workers: it needs "
                         f"at least {code.n} worker ranks, this run has {workers} (mpiexec -n {code.n + 1} or more)")
    return code


def _check_code_sums(code, text: str, split, grid: TileGrid) -> None:
    """InputError if the parity results of ``code`` could exceed int64 on this tiling."""
    widest = max(code.coefficient_sum(row) for row in range(code.k, code.n))
    largest = max(increment_bound(split, r, min(grid.k_panel, grid.k)) for r in range(split.n_resolutions))
    if widest * largest >= INT64_SAFE:
        raise InputError(f"--code {text}: parity results could exceed int64 at {split.bits} bits and k-panel "
                         f"{grid.k_panel} (use a smaller code, --k-panel or --bits)")


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
        why = {"deadline": "the deadline", "signal": "a signal"}.get(summary["stopped_by"], "lost workers")
        print(f"reached no resolution (stopped by {why} after {summary['elapsed_s']:.3f} s) "
              f"-> {args.output}", flush=True)
        return
    line = (f"reached resolution {res} of 0..{total - 1} ({'exact' if summary['exact'] else 'stopped by ' + summary['stopped_by']}), "
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
