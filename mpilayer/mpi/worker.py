"""Worker side of the MPI run: receive mini-jobs, compute their increments, send the tiles back.

A worker keeps the operand blocks it has been sent (``OperandBlock``, with their packed
planes and digits), so the master sends each component of a block to a worker once; the
master decides what a worker keeps (``evict`` in the job header) so that both sides agree
on it without extra messages.

A worker answers every job it is sent: with its result tile, or -- when the master cancelled
it (``TAG_CANCEL``: another copy of a re-issued job won) before or while it ran -- with a short
``{"id", "cancelled": True}`` result header and no tile. With ``--service-time`` it sleeps an
emulated extra time after each job (mpilayer.core.service_time; the drawn time scaled by the
header's ``service_share``, if any), waking to honour a stop or a cancel.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from collections import OrderedDict

import numpy as np

from mpilayer.core.components import ComponentSplit
from mpilayer.core.layered import TruncatedSums, kernel_exact, kernel_published, one_kernel_pass, reported_bound
from mpilayer.core.products import (CodedBlock, OperandBlock, add_coded_terms, add_terms, resolution_terms,
                                    terms_bound, whole_is_cheaper)
from mpilayer.core.quantization import storage_dtype
from mpilayer.core.service_time import ServiceTime, hang_forever
from mpilayer.core.tile_progress import tile_report
from mpilayer.core.wire_format import decode_component, encoded_spec
from mpilayer.io.run_guard import remove_quietly
from mpilayer.mpi.data_plane import bytes_read, read_block
from mpilayer.mpi.parallel_prep import worker_prepare
from mpilayer.mpi.protocol import (TAG_CANCEL, TAG_ERROR, TAG_JOB, TAG_PAYLOAD, TAG_RESULT, TAG_SETUP, TAG_STOP,
                                   TAG_STOPPED, TAG_TILE, format_exception, wait_for_message)
from mpilayer.mpi.rank_stats import RankStats

CANCEL_POLL_S = 0.005  # an emulated service time wakes this often to check for a stop or a cancel


class WorkerState:
    """The blocks one worker holds, and the computation of a mini-job from them."""

    def __init__(self, split: ComponentSplit, readers: dict | None = None, parts: str | None = None,
                 kept_bytes: int = 0):
        self.split = split
        self.blocks = {}
        self.readers = readers or {}  # side -> OperandReader of the inputs it reads (data_plane.py)
        self.parts = parts  # directory of the run's part files (distributed result), or None
        self.part_sync = None  # the final parts' fsyncs (distributed_store.PartSync)
        if parts is not None:
            from mpilayer.io.distributed_store import PartSync
            self.part_sync = PartSync()
        self.kept = OrderedDict()  # (A key, B key) -> (r, the tile's sum T_A(r) T_B(r)), oldest first
        self.kept_bytes = kept_bytes  # at most this many bytes of them (the master's set-up message)

    def sync_parts(self) -> None:
        """Wait until every final part this worker wrote is on disk (before it acknowledges the
        stop, after which the master publishes durably); OutputError if one is not."""
        if self.part_sync is not None:
            self.part_sync.wait()

    def apply(self, header: dict, payloads: list) -> None:
        """Evict what the master says, read the blocks it says to read (every component), then add
        the components that came with the job."""
        for key in header["evict"]:
            self.blocks.pop(tuple(key), None)
        for key, _ in header.get("reads", ()):
            key = tuple(key)
            self.blocks[key] = self._read(key)
        for (key, shape, comp, *coded), buf in zip(header["components"], payloads):
            key = tuple(key)
            block = self.blocks.get(key)
            if coded:  # a parity block's combination of the component (--code): integers as sent
                if block is None:
                    block = self.blocks[key] = CodedBlock(shape, self.split)
                block.add_component(comp, buf)
                continue
            if block is None:
                values = np.zeros(shape, dtype=storage_dtype(self.split.bits))
                block = self.blocks[key] = OperandBlock(values, key[0], self.split.bits)
            field = self.split.component(comp)
            block.add_component(field, decode_component(buf, shape, field))

    def _read(self, key: tuple) -> OperandBlock:
        """Block ``key`` from this worker's reader; a B block spanning all of k gets its columns'
        truncated sums from the operand's statistics (as layered.py's do), so that the int8
        kernel's offset correction needs no pass over the block."""
        side, mi, _ = key
        block = OperandBlock(read_block(self.readers, key), side, self.split.bits)
        reader = self.readers[side]
        if side == "B" and len(reader.panels) == 1 and reader.stats is not None:
            block.truncated_sums = TruncatedSums(reader.stats_for(mi).part(reader.majors[mi]))
        return block

    def compute(self, header: dict, narrow: bool = True) -> tuple:
        """The job's increment (all terms of its resolution; with ``full``, the whole product at r;
        with ``pairs``, the products of those component pairs) as an int64 tile (int32 if
        ``narrow`` and it fits, for the wire), and the kernels used."""
        if os.environ.get("MPILAYER_FAULT") == "worker-raise":  # failure-path tests
            raise RuntimeError("injected fault (MPILAYER_FAULT=worker-raise)")
        if "panels" in header:
            return self._compute_whole_k(header)
        a, b = self.blocks[tuple(header["a"])], self.blocks[tuple(header["b"])]
        terms = resolution_terms(self.split, header["r"])
        if isinstance(a, CodedBlock):
            tile = add_coded_terms(a, b, terms)
            fits_int32 = tile.size == 0 or (tile.min() >= -2**31 and tile.max() < 2**31)
            kernels = ("int8-parity",) * len(terms)
        elif "write" in header and "pairs" not in header:  # a distributed tile: its sum, kept or whole
            return self._tile_sum(header, a, b)
        else:
            full = header.get("full", False)
            terms = resolution_terms(self.split, header["r"], full)
            if "pairs" in header:  # named component pairs (the deadline experiment's layers)
                terms = [(self.split.component(i), self.split.component(j)) for i, j in header["pairs"]]
            tile, kernels = add_terms(None, a, b, terms)
            fits_int32 = terms_bound(terms, a.k) < 2**31
        if fits_int32 and narrow:  # half the bytes on the wire
            tile = tile.astype(np.int32)
        return tile, "+".join(kernels)

    def _tile_sum(self, header: dict, a: OperandBlock, b: OperandBlock) -> tuple:
        """A distributed tile's sum ``T_A(r) T_B(r)`` (int64): its sum at r-1, if this worker kept
        it, plus the increment's terms (unless the job asks for the whole product), else the
        whole product; kept in turn when the next resolution is an increment (:meth:`_keeps`)."""
        r, key = header["r"], (tuple(header["a"]), tuple(header["b"]))
        previous = self._previous_sum(header)
        self.kept.pop(key, None)
        if previous is not None:
            tile, kernels = add_terms(previous, a, b, resolution_terms(self.split, r), out=previous)
        else:
            tile, kernels = add_terms(None, a, b, resolution_terms(self.split, r, r > 0))
        if self._keeps(header, a, b):
            self.kept[key] = (r, tile)
            while sum(t.nbytes for _, t in self.kept.values()) > self.kept_bytes:
                self.kept.popitem(last=False)
        return tile, "+".join(kernels)

    def _previous_sum(self, header: dict):
        """The tile's sum at r-1 if this worker kept it and the job takes an increment, else None."""
        held = self.kept.get((tuple(header["a"]), tuple(header["b"])))
        if held is not None and held[0] == header["r"] - 1 and not header.get("full", False):
            return held[1]
        return None

    def _keeps(self, header: dict, a: OperandBlock, b: OperandBlock) -> bool:
        """Whether a distributed tile's sum at resolution r is worth keeping for r+1: the next
        resolution is an increment (products.whole_is_cheaper) and it fits the budget."""
        r = header["r"]
        return (r + 1 < self.split.n_resolutions and a.length * b.length * 8 <= self.kept_bytes
                and not whole_is_cheaper(self.split, r + 1, a.length, b.length, a.k))

    def _compute_whole_k(self, header: dict) -> tuple:
        """A whole-k job (mini_jobs.make_jobs): the product over every k-panel, each panel's
        blocks read, multiplied and dropped in turn (int64, not narrowed: it stays here)."""
        (_, ti, _), (_, tj, _) = header["a"], header["b"]
        terms = resolution_terms(self.split, header["r"], header.get("full", False))
        tile, kernels = None, ()
        for pi in range(header["panels"]):
            a = OperandBlock(read_block(self.readers, ("A", ti, pi)), "A", self.split.bits)
            b = OperandBlock(read_block(self.readers, ("B", tj, pi)), "B", self.split.bits)
            tile, kernels = add_terms(tile, a, b, terms)
        return tile, "+".join(kernels)

    def published(self, header: dict):
        """A distributed tile's published estimate straight from the kernel (int8 or binary-plane),
        which writes it in its own pass over the product (layered.kernel_published: no int64 tile,
        no estimate pass): ``(tile_report's tuple, kernels)``, or None where that does not apply (k
        in panels, parity blocks, named pairs, more than one kernel call; :meth:`compute` then
        runs). The exact tile likewise (layered.kernel_exact)."""
        from mpilayer.io.operand_readers import tile_scales

        r = header["r"]
        if ("write" not in header or "panels" in header or "pairs" in header
                or os.environ.get("MPILAYER_FAULT") == "worker-raise"):  # (compute raises it)
            return None
        a, b = self.blocks[tuple(header["a"])], self.blocks[tuple(header["b"])]
        if isinstance(a, CodedBlock) or self._keeps(header, a, b):  # (a kept sum is an int64 tile)
            return None
        if self._previous_sum(header) is not None:
            return None  # the increment onto the kept sum (compute)
        terms = resolution_terms(self.split, r, r > 0)
        if not one_kernel_pass(terms, a.length, b.length, a.k):
            return None
        ra, rb = self.readers["A"], self.readers["B"]
        rows, cols = slice(*header["write"]["rows"]), slice(*header["write"]["cols"])
        sa, sb = tile_scales(ra, rb, rows, cols)
        a_stats, b_stats = ra.stats.part(rows), rb.stats.part(cols)
        if r == self.split.n_resolutions - 1:  # the exact tile, as tile_report's exact_tile pass gives it
            if sa is None and not (a_stats.zero.any() or b_stats.zero.any()):
                return None  # (there the product itself is published: no pass to save)
            tile, est_sq, kernels = kernel_exact(a, b, terms, a_stats, b_stats, sa, sb)
            return (tile, 0.0, 0.0, est_sq), "+".join(kernels)
        te, kernels = kernel_published(r, a, b, terms, a_stats, b_stats, sa, sb)
        return (te.estimate, reported_bound(te, sa), te.var_sum, te.estimate_sq), "+".join(kernels)

    def finish_tile(self, header: dict, acc: np.ndarray | None, report: tuple | None = None) -> dict:
        """A distributed result (distributed_store.py): the tile's published estimate at its
        resolution (``report``, from :meth:`published`; else from the whole product ``acc = T_A(r)
        T_B(r)`` and the operands' statistics), written to its part file; returns the summary the
        master needs instead of the tile."""
        from mpilayer.io.distributed_store import part_path, write_part
        from mpilayer.io.operand_readers import tile_scales

        write = header["write"]
        a, b = self.readers["A"], self.readers["B"]
        rows, cols = slice(*write["rows"]), slice(*write["cols"])
        if report is None:
            sa, sb = tile_scales(a, b, rows, cols)
            report = tile_report(header["r"], acc, a.stats, b.stats, rows, cols, sa, sb)
        estimate, bound, var_sum, est_sq = report
        write_part(part_path(self.parts, header["r"], (header["a"][1], header["b"][1])),
                   np.ascontiguousarray(estimate, dtype=write["dtype"]),
                   self.part_sync if header["r"] == self.split.n_resolutions - 1 else None)
        return {"bound": float(bound), "var_sum": float(var_sum), "est_sq": float(est_sq)}


class NullState(WorkerState):
    """A *null worker* (``MPILAYER_NULL_WORKERS=1``, for ``mpilayer bench master``): it keeps only
    the shapes of the blocks it is given and answers each job at once with a zero tile of the
    right shape and dtype, so that the master alone limits the rate of a run."""

    def __init__(self, split: ComponentSplit, readers: dict | None = None, parts: str | None = None,
                 kept_bytes: int = 0):
        super().__init__(split)
        self._zeros = {}

    def apply(self, header: dict, payloads: list) -> None:
        for key in header["evict"]:
            self.blocks.pop(tuple(key), None)
        for key, shape, *_ in list(header["components"]) + list(header.get("reads", ())):
            self.blocks[tuple(key)] = tuple(shape)

    def compute(self, header: dict, narrow: bool = True) -> tuple:
        if "panels" in header:  # whole-k (distributed): no blocks, the tile from the header
            rows, cols = (hi - lo for lo, hi in (header["write"]["rows"], header["write"]["cols"]))
            return np.zeros((rows, cols), dtype=np.int64), "null"
        (rows, k), cols = self.blocks[tuple(header["a"])], self.blocks[tuple(header["b"])][1]
        terms = resolution_terms(self.split, header["r"], header.get("full", False))
        wide = header["a"][0] == "P" or terms_bound(terms, k) >= 2**31
        dtype = np.int64 if wide else np.int32
        tile = self._zeros.get((rows, cols, dtype))
        if tile is None:
            tile = self._zeros[(rows, cols, dtype)] = np.zeros((rows, cols), dtype=dtype)
        return tile, "null"

    def published(self, header: dict):  # the null tile of compute, always
        return None

    def finish_tile(self, header: dict, acc, report=None) -> dict:  # no part file: nobody reads C
        return {"bound": 0.0, "var_sum": 0.0, "est_sq": 0.0}


def recv_job(comm, status, split: ComponentSplit) -> tuple:
    """Receive a job header and its component buffers from rank 0."""
    header = comm.recv(source=0, tag=TAG_JOB, status=status)
    payloads = []
    for _, shape, comp, *coded in header["components"]:
        count, dtype = (int(np.prod(shape)), coded[0]) if coded else encoded_spec(shape, split.component(comp))
        buf = np.empty(count, dtype=dtype)
        comm.Recv(buf, source=0, tag=TAG_PAYLOAD)
        payloads.append(buf)
    return header, payloads


def worker_run(comm, split: ComponentSplit, service_time: ServiceTime | None = None, seed: int = 0,
               readers: dict | None = None, parts: str | None = None, kept_bytes: int = 0) -> None:
    """Serve jobs until the master says stop. Any exception goes to the master as text.

    ``service_time``/``seed``: the emulated service times of ``--service-time`` (none by default);
    ``readers``: ``{side: OperandReader}`` of the inputs this worker reads itself (data_plane.py);
    ``parts``: where it writes the tiles of a distributed result (distributed_store.py), keeping
    up to ``kept_bytes`` of tile sums for their next increment (WorkerState.kept).
    """
    from mpi4py import MPI

    null = os.environ.get("MPILAYER_NULL_WORKERS") == "1"
    state = (NullState if null else WorkerState)(split, readers, parts, kept_bytes)
    stats = RankStats(comm.Get_rank(), "null worker" if null else "worker")
    status = MPI.Status()
    emulator = service_time.for_rank(comm.Get_rank(), seed) if service_time is not None else None
    cancelled = set()  # ids of jobs the master cancelled
    sends = []  # (requests, tile) of results on their way to the master
    while True:
        with stats.timing("idle"):
            wait_for_message(comm, 0, status)
        if comm.Iprobe(source=0, tag=TAG_STOP):  # a stop overtakes the jobs queued before it
            break
        if status.Get_tag() == TAG_CANCEL:
            cancelled.update(comm.recv(source=0, tag=TAG_CANCEL))
            continue
        try:
            with stats.timing("comm"):
                header, payloads = recv_job(comm, status, split)
            if header.get("preload"):  # blocks to hold before any job (engine.py): stored and acknowledged
                state.apply(header, payloads)
                comm.send({"id": header["id"], "preloaded": True}, dest=0, tag=TAG_RESULT)
                continue
            with stats.timing("compute"):  # (an emulated service time counts as compute)
                state.apply(header, payloads)  # also for a cancelled job: the master counts on its blocks
                _take_cancels(comm, cancelled)
                if header["id"] not in cancelled:
                    if emulator is not None and emulator.hangs_now(stats.jobs):
                        hang_forever()
                    t0 = time.perf_counter()
                    report = state.published(header)
                    if report is None:
                        tile, kernel = state.compute(header, narrow="write" not in header)
                    else:
                        (report, kernel), tile = report, None
                    if emulator is not None:  # sleep, waking for a stop or a cancel
                        extra = emulator.extra(time.perf_counter() - t0, header.get("service_share", 1.0))
                        _sleep_unless(comm, extra, header["id"], cancelled)
            summary = None
            if "write" in header and header["id"] not in cancelled:
                with stats.timing("io"):  # its estimate and part file (distributed_store.py)
                    summary = state.finish_tile(header, tile, report)
        except Exception:  # reported to the master, which ends the run
            comm.send(format_exception(comm), dest=0, tag=TAG_ERROR)
            break
        if header["id"] in cancelled:  # answer without the tile, so the master knows the job is off
            cancelled.discard(header["id"])
            sends.append(([comm.isend({"id": header["id"], "cancelled": True}, dest=0, tag=TAG_RESULT)], None))
            continue
        stats.jobs += 1
        stats.bytes_in += sum(p.nbytes for p in payloads)
        if summary is not None:  # the tile is in its part file: the master gets its summary only
            sends.append(([comm.isend({"id": header["id"], "kernel": kernel, "summary": summary}, dest=0,
                                      tag=TAG_RESULT)], None))
            continue
        stats.bytes_out += tile.nbytes
        with stats.timing("comm"):  # non-blocking: the next queued job need not wait for the master
            sends.append(([comm.isend({"id": header["id"], "kernel": kernel, "dtype": tile.dtype.str},
                                      dest=0, tag=TAG_RESULT),
                           comm.Isend(tile, dest=0, tag=TAG_TILE)], tile))
            sends = [(reqs, buf) for reqs, buf in sends if not MPI.Request.Testall(reqs)]
    with stats.timing("comm"):
        MPI.Request.Waitall([r for reqs, _ in sends for r in reqs])
    try:
        with stats.timing("io"):
            state.sync_parts()
    except Exception:  # the master fails the run (engine.stop_workers) instead of publishing it as durable
        comm.send(format_exception(comm), dest=0, tag=TAG_ERROR)
    stats.bytes_read = bytes_read(state.readers)  # (the preparation's reads included)
    _stop(comm, status, split, stats)


def serve_setups(comm) -> int:
    """A worker rank's whole life: run a pass of :func:`worker_run` per set-up message from the
    master (protocol.send_setup) until one says done, last, or error; returns the exit status. A
    ``"prepare"`` set-up first takes this rank's share of the operands' preparation (parallel_prep.py).
    Waiting for a set-up sleep-waits while the master reads and checks the inputs. At the end it
    frees the node's shared memory (node_share.py; collective over the node's workers, which all
    end here)."""
    from mpilayer.mpi.node_share import free_all

    status = _serve_setups(comm)
    free_all()
    return status


def _serve_setups(comm) -> int:
    from mpi4py import MPI

    status = MPI.Status()
    readers = {}  # of the inputs this worker reads, from the "prepare" set-up (parallel_prep.py)
    while True:
        wait_for_message(comm, 0, status)
        setup = comm.recv(source=0, tag=TAG_SETUP)
        if "error" in setup:
            return setup["status"]
        if setup.get("done"):
            return 0
        if "prepare" in setup:
            readers = worker_prepare(comm, setup)
            continue
        remover = None
        if comm.Get_rank() == 1 and "output" in setup:  # the master is a control plane: finding and
            from mpilayer.io.distributed_store import stale_parts  # removing stale parts is a worker's job

            remover = threading.Thread(target=_remove_all, name="mpilayer-stale-parts", daemon=True,
                                       args=(stale_parts(setup["output"], setup["parts"], setup["published"]),))
            remover.start()
        try:
            worker_run(comm, setup["split"], setup.get("service_time"), setup.get("seed", 0), readers,
                       setup.get("parts"), setup.get("kept_bytes", 0))
        finally:
            if remover is not None:
                remover.join()
        if setup.get("last"):
            return 0


def _remove_all(paths) -> None:
    """Remove stale part files and directories, on a thread of their own while the worker computes:
    unlinking an earlier run's parts took ~45 ms at n = 4096, on the first worker's critical path."""
    for path in paths:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            remove_quietly(path)


def _take_cancels(comm, cancelled: set) -> None:
    """Receive every cancel that has arrived (each a list of job ids)."""
    while comm.Iprobe(source=0, tag=TAG_CANCEL):
        cancelled.update(comm.recv(source=0, tag=TAG_CANCEL))


def _sleep_unless(comm, seconds: float, job_id: int, cancelled: set) -> None:
    """Sleep ``seconds`` (no CPU), returning early if the master stops the run or cancels ``job_id``."""
    until = time.monotonic() + seconds
    while True:
        left = until - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, CANCEL_POLL_S))
        _take_cancels(comm, cancelled)
        if job_id in cancelled or comm.Iprobe(source=0, tag=TAG_STOP):
            return


def _stop(comm, status, split, stats: RankStats) -> None:
    """Wait for the master's stop, dropping the jobs queued before it, and acknowledge it
    with this rank's statistics.

    Receiving the dropped jobs lets the master's sends complete before MPI finalises.
    """
    while True:
        wait_for_message(comm, 0, status)
        if status.Get_tag() == TAG_JOB:
            recv_job(comm, status, split)
        elif status.Get_tag() == TAG_STOP:
            comm.recv(source=0, tag=TAG_STOP)
            while comm.Iprobe(source=0, tag=TAG_JOB, status=status):
                recv_job(comm, status, split)
            _take_cancels(comm, set())
            comm.send(stats.finish(), dest=0, tag=TAG_STOPPED)
            return
        else:  # a cancel sent before the stop
            comm.recv(source=0, tag=status.Get_tag())
