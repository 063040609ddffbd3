"""``mpilayer stream``: a fixed A times a stream of items X_t, each with its own deadline.

Rank 0 runs the stream master (mpilayer.apps.stream.StreamPhase); every other rank runs the
unchanged ``worker_run`` of mpilayer.mpi.worker, once per pass: the layered pass, then with
``--compare one-shot`` the same items, arrivals and deadlines with a single ``bits``-bit
component (one-shot). Between passes the master stops the workers and sends a new set-up
message (as jobs/matmul.py does once), so the workers restart with the new split.

Set-up errors (bad input, unwritable output) are found by the master before any work and
sent to the workers, so every rank exits with status 2; a failure during the run stops every
rank with status 1 (2 for a bad item found while reading it). With ``--service-time`` the workers
emulate slow or hung ranks (as for matmul): the engine re-issues or re-queues a hung worker's
jobs; with no worker left the items not finished are missed and the exit status is 4; a worker
that does not answer the stop ends the MPI job with ``MPI_Abort`` after the output is complete.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from mpilayer.apps.stream import (COMPARISON_DTYPE, StreamOutput, StreamPhase, StreamSource, bound_errors,
                                  comparison_row, format_comparison, reference_errors)
from mpilayer.core.components import make_split
from mpilayer.core.partition import TileGrid, default_tile
from mpilayer.core.quantization import storage_dtype
from mpilayer.core.schedule import resolve_split
from mpilayer.errors import InputError, MpilayerError
from mpilayer.io.h5io import MatrixSource
from mpilayer.io.operand_readers import LRUCache, OperandReader
from mpilayer.mpi.engine import WorkerFailed, straggler_config
from mpilayer.mpi.protocol import fail_setup, send_setup, yield_cores_to_workers
from mpilayer.mpi.worker import serve_setups

EXIT_INPUT, EXIT_FAILED, EXIT_WORKERS_LOST = 2, 1, 4
EXACT_REFERENCE_MACS = 1e11   # above this, errors at the deadline come from the certified bounds


def run(args) -> int:
    from mpi4py import MPI

    start = args.start  # process start (time.monotonic): start-up counts against the deadlines

    comm = MPI.COMM_WORLD
    if comm.Get_rank() != 0:
        return serve_setups(comm)
    return _master_main(comm, args, start)


def _log(*parts, **kw):
    print(*parts, **kw, flush=True)


class _Context:
    pass


def _set_up(comm, args, start: float, log) -> _Context:
    """Open and check the inputs, prepare the output; all on rank 0, before any work."""
    ctx = _Context()
    if args.item_deadline is not None and not args.item_deadline >= 0:
        raise InputError(f"--item-deadline must be >= 0 seconds, not {args.item_deadline}")
    if args.rate is not None and not args.rate > 0:
        raise InputError(f"--rate must be > 0 items per second, not {args.rate}")
    config = straggler_config(args, comm.Get_size())
    cache_bytes = min(64 * 2**20, args.memory // 16)
    a_src = MatrixSource(args.a, chunk_cache_bytes=cache_bytes)
    try:
        source = StreamSource(args.x, chunk_cache_bytes=cache_bytes)
    except BaseException:
        a_src.close()
        raise
    (m, k), n, k2 = a_src.shape, source.cols, source.k
    if k != k2:
        raise InputError(f"cannot multiply {a_src.label} ({m}x{k}) by the items of {source.label} "
                         f"({source.n_items} items of {k2}x{n}): A has {k} columns but an item has {k2} rows")
    try:
        split = resolve_split(args.bits, args.component_bits, m, n, k, args.budget)
        one_shot = make_split(args.bits, (args.bits,))
    except (TypeError, ValueError) as err:
        raise InputError(f"--bits/--component-bits: {err}") from None
    workers = max(1, comm.Get_size() - 1)
    itemsize = storage_dtype(split.bits)().itemsize
    tr, tc, kp = default_tile(m, n, k, itemsize, args.memory)
    if args.tile:
        tr, tc = args.tile
    else:  # several tiles per item, so that one item's jobs spread over the workers
        tr = min(tr, max(16, -(-m // (2 * workers))))
    if args.k_panel:
        kp = args.k_panel
    grid = TileGrid(m, n, k, tr, tc, kp)
    source.check(split.bits)
    real = not (a_src.is_integer and source.is_integer)
    passes = [("", split)] + ([("one_shot", one_shot)] if args.compare == "one-shot" else [])
    readers = {}
    for group, s in passes:
        reader = OperandReader(a_src, "A", s, args.scale, tr, kp, LRUCache(args.memory // 5))
        reader.prepare(s.bits)
        readers[group] = reader
    attrs = {
        "format": "mpilayer-stream", "a": a_src.label, "x": source.label, "m": m, "k": k, "b": n,
        "items": source.n_items, "vector_items": source.vector, "bits": split.bits,
        "component_bits": np.array(split.widths, dtype=np.int64),
        "rate_items_per_s": args.rate if args.rate else -1.0,
        "deadline_s": args.item_deadline if args.item_deadline is not None else -1.0,
        "ranks": comm.Get_size(), "tile": np.array([tr, tc, kp], dtype=np.int64),
        "compare": args.compare, "scale_mode": args.scale if real else "integer",
        "dtype_a": str(a_src.dtype), "dtype_x": str(source.dtype),
    }
    output = StreamOutput(args.output, args.force, attrs)
    ctx.__dict__.update(config=config, split=split, passes=passes, readers=readers, a_src=a_src, source=source,
                        grid=grid, real=real, output=output)
    log(f"mpilayer stream: {a_src.label} ({m}x{k}) times {source.n_items} item(s) of {source.label} "
        f"({k}x{n}) on {comm.Get_size()} rank(s); {split.bits}-bit, components "
        f"{'+'.join(map(str, split.widths))}; tiles {tr}x{tc}x{kp} ({len(grid.tiles())} per item, "
        f"{len(grid.k_panels)} k-panel(s)); rate {'all at once' if not args.rate else f'{args.rate:g} items/s'}; "
        f"item deadline {'none' if args.item_deadline is None else f'{args.item_deadline:g} s'} after arrival; "
        f"set-up {time.monotonic() - start:.3f} s")
    return ctx


def _master_main(comm, args, start: float) -> int:
    log = (lambda *a, **k: None) if args.quiet else _log
    try:
        ctx = _set_up(comm, args, start, log)
    except MpilayerError as err:
        return fail_setup(comm, err, EXIT_INPUT)
    distributed = comm.Get_size() > 1
    if distributed:
        yield_cores_to_workers(5)
    summaries = {}
    for group, split in ctx.passes:
        phase, running = None, False
        try:
            ctx.output.create_group(group, ctx.source.n_items, ctx.grid.m, ctx.grid.n, ctx.source.vector,
                                    ctx.real, ctx.grid.shape)
            phase = StreamPhase(comm, split, ctx.readers[group], ctx.source, ctx.grid, ctx.output, group,
                                args.rate, args.item_deadline, args.scale, args.memory, log, quiet=args.quiet,
                                config=ctx.config)
            if distributed:
                send_setup(comm, {"split": split, "service_time": ctx.config["service_time"], "seed": args.seed})
                running = True
            summaries[group] = phase.run()
            answered = not distributed or phase.engine.stop_workers()
            running = False
            if not answered or phase.engine.stopped_by == "workers-lost":  # no further pass can use them
                _phase_line(summaries[group], log)
                return _end_early(comm, ctx, summaries, args, phase.engine)
        except Exception as err:  # noqa: BLE001 - any failure must stop the workers
            print(f"mpilayer: error: {err}", file=sys.stderr)
            if os.environ.get("MPILAYER_DEBUG") and phase is not None and phase.engine.worker_traceback:
                print(phase.engine.worker_traceback, file=sys.stderr)
            ctx.output.discard()   # the last published state stays readable
            if distributed:
                if running and not phase.engine.stop_workers(timeout=10):
                    comm.Abort(EXIT_FAILED)
                send_setup(comm, {"error": str(err), "status": EXIT_FAILED})
            return EXIT_INPUT if isinstance(err, MpilayerError) and not isinstance(err, WorkerFailed) else EXIT_FAILED
        _phase_line(summaries[group], log)
    if distributed:
        send_setup(comm, {"done": True})
    _compare(ctx, summaries, args)
    return 0


def _end_early(comm, ctx, summaries: dict, args, engine) -> int:
    """Every worker was lost, or some worker did not answer the stop (hung): finish the output
    with the passes done; then end every rank, with ``MPI_Abort`` if a worker did not answer (its
    sends may never complete; mpiexec would wait). Exit status 4 if no worker was left, else 0."""
    _compare(ctx, summaries, args)
    skipped = [group for group, _ in ctx.passes if group not in summaries]
    held = f"{args.output} is complete" + (f" without the {', '.join(skipped)} pass" if skipped else "")
    if engine.stopped_by == "workers-lost":
        status = EXIT_WORKERS_LOST
        print(f"mpilayer: error: no worker left: rank(s) {', '.join(map(str, sorted(set(engine.lost_ranks))))} "
              f"stopped answering; {held}, the items not finished by then missed", file=sys.stderr, flush=True)
    else:
        status = 0
        print(f"mpilayer: warning: worker rank(s) {', '.join(map(str, engine.unanswered))} did not answer the "
              f"stop; {held}; ending the MPI job (MPI_Abort(0))", file=sys.stderr, flush=True)
    if engine.unanswered:
        time.sleep(0.2)  # let the launcher forward the lines above before it kills the ranks
        comm.Abort(status)
    if comm.Get_size() > 1:
        send_setup(comm, {"done": True})
    return status


def _phase_line(summary: dict, log) -> None:
    tab = summary["table"]
    a_bytes = summary["a_bytes_per_worker"]
    log(f"{summary['mode']}: {int(tab['met'].sum())}/{len(tab)} items usable by their deadline, "
        f"{int((tab['resolution'] == summary['n_res'] - 1).sum())} exact, stream {summary['end_s']:.3f} s; "
        f"A resident: {int(a_bytes.max()) if len(a_bytes) else 0} bytes per worker, sent once "
        f"({summary['preload_s']:.3f} s before the stream); {tab['bytes_sent'].mean():.0f} bytes per item")


def _compare(ctx, summaries: dict, args) -> None:
    """Errors at the deadline against the reference, /comparison, and the printed table."""
    macs = ctx.source.n_items * ctx.grid.m * ctx.grid.k * ctx.grid.n
    exact = macs <= EXACT_REFERENCE_MACS and ctx.grid.m * ctx.grid.k * 8 <= args.memory // 4
    groups = list(summaries)
    rows = []
    if exact:
        errs = reference_errors(ctx.a_src, ctx.source, ctx.output, groups, ctx.real)
        method = ("reference: exact integer product (int64)" if not ctx.real
                  else "reference: float64 product of the real inputs")
    else:
        method = "errors from the certified bounds (exact reference too costly)"
    for group in groups:
        s = summaries[group]
        table = s["table"]
        if exact:
            err, scale = errs[group]
        else:
            err, scale = bound_errors(table, ctx.readers[group], ctx.source, ctx.split.bits), None
        table["error"] = err
        ctx.output.set_table(group, table, {k: v for k, v in s.items()
                                            if k not in ("table", "group", "n_res", "end_s")}
                             | {"stream_s": s["end_s"], "error_method": method})
        rows.append(comparison_row(s["mode"], table, err, scale))
    ctx.output.extra["comparison"] = np.array(rows, dtype=COMPARISON_DTYPE)
    ctx.output.attrs["error_method"] = method
    ctx.output.close()
    print(format_comparison(rows, method), flush=True)
    print(f"-> {args.output}", flush=True)
