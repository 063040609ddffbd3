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

At the deadline the engine stops handing out work, keeps what arrives within ``grace``
seconds, publishes the best resolution of every tile, and stops the workers. A stop signal
(SIGTERM, SIGINT, SIGUSR1; run_guard.StopSignals) expires the deadline at once
(``stopped_by = "signal"``).

Scheduling -- queues, flow control, re-issue of stragglers' jobs, lost workers, the deadline
and its grace, stopping the workers -- is the engine's (engine.py); this module is its *matmul
policy*: jobs in resolution order, the copies it allows (jobs of the resolutions below the next
pending one), what a result updates. *Coded redundancy* (``--code``, code_groups.py): each row
of a code group goes to a different worker; the group's first K results finish it (missing
ordinary results decoded exactly), and its other jobs are settled like answered ones
(``Engine.settle``: cancelled, or dropped unsent). After :meth:`Master.run`, the caller stops
the workers (``master.engine.stop_workers``) and ends the MPI job with ``MPI_Abort`` if some
did not answer (jobs/matmul.py).
"""
from __future__ import annotations

from collections import deque

import numpy as np

from mpilayer.core.components import ComponentSplit
from mpilayer.core.deadline import Deadline
from mpilayer.core.estimates import scaled_norms
from mpilayer.core.layered import relative_error_estimate
from mpilayer.core.partition import TileGrid
from mpilayer.core.products import (increment_bound, kernel_summary, predicted_seconds, resolution_terms,
                                    whole_is_cheaper)
from mpilayer.core.quantization import relative_error_estimate as quantization_relative_error
from mpilayer.core.tile_progress import PanelSums, tile_report
from mpilayer.io.distributed_store import part_path, published_run
from mpilayer.io.operand_readers import CodedOperand, OperandReader, tile_scales
from mpilayer.mpi.code_groups import CodeGroups
from mpilayer.mpi.engine import Engine, Policy
from mpilayer.mpi.mini_jobs import WHOLE_K, MatmulView, MiniJob, Progress, make_jobs
from mpilayer.mpi.progress import LINE_INTERVAL_S, ProgressBar
from mpilayer.mpi.protocol import POLL_MAX_S, POLL_MIN_S
from mpilayer.mpi.rank_stats import RankStats

LOOKAHEAD = 32        # pending jobs considered when choosing one for a worker
RESULTS_SHARE = 8     # results owed (receive buffers) at most memory/RESULTS_SHARE bytes, and partial
                      # k-panel sums of (tile, resolution) keys as many bytes (int64 tiles)
BLOCK_FOOTPRINT = 4   # a worker's block with its planes and digits, in multiples of its values
PUBLISHED_SHARE = 32  # estimates kept for the next publish: at most memory/PUBLISHED_SHARE bytes (64 MiB
                      # of 2G: C of n = 2896 in float64), within what the other shares leave (1/16
                      # measured: master 34-36.5 MiB above baseline at --memory 32M, over the +10%)
SUMMARY_POLL_S = (5e-3, 0.02)  # idle sleep of the loop when results are summaries (distributed): 3/4 of
SUMMARY_POLL_JOBS = 0.75       # the shortest job's estimate within these bounds, with no back-off (a
                               # summary comes in one small message). Each wake-up costs the master
                               # 30-80 us of CPU (they were most of it); each worker has >= 2 jobs queued
                               # (engine.QUEUE_S, prefetch), and a sleep never passes the deadline


class Master(Policy):
    """The matmul policy of rank 0's engine (engine.py). ``run()`` returns a summary dict."""

    def __init__(self, comm, config, a: OperandReader, b: OperandReader, grid: TileGrid,
                 split: ComponentSplit, store, deadline: Deadline, memory: int, log=print,
                 stats: RankStats | None = None, accumulators=None, bar: bool | None = None,
                 progress_every: float = LINE_INTERVAL_S):
        self.comm, self.config = comm, config
        self.a, self.b, self.grid, self.split = a, b, grid, split
        self.store, self.deadline, self.log = store, deadline, log
        self.setup_s = deadline.elapsed()  # start-up, input checks and the preparation pass
        self.code = config.get("code")  # coding.Code of --code, or None
        # tiles written by the workers that compute them (distributed_store.py): every job then
        # computes its tile's whole product T_A(r) T_B(r) over all of k (one k-panel, no --code)
        self.distributed = config.get("layout") == "distributed"
        self.coded = CodedOperand(a, self.code) if self.code else None
        # several k-panels: each job sums them on its worker (whole-k jobs; one k-panel: the
        # blocks are kept on the workers between resolutions, as master-sent ones are)
        self.whole_k = self.distributed and len(grid.k_panels) > 1
        self.jobs = make_jobs(grid, split, self.coded, whole_k=self.whole_k)
        self._needs = {}  # job id -> _need_bits, from its first weighing to its message
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
        self.timeline = []
        self.memory = memory
        self.stats = stats or RankStats(0, "master")
        self.setup_cpu_s = self.stats.finish()["cpu_s"]  # CPU of the set-up (mpilayer bench master)
        store.tile_source = self.tile_estimate
        self.bar = ProgressBar(len(self.tile_res), split.n_resolutions, enabled=bar, line_interval_s=progress_every)
        self.published = {}  # tile -> (resolution, estimate as published), within memory/PUBLISHED_SHARE
        self.published_bytes = 0
        self.service_time = config.get("service_time")  # ServiceTime of --service-time, or None
        if self.service_time is not None:  # the queue depth counts the emulated mean service time
            self.job_s = {r: s + self.service_time.shift + self.service_time.mean for r, s in self.job_s.items()}
        self.summaries = {}  # (tile, r) -> summary of a written tile not yet in order (distributed)
        self.tile_rank = {}  # tile -> the worker its last job went to (distributed)
        self.worker_reads = config.get("worker_reads", {})  # rank -> sides it reads itself (data_plane.py)
        poll = (POLL_MIN_S, POLL_MAX_S)
        if self.distributed and config.get("prefetch", 2) >= 2:
            longest = min(max(SUMMARY_POLL_JOBS * min(self.job_s.values()), SUMMARY_POLL_S[0]), SUMMARY_POLL_S[1])
            poll = (longest, longest)
        self.engine = Engine(comm, self, {**config, "poll": poll}, memory, deadline, self.stats, self._log_line)

    def setup_message(self, seed: int) -> dict:
        """The workers' set-up message of this run (protocol.send_setup)."""
        message = {"split": self.split, "service_time": self.service_time, "seed": seed, "last": True}
        if self.distributed:  # where the workers write; rank 1 removes stale parts of earlier runs
            message.update(parts=self.store.run_dir, output=self.store.path, published=published_run(self.store.path),
                           kept_bytes=self.worker_budget // 2)  # tile sums kept for the next increment
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
        never with ``--code`` (parity jobs combine increments), always with whole-k jobs (their
        worker keeps no sum), else where the cost model finds it cheaper
        (products.whole_is_cheaper). With a distributed result an increment is computed where
        the worker still holds the tile's sum at r-1 (worker.WorkerState.kept; the master sends
        the tile's jobs to the worker that had its last one, when it can), else the whole
        product. Same integers either way."""
        tr, tc, kp = self.grid.tile_rows, self.grid.tile_cols, min(self.grid.k_panel, max(self.grid.k, 1))
        return {r: r > 0 and (self.whole_k or (self.code is None and whole_is_cheaper(self.split, r, tr, tc, kp)))
                for r in range(self.split.n_resolutions)}

    # ------------------------------------------------------------------ engine hooks (engine.py)

    def new_view(self, rank: int) -> MatmulView:
        return MatmulView(rank, reads=self.worker_reads.get(rank, frozenset()))

    def job(self, jid: int) -> MiniJob:
        return self.jobs[jid]

    def next_event_s(self) -> float:
        """The deadline: an idle sleep never passes it."""
        return self.deadline.remaining()

    def job_seconds(self, job: MiniJob) -> float:
        return self.job_s[job.r]

    def may_queue(self, view: MatmulView) -> bool:
        """Receive buffers: every job out may hold a result tile (within memory/RESULTS_SHARE)."""
        return self.distributed or self._results_fit()

    def sent(self, view: MatmulView, job: MiniJob) -> None:
        if self.groups is not None:
            self.groups.assign(view.rank, job)
        if self.distributed:  # the worker that will hold the tile's sum (next_job prefers it)
            self.tile_rank[job.tile] = view.rank

    def reissue_order(self, view: MatmulView):
        """Resolution order first: only jobs of the resolutions below the next pending one are
        copied (no unsent job of theirs is left), the lowest first."""
        head = self._pending_head()
        head_r = self.jobs[head].r if head is not None else self.split.n_resolutions
        jobs = self.jobs
        return lambda jid: jobs[jid].r if jobs[jid].r < head_r else None

    def requeue(self, jobs: list) -> None:
        self.pending = deque(sorted(set(self.pending).union(job.id for job in jobs)))  # ids: resolution order

    def finished(self) -> bool:
        return self._pending_head() is None and not self.engine.copies

    def result(self, view: MatmulView, job: MiniJob, info: dict, tile, sent) -> None:
        """The first answer to ``job``: its result tile, or (``tile`` None) the summary of the
        tile its worker wrote (distributed_store.py)."""
        if tile is None:
            self.add_summary(job, info["summary"])
            return
        self.progress.bytes_received[job.r] += tile.nbytes
        if job.code_row < 0:
            self.add_result(job, tile)
        if self.groups is not None:
            self._record_coded(job, tile)

    def _record_coded(self, job: MiniJob, tile: np.ndarray) -> None:
        """Give a result to its code group; once the group has K results, fold in the decoded
        ordinary results and settle the group's other jobs."""
        finished = self.groups.record(job, tile)
        if finished is None:
            return
        decoded, unneeded = finished
        for other in unneeded:
            self.engine.settle(other, superseded=True)
        for missing, value in decoded:
            self.engine.settle(missing, superseded=True)
            self.add_result(missing, value)

    def _log_line(self, text: str) -> None:
        self.bar.clear()
        self.log(text)

    def _tile_bytes(self) -> int:
        return 8 * self.grid.tile_rows * self.grid.tile_cols

    def _results_fit(self) -> bool:
        """One more job's result fits: every job out may hold an (int64 at most) receive buffer."""
        owed = sum(len(view.queue) for view in self.engine.views.values())
        return (owed + 1) * self._tile_bytes() <= self.memory // RESULTS_SHARE

    def _sum_keys(self):
        """``(tile, r)`` keys with a partial k-panel sum on the master (or about to have one),
        and whether no new key fits in memory/RESULTS_SHARE; None when there are no panels to sum."""
        if len(self.grid.k_panels) < 2 or self.groups is not None or self.distributed:
            return None, False
        self.open_keys = {key for key in getattr(self, "open_keys", ()) if self.tile_res[key[0]] < key[1]}
        full = (len(self.open_keys) + 1) * self._tile_bytes() > self.memory // RESULTS_SHARE
        return self.open_keys, full

    def _missing(self, view: MatmulView, job: MiniJob) -> list:
        """``(key, component)`` pairs the worker lacks for ``job`` (none for a whole-k job: its
        worker reads the blocks as it goes)."""
        held = view.held
        return [(key, c) for key, c, _ in self._need_bits(job) if c not in held.get(key, ())]

    def _send_cost(self, view: MatmulView, job: MiniJob) -> int:
        """Bits the worker would be sent for ``job`` (or read itself, for an input it reads)."""
        held = view.held
        return sum(bits for key, c, bits in self._need_bits(job) if c not in held.get(key, ()))

    def _need_bits(self, job: MiniJob) -> list:
        """``(block key, component, bits on the wire)`` of every component ``job`` reads (none for a
        whole-k job), kept until the job's message is made (job_message): next_job weighs up to
        LOOKAHEAD pending jobs for every job, and reader lookups per weighing were most of its time."""
        need = self._needs.get(job.id)
        if need is None:
            need = []
            if job.panel != WHOLE_K:
                for key, comps in zip(job.keys(), job.needs()):
                    reader = self._reader(key)
                    rows, cols = reader.block_shape(key[1], key[2])
                    need.extend((key, c, rows * cols * reader.wire_bits(c)) for c in comps)
            self._needs[job.id] = need
        return need

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

    def next_job(self, view: MatmulView):
        """The next job for a worker: among the first pending jobs of the lowest resolution,
        the one needing the fewest new bits on that worker; with a distributed result, of a
        tile whose last job it had (it may hold the tile's sum) if there is one."""
        head = self._pending_head()
        if head is None:
            return None
        first_r = self.jobs[head].r
        best, best_cost = None, None
        seen = 0
        live = [v.rank for v in self.engine.views.values() if not v.lost] if self.groups is not None else None
        open_keys, full = self._sum_keys()
        jobs, done, tile_rank, rank = self.jobs, self.engine.done, self.tile_rank, view.rank
        for jid in self.pending:
            job = jobs[jid]
            if seen >= LOOKAHEAD or job.r != first_r:
                break
            if jid in done:  # settled while pending (removed lazily)
                continue
            if full and (job.tile, job.r) not in open_keys and open_keys:
                continue  # memory: finish the partial sums already open first
            if self.groups is not None and not self.groups.may_take(rank, job, live):
                continue  # each row of a code group on a different worker
            seen += 1
            # bits to send, then whether another worker had the tile's last job
            cost = (self._send_cost(view, job), tile_rank.get(job.tile, rank) != rank)
            if best is None or cost < best_cost:
                best, best_cost = jid, cost
                if cost == (0, False):
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
        while self.pending and self.pending[0] in self.engine.done:
            self.pending.popleft()
        return self.pending[0] if self.pending else None

    def _evictions(self, view: MatmulView, job: MiniJob) -> list:
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

    def job_message(self, view: MatmulView, job: MiniJob) -> tuple:
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
        self._needs.pop(job.id, None)
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
            "stopped_by": self.engine.stopped_by,
            "setup_s": self.setup_s,
            "setup_cpu_s": self.setup_cpu_s,
            "tiles_per_resolution": np.array(self.progress.tiles_at, dtype=np.int64),
        }

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict:
        """Hand out every job, or stop at the deadline; returns the summary of the run.

        Stopped by the deadline, or with workers still owing answers (stragglers, hung workers
        outvoted by a code), the result is published at once (before the workers are stopped,
        which may take a while, so it is saved first). Then stop the workers
        (``engine.stop_workers``) and call :meth:`close`.
        """
        self.engine.run()
        self.bar.clear()
        stopped_by = self.engine.stopped_by
        overshoot = self.engine.overshoot()
        attrs = self.attrs()
        attrs["overshoot_s"] = overshoot if overshoot is not None else 0.0
        attrs["kernels"] = kernel_summary(self.engine.kernels)
        attrs["accumulator_spills"] = self.acc.spills
        attrs.update(self.straggler_attrs())
        self.final_attrs = attrs
        owed = self.engine.owed()  # a silent worker may delay the stop
        empty = stopped_by == "signal" and max(self.tile_res.values()) < 0  # keep the previous output
        if not empty and (stopped_by in ("deadline", "signal", "workers-lost") or owed):
            with self.stats.timing("io"):  # durable at close(), once the workers synced their final parts
                self.store.publish(attrs, self.timeline, durable=not self.distributed)
        return {**attrs, "overshoot_s": overshoot, "timeline": self.timeline}

    def straggler_attrs(self) -> dict:
        """Attributes of /C on service-time emulation, re-issue and lost workers."""
        engine = self.engine
        return {"service_time": self.service_time.spec if self.service_time else "none",
                "reissue": bool(engine.reissue), "worker_timeout_s": float(engine.worker_timeout),
                **engine.counts, "lost_ranks": ",".join(map(str, sorted(set(engine.lost_ranks)))) or "none",
                "code": self.code.spec if self.code else "none",
                "parity_jobs": sum(job.code_row >= 0 for job in self.jobs),
                "parity_results": self.groups.parity_results if self.groups else 0,
                "decoded": self.groups.decoded if self.groups else 0}

    def close(self) -> list:
        """Publish the final state with every rank's statistics (/ranks); remove scratch files."""
        rows = [self.stats.finish()] + sorted(self.engine.rank_rows, key=lambda row: row["rank"])
        self.store.close(self.final_attrs, self.timeline, {"ranks": rows})
        self.acc.close()
        return rows


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
