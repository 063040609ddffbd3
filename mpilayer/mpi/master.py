"""Master side of the MPI run (rank 0): mini-jobs out, tiles in, resolutions published.

The product is cut into tiles of C and k-panels; a *mini-job* is the increment of one
resolution for one (tile, k-panel): the component pairs that resolution adds, computed as its
one or two terms (products.py). Jobs are handed out in resolution order -- every
tile's resolution r before any tile's r+1 -- to whichever worker has room in its queue
(``prefetch`` jobs deep), preferring, among the next jobs, the one whose operand components
the worker already holds. A tile reaches resolution r when all its jobs up to r are in; the
run reaches r when every tile has, and then the result file is published atomically.

Rank 0 is a control plane where it can be: workers that open the HDF5 inputs read and encode
their own blocks (jobs carry block keys: data_plane.py, after a preparation shared by all ranks:
parallel_prep.py), and with a distributed result (``--layout``, distributed_store.py) each job
computes its tile's whole product ``T_A(r) T_B(r)``, the worker writes the tile's estimate to a
part file and the master receives only its bound and error sums, publishing an index file.

At the deadline the master stops handing out work, keeps what arrives within ``grace``
seconds, publishes the best resolution of every tile, and stops the workers. A stop signal
(SIGTERM, SIGINT, SIGUSR1; run_guard.StopSignals) expires the deadline at once
(``stopped_by = "signal"``).

Stragglers and failures (see ``_reissue_candidate`` and ``_check_lost``):

- *Re-issue* (speculative copies, ``reissue`` in the config, on by default): a worker that
  wants work while no unsent job of the lowest unfinished resolutions is left gets a copy of
  the oldest outstanding job of those resolutions that has been out for more than
  ``REISSUE_AFTER`` times the median turnaround (at most one extra copy per job). The first
  result wins; the master cancels the other copy (``TAG_CANCEL``) and drains and ignores it if
  it comes anyway. Results are integers computed the same way by any worker, so they stay
  bit-identical.
- *Lost workers*: a worker that owes an answer and has sent nothing for ``worker_timeout``
  seconds (or ``LOST_TURNAROUNDS`` times the longest recent turnaround, if more) is treated as
  lost: it gets no more work and its jobs without another copy go back to the pending queue.
  It is taken back if it answers again. With no worker left, the run stops
  (``stopped_by = "workers-lost"``) with the best resolution of every tile published.
- *Coded redundancy* (``--code``, code_groups.py): each row of a code group goes to a
  different worker; the group's first K results finish it (missing ordinary results decoded
  exactly), and its other jobs are settled like answered ones: cancelled, or dropped unsent.
- *Flow control*: at most ``flow_limit`` messages (job headers, component buffers, cancels)
  may be on their way to a worker, counting every message of the jobs it has not answered. A
  rank that stops receiving keeps the messages sent to it parked in the sender's MPI buffers;
  MPICH's shared-memory transport has a fixed pool of them per sender (64 cells by default),
  and once silent ranks hold them all, the master can send to nobody (measured: with two hung
  workers holding 40 small messages each, a third rank received nothing). Live workers, which
  answer every job, are barely limited; a hung one holds a bounded share; cancels beyond the
  limit wait until the worker answers, and then go together in one message.
- Stopping waits for each worker only a bounded time (:meth:`stop_workers`); the caller then
  ends the MPI job with ``MPI_Abort`` (jobs/matmul.py).
"""
from __future__ import annotations

import statistics
import time
from collections import deque

import numpy as np

from mpilayer.core.components import ComponentSplit
from mpilayer.core.deadline import Deadline
from mpilayer.core.estimates import scaled_norms
from mpilayer.core.layered import relative_error_estimate
from mpilayer.core.partition import TileGrid
from mpilayer.core.products import (increment_bound, kernel_summary, predicted_seconds, resolution_terms, tally_kernels,
                                    whole_is_cheaper)
from mpilayer.core.quantization import relative_error_estimate as quantization_relative_error
from mpilayer.core.tile_progress import PanelSums, tile_report
from mpilayer.errors import InputError, MpilayerError, OutputError
from mpilayer.io.distributed_store import part_path
from mpilayer.io.operand_readers import CodedOperand, OperandReader, tile_scales
from mpilayer.mpi.code_groups import CodeGroups
from mpilayer.mpi.mini_jobs import WHOLE_K, MiniJob, Progress, WorkerView, make_jobs
from mpilayer.mpi.progress import ProgressBar
from mpilayer.mpi.protocol import (POLL_MAX_S, POLL_MIN_S, TAG_CANCEL, TAG_ERROR, TAG_JOB, TAG_PAYLOAD, TAG_RESULT,
                                   TAG_STOP, TAG_STOPPED, TAG_TILE, header_bytes, last_line, yield_cores_to_workers)
from mpilayer.mpi.rank_stats import RankStats
from mpilayer.mpi.worker import WorkerState

LOOKAHEAD = 32        # pending jobs considered when choosing one for a worker
QUEUE_S = 0.02        # estimated seconds of work kept queued on each worker (at least 2 jobs),
                      # so that polling and encoding latency on the master never starve it
QUEUE_MAX = 16        # jobs queued per worker at most
INFLIGHT_SHARE = 10   # sends not yet completed hold at most memory/INFLIGHT_SHARE bytes
RESULTS_SHARE = 8     # results owed (receive buffers) at most memory/RESULTS_SHARE bytes, and partial
                      # k-panel sums of (tile, resolution) keys as many bytes (int64 tiles)
BLOCK_FOOTPRINT = 4   # a worker's block with its planes and digits, in multiples of its values
REISSUE_AFTER = 2.0   # a job is copied when out for longer than this many median turnarounds
MAX_COPIES = 2        # live copies of a job at most (the original and one re-issued copy)
LOST_TURNAROUNDS = 4  # a worker is never lost before this many times the longest recent turnaround
STOP_MIN_S = 5.0      # at the stop, a worker is waited for at least this long (a lost one: STOP_LOST_S)
STOP_LOST_S = 1.0
PUBLISHED_SHARE = 32  # estimates kept for the next publish: at most memory/PUBLISHED_SHARE bytes (64 MiB
                      # of 2G: C of n = 2896 in float64), within what the other shares leave (1/16
                      # measured: master 34-36.5 MiB above baseline at --memory 32M, over the +10%)
SUMMARY_POLL_S = (2e-3, 5e-3)  # shortest and longest idle sleep of the loop when results are summaries
                               # (distributed): no large result waits for the master, and each worker has
                               # QUEUE_S of work queued (the wake-ups were most of the master's CPU)
PARKED_MESSAGES = 48  # messages on their way to the workers, shared among them (flow control, below)


class WorkerFailed(MpilayerError):
    """A worker raised; the message is its exception's last line."""


class Master:
    """State and loop of rank 0. ``run()`` returns a summary dict."""

    def __init__(self, comm, config, a: OperandReader, b: OperandReader, grid: TileGrid,
                 split: ComponentSplit, store, deadline: Deadline, memory: int, log=print,
                 stats: RankStats | None = None, accumulators=None, bar: bool | None = None):
        self.comm, self.config = comm, config
        self.a, self.b, self.grid, self.split = a, b, grid, split
        self.store, self.deadline, self.log = store, deadline, log
        self.setup_s = deadline.elapsed()  # start-up, input checks and the preparation pass
        self.code = config.get("code")  # coding.Code of --code, or None
        # tiles written by the workers that compute them (distributed_store.py): every job then
        # computes its tile's whole product T_A(r) T_B(r) over all of k (one k-panel, no --code)
        self.distributed = config.get("layout") == "distributed"
        self.poll_min, self.poll_max = SUMMARY_POLL_S if self.distributed else (POLL_MIN_S, POLL_MAX_S)
        self.coded = CodedOperand(a, self.code) if self.code else None
        # several k-panels: each job sums them on its worker (whole-k jobs; one k-panel: the
        # blocks are kept on the workers between resolutions, as master-sent ones are)
        self.whole_k = self.distributed and len(grid.k_panels) > 1
        self.jobs = make_jobs(grid, split, self.coded, whole_k=self.whole_k)
        self.groups = (CodeGroups(self.code, self.jobs, self.result_shape,
                                  lambda job: increment_bound(split, job.r, a.block_shape(0, job.panel)[1]))
                       if self.code else None)
        self.full = self._full_products()
        self.job_s = self._job_estimates()
        self.pending = deque(job.id for job in self.jobs)
        self.worker_budget = memory // 2
        n_res = split.n_resolutions
        self.panel_sums = PanelSums(len(grid.k_panels))  # (tile, r) -> sum of the k-panels received
        self.acc = accumulators  # tile -> int64 accumulator at its reached resolution
        self.tile_res = {t: -1 for t in grid.tiles()}
        self.tile_bound = {t: float("inf") for t in grid.tiles()}
        self.tile_spread = {}  # tile -> (statistical sum of squared errors, |estimate|^2)
        self.progress = Progress(n_res, len(self.tile_res))
        self.global_res = -1
        self.stopped_by = "complete"
        self.timeline = []
        self.kernels = {}
        self.end_time = None
        self.sends = []   # (requests, buffers) of jobs whose sends may not have completed
        self.recvs = []   # (request, job, tile, source, info) of result tiles on their way
        self.inflight_bytes = 0
        self.memory = memory
        self.views = []
        self.stats = stats or RankStats(0, "master")
        self.setup_cpu_s = self.stats.finish()["cpu_s"]  # CPU of the set-up (mpilayer bench master)
        store.tile_source = self.tile_estimate
        self.bar = ProgressBar(len(self.tile_res), split.n_resolutions, enabled=bar)
        self.rank_rows = []
        self.published = {}  # tile -> (resolution, estimate as published), within memory/PUBLISHED_SHARE
        self.published_bytes = 0
        self.flow_limit = max(6, PARKED_MESSAGES // max(1, comm.Get_size() - 1))
        # stragglers and failures
        self.reissue = config.get("reissue", True)
        self.worker_timeout = config.get("worker_timeout", 60.0)
        self.service_time = config.get("service_time")  # ServiceTime of --service-time, or None
        if self.service_time is not None:  # the queue depth counts the emulated mean service time
            self.job_s = {r: s + self.service_time.shift + self.service_time.mean for r, s in self.job_s.items()}
        self.copies = {}    # job id -> {rank: send time} of its live copies (sent, not answered)
        self.done = np.zeros(len(self.jobs), dtype=bool)
        self.turnarounds = deque(maxlen=64)  # seconds from send to result, recent winning copies
        self._median = None  # their median, until the next one comes in
        self.counts = {"reissued": 0, "duplicates_ignored": 0, "cancelled": 0, "requeued": 0, "superseded": 0}
        self.superseded = set()  # ids of jobs whose code group finished without their result
        self.lost_ranks = []  # every rank ever treated as lost, in order
        self.unanswered = []  # ranks that did not answer the stop
        self.summaries = {}  # (tile, r) -> summary of a written tile not yet in order (distributed)
        self.worker_reads = config.get("worker_reads", {})  # rank -> sides it reads itself (data_plane.py)

    def setup_message(self, seed: int) -> dict:
        """The workers' set-up message of this run (protocol.send_setup)."""
        message = {"split": self.split, "service_time": self.service_time, "seed": seed, "last": True}
        if self.distributed:  # where the workers write; rank 1 removes stale parts of earlier runs
            message.update(parts=self.store.run_dir, stale_parts=self.store.stale_runs())
        return message

    # ------------------------------------------------------------------ scheduling

    def _job_estimates(self) -> dict:
        """Estimated seconds of each resolution's job for a full tile, from the cost model."""
        tr, tc, kp = self.grid.tile_rows, self.grid.tile_cols, min(self.grid.k_panel, max(self.grid.k, 1))
        if self.whole_k:
            kp = self.grid.k
        return {r: predicted_seconds(resolution_terms(self.split, r, self.full[r]), tr, tc, kp)
                for r in range(self.split.n_resolutions)}

    def _full_products(self) -> dict:
        """Per resolution r, whether its jobs compute the whole product ``T_A(r) T_B(r)`` (one
        term; the master replaces the tile's sum with it) instead of the increment's terms:
        always with distributed results (a worker keeps no sum between jobs), never with
        ``--code`` (parity jobs combine increments), else where the cost model finds it cheaper
        (products.whole_is_cheaper). Same integers either way."""
        tr, tc, kp = self.grid.tile_rows, self.grid.tile_cols, min(self.grid.k_panel, max(self.grid.k, 1))
        return {r: r > 0 and (self.distributed or (self.code is None and whole_is_cheaper(self.split, r, tr, tc, kp)))
                for r in range(self.split.n_resolutions)}

    def _wants_work(self, view: WorkerView, prefetch: int) -> bool:
        if view.parked >= self.flow_limit:
            return False
        if view.queue and not self.distributed and not self._results_fit():  # receive buffers: memory/RESULTS_SHARE
            return False
        if len(view.queue) < prefetch:
            return True
        return (view.queued_s < QUEUE_S and len(view.queue) < QUEUE_MAX
                and self.inflight_bytes < self.memory // INFLIGHT_SHARE)

    def _tile_bytes(self) -> int:
        return 8 * self.grid.tile_rows * self.grid.tile_cols

    def _results_fit(self) -> bool:
        """One more job's result fits: every job out may hold an (int64 at most) receive buffer."""
        owed = sum(len(view.queue) for view in self.views)
        return (owed + 1) * self._tile_bytes() <= self.memory // RESULTS_SHARE

    def _sum_keys(self):
        """``(tile, r)`` keys with a partial k-panel sum on the master (or about to have one),
        and whether no new key fits in memory/RESULTS_SHARE; None when there are no panels to sum."""
        if len(self.grid.k_panels) < 2 or self.groups is not None or self.distributed:
            return None, False
        self.open_keys = {key for key in getattr(self, "open_keys", ()) if self.tile_res[key[0]] < key[1]}
        full = (len(self.open_keys) + 1) * self._tile_bytes() > self.memory // RESULTS_SHARE
        return self.open_keys, full

    def _missing(self, view: WorkerView, job: MiniJob) -> list:
        """``(key, component)`` pairs the worker lacks for ``job`` (none for a whole-k job: its
        worker reads the blocks as it goes)."""
        if job.panel == WHOLE_K:
            return []
        out = []
        for key, comps in zip(job.keys(), job.needs()):
            have = view.held.get(key, ())
            out.extend((key, c) for c in comps if c not in have)
        return out

    def _send_cost(self, view: WorkerView, job: MiniJob) -> int:
        """Bits the worker would be sent for ``job``."""
        total = 0
        for key, c in self._missing(view, job):
            reader = self._reader(key)
            rows, cols = reader.block_shape(key[1], key[2])
            total += rows * cols * reader.wire_bits(c)
        return total

    def _reader(self, key):
        """The OperandReader (or CodedOperand, for parity blocks) of a block key."""
        return {"A": self.a, "B": self.b, "P": self.coded}[key[0]]

    def result_shape(self, job: MiniJob) -> tuple:
        """Shape of a job's result tile (a parity job's has its code group's rows)."""
        cols = self.grid.col_blocks[job.tile[1]]
        if job.code_row >= 0:
            return self.coded.rows(job.tile[0]), cols.stop - cols.start
        rows = self.grid.row_blocks[job.tile[0]]
        return rows.stop - rows.start, cols.stop - cols.start

    def next_job(self, view: WorkerView):
        """The next job for a worker: among the first pending jobs of the lowest resolution,
        the one needing the fewest new bits on that worker."""
        head = self._pending_head()
        if head is None:
            return None
        first_r = self.jobs[head].r
        best, best_cost = None, None
        seen = 0
        live = [v.rank for v in self.views if not v.lost] if self.groups is not None else None
        open_keys, full = self._sum_keys()
        for jid in self.pending:
            if seen >= LOOKAHEAD or self.jobs[jid].r != first_r:
                break
            if self.done[jid]:  # settled while pending (removed lazily)
                continue
            if full and (self.jobs[jid].tile, self.jobs[jid].r) not in open_keys and open_keys:
                continue  # memory: finish the partial sums already open first
            if self.groups is not None and not self.groups.may_take(view.rank, self.jobs[jid], live):
                continue  # each row of a code group on a different worker
            seen += 1
            cost = self._send_cost(view, self.jobs[jid])
            if best is None or cost < best_cost:
                best, best_cost = jid, cost
                if cost == 0:
                    break
        if best is None:
            return None
        self.pending.remove(best)
        if open_keys is not None:
            open_keys.add((self.jobs[best].tile, self.jobs[best].r))
        return self.jobs[best]

    def _pending_head(self):
        """The first pending job id not settled meanwhile, or None. Settled jobs (a lost
        worker's job answered after all, a code group's rows it no longer needs) stay in
        ``pending`` until they reach its head: removing them at once would scan the queue."""
        while self.pending and self.done[self.pending[0]]:
            self.pending.popleft()
        return self.pending[0] if self.pending else None

    def _evictions(self, view: WorkerView, job: MiniJob) -> list:
        """Blocks the worker drops (least recently sent first) to stay within its budget."""
        incoming = {}
        for key, _ in self._missing(view, job):
            if key not in view.held:
                reader = self._reader(key)
                rows, cols = reader.block_shape(key[1], key[2])
                incoming[key] = BLOCK_FOOTPRINT * rows * cols * reader.element_bytes
        evict = []
        total = sum(view.held_bytes.values()) + sum(incoming.values())
        for key in list(view.held):
            if total <= self.worker_budget:
                break
            if key in job.keys():
                continue
            total -= view.held_bytes.pop(key)
            del view.held[key]
            evict.append(key)
        view.held_bytes.update(incoming)
        return evict

    def job_message(self, view: WorkerView, job: MiniJob) -> tuple:
        """Header and component buffers for ``job``; updates the view of what the worker holds.
        A block of an input the worker reads itself (data_plane.py) goes as its key, and the
        worker then holds all its components."""
        evict = self._evictions(view, job)
        components, payloads, reads = [], [], []
        for key, comp in self._missing(view, job):
            reader = self._reader(key)
            if key[0] in view.reads:
                if key not in view.held or len(view.held[key]) < len(self.split.widths):
                    reads.append((key, reader.block_shape(key[1], key[2])))
                    view.held[key] = set(range(len(self.split.widths)))
                continue
            buf = reader.encoded(key[1], key[2], comp)
            shape = reader.block_shape(key[1], key[2])
            # parity blocks travel as integers of their own dtype, which the worker is told
            components.append((key, shape, comp) if key[0] != "P" else (key, shape, comp, buf.dtype.str))
            payloads.append(buf)
            view.held.setdefault(key, set()).add(comp)
            self.progress.bytes_sent[job.r] += buf.nbytes
        for key in job.keys():  # most recently used last, for eviction order (a whole-k job holds none)
            if key in view.held:
                view.held[key] = view.held.pop(key)
        header = {"id": job.id, "r": job.r, "full": self.full[job.r], "a": job.keys()[0], "b": job.keys()[1],
                  "components": components, "evict": evict}
        if reads:
            header["reads"] = reads
        if self.distributed:  # the worker writes the tile and answers with its summary
            rows, cols = self.grid.row_blocks[job.tile[0]], self.grid.col_blocks[job.tile[1]]
            header["write"] = {"rows": (rows.start, rows.stop), "cols": (cols.start, cols.stop),
                               "dtype": self.store.dtype.str}
        if job.panel == WHOLE_K:
            header["panels"] = len(self.grid.k_panels)
        return header, payloads

    # ------------------------------------------------------------------ results

    def add_result(self, job: MiniJob, tile: np.ndarray) -> None:
        """Fold one k-panel's increment into its (tile, resolution) sum and advance the tile."""
        self.panel_sums.add((job.tile, job.r), tile)
        self._advance(job.tile)

    def _advance(self, tile) -> None:
        while True:
            r = self.tile_res[tile] + 1
            if r >= self.split.n_resolutions or not self.panel_sums.complete((tile, r)):
                return
            total = self.panel_sums.pop((tile, r))
            if self.full[r]:  # the whole product T_A(r) T_B(r): replace the tile's sum (r >= 1)
                np.subtract(total, self.acc.get(tile), out=total)
            acc = self.acc.add(tile, total)
            self.tile_res[tile] = r
            self._write_tile(tile, r, acc)
            self._reached(tile, r)

    def add_summary(self, job: MiniJob, summary: dict) -> None:
        """A tile the worker wrote (distributed result): advance it through every resolution
        whose summary is in, in order (a copy of a later resolution may finish first)."""
        self.summaries[job.tile, job.r] = summary
        tile = job.tile
        while (tile, self.tile_res[tile] + 1) in self.summaries:
            r = self.tile_res[tile] + 1
            s = self.summaries.pop((tile, r))
            self.tile_res[tile] = r
            self.tile_bound[tile] = s["bound"]
            self.tile_spread[tile] = (s["var_sum"], s["est_sq"])
            self.store.write_tile(tile[0], tile[1], None, r, s["bound"], part=part_path(self.store.run_dir, r, tile))
            self._reached(tile, r)

    def _reached(self, tile, r: int) -> None:
        """Progress: ``tile`` reached resolution r; the run reaches r with its last tile."""
        self.progress.tiles_at[r] += 1
        if self.progress.tiles_at[r] == self.progress.n_tiles:
            self._global_resolution(r)
        elif r == self.global_res + 1:
            self.bar.update(r, self.progress.tiles_at[r], self.deadline.elapsed())

    def _tile_scales(self, tile):
        return tile_scales(self.a, self.b, self.grid.row_blocks[tile[0]], self.grid.col_blocks[tile[1]])

    def _write_tile(self, tile, r, acc: np.ndarray) -> None:
        """A tile reached resolution r: its estimate, bound and sums, computed once. The estimate
        is kept for the next publish (:meth:`tile_estimate`) while the kept estimates fit in
        memory/PUBLISHED_SHARE; the exact resolution is one compiled pass (``_kernels.exact_tile``)."""
        rows, cols = self.grid.row_blocks[tile[0]], self.grid.col_blocks[tile[1]]
        sa, sb = self._tile_scales(tile)
        old = self.published.pop(tile, None)
        if old is not None:
            self.published_bytes -= old[1].nbytes
        cache = self.published_bytes + 8 * acc.size <= self.memory // PUBLISHED_SHARE
        estimate, bound, var_sum, est_sq = self._tile_report(r, acc, rows, cols, sa, sb,
                                                             keep=cache or self.store.keep_all)
        if cache:
            self.published[tile] = (r, estimate)
            self.published_bytes += estimate.nbytes
        self.tile_bound[tile] = bound
        self.tile_spread[tile] = (var_sum, est_sq)
        self.store.write_tile(tile[0], tile[1], estimate if self.store.keep_all else None, r, bound)

    def _tile_report(self, r, acc, rows, cols, sa, sb, keep: bool):
        """``(estimate or None, bound, var_sum, |estimate|^2)`` of a tile at resolution r
        (tile_progress.tile_report, on the statistics complete for its rows and columns)."""
        return tile_report(r, acc, *self._stats(rows, cols), rows, cols, sa, sb, keep=keep)

    def _stats(self, rows: slice, cols: slice):
        """The operands' statistics, complete for these rows of A and columns of B (blocks are
        quantised and summed lazily: OperandReader.prepare)."""
        return (self.a.stats_for(rows.start // self.grid.tile_rows),
                self.b.stats_for(cols.start // self.grid.tile_cols))

    def tile_estimate(self, ti: int, tj: int) -> np.ndarray:
        """A tile's current estimate, for the result store's publish."""
        tile = (ti, tj)
        r = max(self.tile_res[tile], 0)
        kept = self.published.get(tile)
        if kept is not None and kept[0] == r:
            return kept[1]
        rows, cols = self.grid.row_blocks[ti], self.grid.col_blocks[tj]
        return self._tile_report(r, self.acc.get(tile), rows, cols, *self._tile_scales(tile), keep=True)[0]

    def error_estimate(self) -> float:
        """Statistical (not certified) relative Frobenius error of the tiles as they stand (NaN
        while some tile has no resolution)."""
        if len(self.tile_spread) < len(self.tile_res):
            return float("nan")
        var_sum = sum(v for v, _ in self.tile_spread.values())
        return relative_error_estimate(var_sum, sum(e for _, e in self.tile_spread.values()))

    def quantization_error_estimate(self) -> float:
        """Statistical (not certified) ``|A B - C|_F / |C|_F`` of the exact product C of the
        quantised operands against the real one (quantization.relative_error_estimate): 0 for
        integer inputs, NaN while some tile has no resolution. The operands' norms come from
        their statistics, ``|C|_F^2`` from the tiles' sums."""
        if self.a.scale is None and self.b.scale is None:
            return 0.0
        if len(self.tile_spread) < len(self.tile_res) or self.a.stats is None or self.b.stats is None:
            return float("nan")
        c_sq = sum(v + e for v, e in self.tile_spread.values())
        (sa_sq, a_sq), (sb_sq, b_sq) = (scaled_norms(r.stats, r.scale) for r in (self.a, self.b))
        return quantization_relative_error(sa_sq, b_sq, sb_sq, a_sq, c_sq)

    def _global_resolution(self, r: int) -> None:
        self.global_res = r
        elapsed = self.deadline.elapsed()
        bound = max(self.tile_bound.values())
        p = self.progress
        self.timeline.append({"resolution": r, "elapsed_s": elapsed, "error_bound": bound,
                              "error_estimate": self.error_estimate(),
                              "quantization_error_estimate": self.quantization_error_estimate(),
                              "bytes_sent": p.bytes_sent[r], "bytes_received": p.bytes_received[r],
                              "tiles_done": p.n_tiles})
        if r < self.split.n_resolutions - 1:  # the last one is published by close()
            with self.stats.timing("io"):  # atomic, not fsynced: the final publish is
                self.store.publish(self.attrs(), self.timeline, durable=False)
        self.bar.clear()
        self.log(f"resolution {r} of 0..{self.split.n_resolutions - 1} at {elapsed:8.3f} s: "
                 f"error bound {bound:.6g}, estimated relative error {self.timeline[-1]['error_estimate']:.3g}, "
                 f"100% of tiles, {_mb(p.bytes_sent[r])} sent"
                 + ("  (exact)" if r == self.split.n_resolutions - 1 else ""))

    def attrs(self) -> dict:
        """Attributes of /C for the current state."""
        res = min(self.tile_res.values())
        return {
            "resolution": res,
            "resolutions_total": self.split.n_resolutions,
            "error_bound": max(self.tile_bound.values()),
            "error_estimate": self.error_estimate(),
            "quantization_error_estimate": self.quantization_error_estimate(),
            "exact": res == self.split.n_resolutions - 1,
            "elapsed_s": self.deadline.elapsed(),
            "deadline_s": self.deadline.seconds if self.deadline.seconds != float("inf") else -1.0,
            "stopped_by": self.stopped_by if self.end_time is not None else "running",
            "setup_s": self.setup_s,
            "setup_cpu_s": self.setup_cpu_s,
            "tiles_per_resolution": np.array(self.progress.tiles_at, dtype=np.int64),
        }

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict:
        """Hand out every job, or stop at the deadline; returns the summary of the run.

        Stopped by the deadline, or with workers still owing answers (stragglers, hung workers
        outvoted by a code), the result is published at once (before the workers are stopped,
        which may take a while, so it is saved first). Then call :meth:`stop_workers` and :meth:`close`.
        """
        if self.comm.Get_size() == 1:
            self._run_local()
        else:
            self._run_distributed()
        overshoot = self.deadline.overshoot(self.end_time) if self.stopped_by == "deadline" else None
        attrs = self.attrs()
        attrs["overshoot_s"] = overshoot if overshoot is not None else 0.0
        attrs["kernels"] = kernel_summary(self.kernels)
        attrs["accumulator_spills"] = self.acc.spills
        attrs.update(self.straggler_attrs())
        self.final_attrs = attrs
        owed = any(view.queue for view in self.views)  # a silent worker may delay the stop
        empty = self.stopped_by == "signal" and max(self.tile_res.values()) < 0  # keep the previous output
        if not empty and (self.stopped_by in ("deadline", "signal", "workers-lost") or owed):
            with self.stats.timing("io"):
                self.store.publish(attrs, self.timeline)
        return {**attrs, "overshoot_s": overshoot, "timeline": self.timeline}

    def straggler_attrs(self) -> dict:
        """Attributes of /C on service-time emulation, re-issue and lost workers."""
        return {"service_time": self.service_time.spec if self.service_time else "none",
                "reissue": bool(self.reissue), "worker_timeout_s": float(self.worker_timeout),
                **self.counts, "lost_ranks": ",".join(map(str, sorted(set(self.lost_ranks)))) or "none",
                "code": self.code.spec if self.code else "none",
                "parity_jobs": sum(job.code_row >= 0 for job in self.jobs),
                "parity_results": self.groups.parity_results if self.groups else 0,
                "decoded": self.groups.decoded if self.groups else 0}

    def _run_local(self) -> None:
        """``-n 1``: rank 0 computes every job itself, in order, through the worker code."""
        state = WorkerState(self.split)
        view = WorkerView(0)
        self.stats.role = "master+worker"
        emulator = self.service_time.for_rank(0, self.config.get("seed", 0)) if self.service_time else None
        while self._pending_head() is not None and not self.deadline.expired():
            if emulator is not None and emulator.hangs_now(view.jobs_done):  # the only worker hangs
                self.lost_ranks.append(0)
                break
            job = self.next_job(view)
            header, payloads = self.job_message(view, job)
            with self.stats.timing("compute"):
                t0 = time.perf_counter()
                state.apply(header, payloads)
                tile, kernel = state.compute(header)
                if emulator is not None:  # emulated service time, cut short by the deadline
                    extra = emulator.extra(time.perf_counter() - t0)
                    if extra > self.deadline.remaining():
                        time.sleep(max(0.0, self.deadline.remaining()))
                        break  # the emulated job did not finish in time
                    time.sleep(extra)
            view.jobs_done += 1
            self.stats.jobs += 1
            tally_kernels(self.kernels, kernel)
            self.done[job.id] = True
            self.progress.bytes_received[job.r] += tile.nbytes  # as a worker would have sent it
            self.add_result(job, tile)
        self.views = [view]
        self._end_of_work()

    def _run_distributed(self) -> None:
        from mpi4py import MPI

        comm = self.comm
        yield_cores_to_workers(self.config.get("master_nice", 5))  # its latency matters little: QUEUE_S
        views = {rank: WorkerView(rank) for rank in range(1, comm.Get_size())}
        self.views = list(views.values())
        for rank, sides in self.worker_reads.items():
            views[rank].reads = sides
        status = MPI.Status()
        delay = self.poll_min
        prefetch = max(1, self.config.get("prefetch", 2))
        while self._pending_head() is not None or self.copies:
            if self.deadline.expired():
                break
            busy = False
            for view in views.values():   # fill every worker's queue
                while not view.lost and self._wants_work(view, prefetch):
                    job = self._reissue_candidate(view) or self.next_job(view)
                    if job is None:
                        break
                    self._send_job(comm, view, job)
                    busy = True
            while not self.deadline.expired() and comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG,
                                                               status=status):
                self._receive(comm, status, views)
                busy = True
            if self.recvs and not self.deadline.expired():
                busy |= self._complete_receives(views)
            self._drop_completed_sends()
            if self._check_lost(views):  # every worker lost: stop with what is complete
                break
            if busy:
                delay = self.poll_min
            else:  # sleep-wait: the master must not spin a core that a worker needs
                with self.stats.timing("idle"):
                    time.sleep(delay)
                delay = min(2 * delay, self.poll_max)
        if self.deadline.expired():
            self._grace(comm, status, views)
        self._end_of_work()

    def _send_job(self, comm, view: WorkerView, job: MiniJob) -> None:
        """Send ``job`` (with the components the worker lacks) to a worker's queue."""
        with self.stats.timing("io"):  # reading and encoding blocks
            header, payloads = self.job_message(view, job)
        with self.stats.timing("comm"):
            reqs = [comm.isend(header, dest=view.rank, tag=TAG_JOB)]
            reqs += [comm.Isend(buf, dest=view.rank, tag=TAG_PAYLOAD) for buf in payloads]
        self.sends.append((reqs, payloads))  # buffers live until the sends complete
        view.job_messages[job.id] = view.job_messages.get(job.id, 0) + len(reqs)
        self.inflight_bytes += sum(buf.nbytes for buf in payloads)
        self.stats.bytes_out += sum(buf.nbytes for buf in payloads) + header_bytes(header)
        now = time.monotonic()
        if not view.queue:
            view.owes_since = now
        view.queue.append(job.id)
        view.queued_s += self.job_s[job.r]
        self.copies.setdefault(job.id, {})[view.rank] = now
        if self.groups is not None:
            self.groups.assign(view.rank, job)

    # ------------------------------------------------------------------ stragglers and failures

    def _reissue_candidate(self, view: WorkerView):
        """A speculative copy for ``view`` (re-issue), or None.

        Only when no unsent job of a lower resolution waits (resolution order first): among the
        outstanding jobs of resolutions below the next pending one, the oldest that has a
        single live copy, held by another worker, sent more than REISSUE_AFTER median
        turnarounds ago -- a straggler's or a hung worker's job, not one merely queued."""
        if not self.reissue or not self.copies or not self.turnarounds:
            return None
        head = self._pending_head()
        head_r = self.jobs[head].r if head is not None else self.split.n_resolutions
        behind = [(self.jobs[jid].r, min(holders.values()), jid) for jid, holders in self.copies.items()
                  if self.jobs[jid].r < head_r and len(holders) < MAX_COPIES and view.rank not in holders]
        if not behind:
            return None
        r, sent, jid = min(behind)  # lowest resolution, then the oldest copy
        if time.monotonic() - sent <= REISSUE_AFTER * self._median_turnaround():
            return None
        self.counts["reissued"] += 1
        return self.jobs[jid]

    def _median_turnaround(self) -> float:
        """Median of the recent turnarounds, computed once per new turnaround (it is asked for
        every time a worker has room)."""
        if self._median is None:
            self._median = statistics.median(self.turnarounds)  # (numpy's costs 100x more on 64 values)
        return self._median

    def _answered(self, view: WorkerView, jid: int):
        """The worker answered job ``jid`` (result or cancel): off its queue. Returns the send
        time of its copy if that copy was still live, else None."""
        view.job_messages.pop(jid, None)
        self._send_cancels(self.comm, view)
        if jid in view.queue:
            view.queue.remove(jid)
            if jid in view.cancelled:
                view.cancelled.discard(jid)
            else:
                view.queued_s -= self.job_s[self.jobs[jid].r]
        return self.copies.get(jid, {}).pop(view.rank, None)

    def _cancel_copies(self, comm, views, jid: int) -> None:
        """The first result of ``jid`` is in: cancel its other copies (they answer without a tile)."""
        for rank in self.copies.pop(jid, {}):
            view = views[rank]
            if jid not in view.cancelled and jid in view.queue:
                view.cancelled.add(jid)
                view.queued_s -= self.job_s[self.jobs[jid].r]
                view.deferred_cancels.append(jid)
                self._send_cancels(comm, view)
                self.counts["cancelled"] += 1

    def _send_cancels(self, comm, view: WorkerView) -> None:
        """Send a worker's held-back cancels in one message, unless flow control holds them."""
        if view.deferred_cancels and view.parked < self.flow_limit:
            self.sends.append(([comm.isend(view.deferred_cancels, dest=view.rank, tag=TAG_CANCEL)], []))
            view.deferred_cancels = []
            view.cancel_messages += 1

    def _check_lost(self, views) -> bool:
        """Treat workers silent for too long as lost; True if no worker is left."""
        now = time.monotonic()
        limit = self.lost_after()
        for view in views.values():
            if view.lost or not view.queue or now - view.owes_since <= limit:
                continue
            view.lost = True
            self.lost_ranks.append(view.rank)
            back = []
            for jid in view.queue:  # its copies are dead; jobs with no other copy go back
                holders = self.copies.get(jid)
                if holders is not None:
                    holders.pop(view.rank, None)
                    if not holders:
                        del self.copies[jid]
                        back.append(jid)
            view.queue.clear()
            view.cancelled.clear()
            view.deferred_cancels = []
            view.queued_s = 0.0
            if back:
                self.pending = deque(sorted(set(self.pending).union(back)))  # ids are in resolution order
                self.counts["requeued"] += len(back)
            self.bar.clear()
            self.log(f"worker rank {view.rank} sent nothing for {now - view.owes_since:.1f} s: treated as lost; "
                     f"{len(back)} of its jobs re-queued")
        return all(v.lost for v in views.values())

    def lost_after(self) -> float:
        """Seconds of silence after which a worker that owes an answer is treated as lost."""
        return max(self.worker_timeout, LOST_TURNAROUNDS * max(self.turnarounds, default=0.0))

    def _drop_completed_sends(self) -> None:
        from mpi4py import MPI

        still = []
        for reqs, bufs in self.sends:
            if MPI.Request.Testall(reqs):
                self.inflight_bytes -= sum(buf.nbytes for buf in bufs)
            else:
                still.append((reqs, bufs))
        self.sends = still

    def _receive(self, comm, status, views) -> None:
        source, tag = status.Get_source(), status.Get_tag()
        if tag == TAG_ERROR:
            text = comm.recv(source=source, tag=TAG_ERROR)
            self.worker_traceback = text
            kind, _, message = last_line(text).partition(": ")
            user_error = {"InputError": InputError, "OutputError": OutputError}.get(kind.rsplit(".", 1)[-1])
            if user_error is not None:  # an input it reads changed, a part it writes failed: as on the master
                raise user_error(message)
            raise WorkerFailed(f"worker rank {source} failed: {last_line(text)}")
        if tag != TAG_RESULT:
            raise RuntimeError(f"unexpected message with tag {tag} from rank {source}")
        info = comm.recv(source=source, tag=TAG_RESULT)
        view = views[source]
        view.owes_since = time.monotonic()
        view.cancel_messages = 0
        if view.lost:  # it answers again: take it back
            view.lost = False
            self.log(f"worker rank {source} answered again: taken back")
        if info.get("cancelled"):  # a cancelled copy, skipped by the worker: no tile follows
            self._answered(view, info["id"])
            return
        job = self.jobs[info["id"]]
        if "summary" in info:  # a distributed result: the tile is in its part file
            self.stats.bytes_in += header_bytes(info)
            self._result_in(views, view, job, info, None)
            return
        tile = np.empty(self.result_shape(job), dtype=np.dtype(info["dtype"]))
        # Non-blocking: MPICH moves a large message only while its sender is in MPI, and the
        # worker is computing its next job; a blocking Recv would spin here until then.
        # Posted for late duplicates too, so that the worker's send completes.
        self.recvs.append((comm.Irecv(tile, source=source, tag=TAG_TILE), job, tile, source, info))

    def _complete_receives(self, views) -> bool:
        """Fold in the result tiles whose transfer finished; True if any did. The first result
        of a job wins: its other copies are cancelled, late duplicates ignored."""
        done, still = [], []
        for item in self.recvs:
            (done if item[0].Test() else still).append(item)
        self.recvs = still
        for _, job, tile, source, info in done:
            self.stats.bytes_in += tile.nbytes
            self._result_in(views, views[source], job, info, tile)
        return bool(done)

    def _result_in(self, views, view: WorkerView, job: MiniJob, info: dict, tile) -> None:
        """A worker's answer to ``job``: its result tile, or (``tile`` None) the summary of the
        tile it wrote (distributed_store.py). The first answer wins; duplicates are counted."""
        sent = self._answered(view, job.id)
        if self.done[job.id]:
            self.counts["superseded" if job.id in self.superseded else "duplicates_ignored"] += 1
            return
        if sent is not None:
            self.turnarounds.append(time.monotonic() - sent)
            self._median = None
        self._settle(views, job)
        view.jobs_done += 1
        tally_kernels(self.kernels, info["kernel"])
        if tile is None:
            self.add_summary(job, info["summary"])
            return
        self.progress.bytes_received[job.r] += tile.nbytes
        if job.code_row < 0:
            self.add_result(job, tile)
        if self.groups is not None:
            self._record_coded(views, job, tile)

    def _settle(self, views, job: MiniJob) -> None:
        """``job`` needs no more work (its result is in, or was decoded, or is not needed):
        cancel its other copies; it is off the pending queue from now on."""
        self.done[job.id] = True  # (if still pending, it leaves the queue lazily: _pending_head)
        self._cancel_copies(self.comm, views, job.id)

    def _record_coded(self, views, job: MiniJob, tile: np.ndarray) -> None:
        """Give a result to its code group; once the group has K results, fold in the decoded
        ordinary results and settle the group's other jobs."""
        finished = self.groups.record(job, tile)
        if finished is None:
            return
        decoded, unneeded = finished
        self.superseded.update(j.id for j in unneeded)
        self.superseded.update(j.id for j, _ in decoded)
        for other in unneeded:
            self._settle(views, other)
        for missing, value in decoded:
            self._settle(views, missing)
            self.add_result(missing, value)

    def _grace(self, comm, status, views) -> None:
        """After the deadline, keep results that arrive within the grace period."""
        from mpi4py import MPI

        until = time.monotonic() + self.config.get("grace", 0.0)
        while self.copies and time.monotonic() < until:
            if (comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_RESULT, status=status)
                    or comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_ERROR, status=status)):
                self._receive(comm, status, views)
            elif self.recvs:
                self._complete_receives(views)
            else:
                time.sleep(POLL_MIN_S)

    def _end_of_work(self) -> None:
        self.end_time = time.monotonic()
        self.bar.clear()
        done = all(r == self.split.n_resolutions - 1 for r in self.tile_res.values())
        if done:
            self.stopped_by = "complete"
        elif self.deadline.signal is not None:  # SIGTERM/SIGINT/SIGUSR1 (run_guard.StopSignals)
            self.stopped_by = "signal"
        elif self.deadline.expired() or not self.lost_ranks:
            self.stopped_by = "deadline"
        else:
            self.stopped_by = "workers-lost"

    def close(self) -> list:
        """Publish the final state with every rank's statistics (/ranks); remove scratch files."""
        rows = [self.stats.finish()] + sorted(self.rank_rows, key=lambda row: row["rank"])
        self.store.close(self.final_attrs, self.timeline, {"ranks": rows})
        self.acc.close()
        return rows

    # ------------------------------------------------------------------ stopping workers

    def stop_workers(self, timeout: float | None = None) -> bool:
        """Tell every worker to stop and wait for each acknowledgement, discarding results that
        were still on their way. The wait is bounded: a worker gets until it has been silent for
        :meth:`lost_after` seconds (at least ``STOP_MIN_S`` from now), one already lost only
        ``STOP_LOST_S``, and after a complete run (published before the stop if any worker still
        owed answers) every worker ``STOP_MIN_S``; ``timeout`` caps it. False if some worker did not answer: its sends may
        never complete, so the caller must end the MPI job with ``MPI_Abort`` (after publishing)."""
        from mpi4py import MPI

        comm = self.comm
        size = comm.Get_size()
        now = time.monotonic()
        views = {view.rank: view for view in self.views}
        until = {}
        for rank in range(1, size):
            self.sends.append(([comm.isend(None, dest=rank, tag=TAG_STOP)], []))
            view = views.get(rank)
            if view is None:  # stopped before the run started
                until[rank] = now + STOP_MIN_S
            elif view.lost:
                until[rank] = now + STOP_LOST_S
            elif self.stopped_by == "complete":  # all is published: what it owes is not needed
                until[rank] = now + STOP_MIN_S
            else:
                until[rank] = max(now + min(STOP_MIN_S, self.lost_after()), view.owes_since + self.lost_after())
            if timeout is not None:
                until[rank] = min(until[rank], now + timeout)
        waiting = set(range(1, size))
        status = MPI.Status()
        while waiting and time.monotonic() < max(until[rank] for rank in waiting):
            if not comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status):
                time.sleep(POLL_MIN_S * 10)
                continue
            source, tag = status.Get_source(), status.Get_tag()
            if tag == TAG_STOPPED:
                self.rank_rows.append(comm.recv(source=source, tag=TAG_STOPPED))
                waiting.discard(source)
            elif tag == TAG_RESULT:  # a result (or a cancelled copy's answer) nobody needs now
                info = comm.recv(source=source, tag=TAG_RESULT)
                if info.get("cancelled") or "summary" in info:  # no tile follows
                    continue
                comm.Recv(np.empty(self.result_shape(self.jobs[info["id"]]), np.dtype(info["dtype"])),
                          source=source, tag=TAG_TILE)
            else:
                comm.recv(source=source, tag=tag)
        if not waiting:  # every worker drained its jobs, so every send has completed
            MPI.Request.Waitall([r for reqs, _ in self.sends for r in reqs] + [item[0] for item in self.recvs])
            self.sends, self.recvs = [], []
        self.unanswered = sorted(waiting)
        return not waiting


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
