"""Streaming layered products: a fixed A times a stream of items X_1, X_2, ..., each with a deadline.

Rank 0 runs :class:`StreamPhase`, the *stream policy* of the scheduling engine (mpi/engine.py:
queues, flow control, re-issue of stragglers' jobs, lost workers, stopping); the workers run
the unchanged ``worker_run`` of worker.py, so a mini-job is the usual header ``{"id", "r",
"a", "b", "components", "evict"}``: all terms of resolution ``r`` for the A block
``("A", ti, pi)`` and the item's B block ``("B", t, tj, pi)``.

* **A stays resident.** Before the stream's clock starts, every worker receives, in one
  preload message (the engine's preload step), every component of the A blocks it may use
  (all of A, or its share of tile rows when all of A does not fit in its memory budget); A is
  never sent again. Items' blocks travel with their jobs, each component of a block at most
  once per worker, and are evicted (``evict`` in a later header) once the item is closed.
  ``bytes_sent`` per item counts only its own components.
* **Arrivals and deadlines.** Item t arrives ``t / rate`` seconds after the stream starts (all
  at the start without a rate) and is read from HDF5 and quantised when it arrives; its
  deadline is its arrival plus ``deadline`` seconds.
* **Scheduling.** Jobs are (item, tile, k-panel, resolution). Open items are served earliest
  deadline first, each in resolution order (every tile's r before any tile's r+1); among the
  first jobs of that resolution a worker gets the one needing the fewest new bytes. Workers
  keep a short queue (at least two jobs, about engine.QUEUE_S seconds), and a job is sent only if
  the measured job times say the worker can finish it by its item's deadline, so hopeless
  refinements do not delay the next items' first resolutions.
* **Deadlines.** When an item's deadline passes, its pending jobs are dropped, results still
  on their way are discarded, and its result is every tile's best resolution with its
  certified bound (item bound = max over tiles). ``met`` means every tile had at least its
  first resolution by the deadline. An item whose every tile is exact closes at once.
* **Stragglers.** A job of an open item that is out for long (a slow or hung worker's) is
  copied to another worker once no unsent job of a lower resolution of that item is left,
  the earliest-deadline item first; a worker silent for ``--worker-timeout`` is lost and its
  jobs are pending again (the engine's re-issue and lost workers).
* **Sleep-wait.** The master polls with a backoff of 50 us to 2 ms, never past the next
  arrival or deadline, and runs at a lower CPU priority, so it does not take a worker's core.

With one rank, rank 0 computes the jobs itself, one at a time, through the worker code.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from collections import deque
from dataclasses import dataclass, field

import h5py
import numpy as np

from mpilayer.core.components import ComponentSplit
from mpilayer.core.estimates import SideStats, shifted, zero_points_of
from mpilayer.core.layered import relative_error_estimate
from mpilayer.core.partition import TileGrid
from mpilayer.core.products import kernel_summary, predicted_seconds, resolution_terms
from mpilayer.core.quantization import integer_range_error, quantize_real_block, real_scale, storage_dtype
from mpilayer.core.tile_progress import PanelSums, tile_report
from mpilayer.core.wire_format import encode_component
from mpilayer.errors import InputError, OutputError, one_line
from mpilayer.io.h5io import _dtype_problem, _open_input, check_finite, check_output_path, open_h5, parse_dataset_spec
from mpilayer.io.operand_readers import OperandReader
from mpilayer.mpi.engine import Engine, Policy, WorkerView
from mpilayer.mpi.rank_stats import RankStats

LOOKAHEAD = 32          # pending jobs of one (item, resolution) considered for a worker
BLOCK_FOOTPRINT = 4     # a worker's block with its planes and digits, in multiples of its values
PUBLISH_COST_FACTOR = 20   # publishes at most once per 20x the last one's duration (<= ~5% of the time)

OPEN, COMPLETE, DEADLINE = 0, 1, 2   # item states, as in /items "state"

ITEM_DTYPE = np.dtype([
    ("item", "i8"), ("arrival_s", "f8"), ("deadline_s", "f8"), ("finished_s", "f8"),
    ("first_latency_s", "f8"), ("latency_s", "f8"), ("resolution", "i2"), ("resolutions_total", "i2"),
    ("error_bound", "f8"), ("met", "?"), ("state", "i1"), ("bytes_sent", "i8"), ("error", "f8"),
    ("error_estimate", "f8"),  # statistical relative Frobenius error (estimates.py); NaN: a tile missing
])


# --------------------------------------------------------------------------- the stream input

class StreamSource:
    """The items: an HDF5 dataset of shape (T, K, B) (T matrices K x B) or (T, K) (T vectors),
    read one item at a time. Errors name the file, dataset and item."""

    def __init__(self, spec: str, chunk_cache_bytes: int = 16 * 2**20):
        path, dataset = parse_dataset_spec(spec)
        self.path, self.dataset = path, dataset
        self.label = f"{path}:{dataset}"
        self._file = _open_input(path, self.label, chunk_cache_bytes)
        try:
            obj = self._file.get(dataset)
            if obj is None:
                raise InputError(f"{self.label}: no such dataset in {path}")
            if not isinstance(obj, h5py.Dataset):
                raise InputError(f"{self.label}: is a group, not a dataset")
            shape = obj.shape
            if shape is None or len(shape) not in (2, 3):
                dims = "no dataspace" if shape is None else f"shape {tuple(shape)}"
                raise InputError(f"{self.label}: expected a stream of items of shape (T, K, B) or (T, K), "
                                 f"found {dims}")
            if 0 in shape:
                raise InputError(f"{self.label}: the stream is empty (shape {tuple(shape)})")
            problem = _dtype_problem(obj.dtype)
            if problem:
                raise InputError(f"{self.label}: {problem}")
        except BaseException:
            self._file.close()
            raise
        self._ds = obj
        self.vector = len(shape) == 2
        self.n_items, self.k = int(shape[0]), int(shape[1])
        self.cols = 1 if self.vector else int(shape[2])
        self.dtype = obj.dtype.newbyteorder("=")
        self.is_integer = self.dtype.kind in "iu"

    def read(self, t: int) -> np.ndarray:
        """Item t as a C-contiguous K x B array (B = 1 for vectors)."""
        try:
            raw = np.asarray(self._ds[t], dtype=self.dtype)
        except (OSError, RuntimeError, ValueError, TypeError) as err:
            raise InputError(f"{self.label}: cannot read item {t} (corrupt or unreadable file? "
                             f"{one_line(err)})") from err
        return np.ascontiguousarray(raw.reshape(self.k, self.cols))

    def check(self, bits: int) -> None:
        """One pass over the items: NaN/Inf in real items, integers that do not fit ``bits``."""
        lo = hi = 0
        for t in range(self.n_items):
            raw = self.read(t)
            if not self.is_integer:
                try:
                    check_finite(raw, self.label)
                except InputError as err:
                    raise InputError(f"{err} of item {t}") from None
            elif raw.size:
                lo, hi = min(lo, int(raw.min())), max(hi, int(raw.max()))
        if self.is_integer:
            msg = integer_range_error(self.label, lo, hi, bits)
            if msg:
                raise InputError(msg + " (--bits)")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# --------------------------------------------------------------------------- master-side state

@dataclass
class Job:
    id: int
    item: int
    tile: tuple   # (ti, tj)
    panel: int
    r: int

    @property
    def a_key(self) -> tuple:
        return ("A", self.tile[0], self.panel)

    @property
    def b_key(self) -> tuple:
        return ("B", self.item, self.tile[1], self.panel)


@dataclass
class StreamView(WorkerView):
    """The engine's view of a worker (``held``: item B key -> components), with what the stream
    policy tracks: the A it holds, the item blocks to evict."""

    tile_rows: set | None = None                     # tile rows whose A blocks it holds (None: all)
    evict: list = field(default_factory=list)        # keys to evict with the next job
    last_done: float = 0.0                           # time.monotonic() of its last result

    def may_run(self, job: Job) -> bool:
        return self.tile_rows is None or job.tile[0] in self.tile_rows


class Item:
    """One item in flight on the master: its quantised blocks, pending jobs and tile results."""

    def __init__(self, index: int, arrival: float, deadline: float, q: np.ndarray, scale, stats: SideStats,
                 n_panels: int):
        self.index, self.arrival, self.deadline = index, arrival, deadline
        self.q, self.scale, self.stats = q, scale, stats  # q: less its zero points (estimates.py)
        self.pending = deque()
        self.tile_res, self.tile_bound = {}, {}
        self.panel_sums, self.acc = PanelSums(n_panels), {}
        self.encoded = {}
        self.holders = {}     # rank -> set of B keys sent there
        self.bytes_sent = 0
        self.state = OPEN
        self.first_s = math.nan     # stream time when every tile had a resolution
        self.reached_s = math.nan   # stream time of the last tile update kept
        self.finished_s = math.nan


class StreamPhase(Policy):
    """One pass over the stream with one component split (layered, or one-shot: one component):
    the stream policy of the engine (engine.py).

    ``output`` is a :class:`StreamOutput`; its group ``group`` receives the estimates, tile maps
    and the /items table, published after closed items (see :meth:`_maybe_publish`). ``config``:
    the engine's (``reissue``, ``worker_timeout``, ``service_time``, ``seed``).
    """

    def __init__(self, comm, split: ComponentSplit, a: OperandReader, source: StreamSource, grid: TileGrid,
                 output, group: str, rate: float | None, deadline: float | None, scale_mode: str,
                 memory: int, log=print, quiet: bool = False, config: dict | None = None):
        self.comm, self.split, self.a, self.source, self.grid = comm, split, a, source, grid
        self.output, self.group = output, group
        self.rate, self.deadline_s = rate, deadline
        self.scale_mode, self.memory, self.log, self.quiet = scale_mode, memory, log, quiet
        self.real = a.is_real or not source.is_integer
        self.mode = "one-shot" if group == "one_shot" else "layered"
        self.n_res = split.n_resolutions
        self.tiles = grid.tiles()
        self.n_panels = len(grid.k_panels)
        self.items = {}            # open items by index
        self.next_item = 0
        self.next_id = 0
        self.jobs = {}             # job id -> Job, of every job sent
        self.table = np.zeros(source.n_items, dtype=ITEM_DTYPE)
        self.table["item"] = np.arange(source.n_items)
        self.table["arrival_s"] = [self.arrival(t) for t in range(source.n_items)]
        self.table["deadline_s"] = [self.arrival(t) + (math.inf if deadline is None else deadline)
                                    for t in range(source.n_items)]
        for name in ("finished_s", "first_latency_s", "latency_s", "error"):
            self.table[name] = math.nan
        self.table["resolution"] = -1
        self.table["resolutions_total"] = self.n_res
        self.table["error_bound"] = math.inf
        self.job_s = {r: predicted_seconds(resolution_terms(split, r), grid.tile_rows, grid.tile_cols, grid.k_panel)
                      for r in range(self.n_res)}
        self.stats = RankStats(0, "master")
        self.job_time = dict(self.job_s)   # measured seconds per job of each resolution (EWMA)
        self.last_decay = 0.0
        self.a_bytes = {}          # worker rank -> bytes of A preloaded there
        self.preload_s = 0.0
        self.closed_since_publish = 0
        self.t0 = None
        self.wasted_jobs = 0       # results discarded because their item had closed
        self.publishes, self.publish_s = 0, 0.0
        self.next_publish = 0.0    # time.monotonic() before which no publish starts
        self.plan = None           # tile rows of A per worker (preload_plan), None: all of A everywhere
        self.engine = Engine(comm, self, {**(config or {}), "master_nice": 0}, memory, None, self.stats, log)

    # ------------------------------------------------------------------ time

    def arrival(self, t: int) -> float:
        return 0.0 if not self.rate else t / self.rate

    def now(self) -> float:
        return time.monotonic() - self.t0

    # ------------------------------------------------------------------ items

    def _open_arrived(self) -> bool:
        """Open every item that has arrived; True if any did."""
        opened = False
        while self.next_item < self.source.n_items and self.arrival(self.next_item) <= self.now():
            t = self.next_item
            self.next_item += 1
            with self.stats.timing("io"):
                self.items[t] = self._make_item(t)
            opened = True
        return opened

    def _make_item(self, t: int) -> Item:
        raw = self.source.read(t)
        bits = self.split.bits
        scale = None
        if self.source.is_integer:
            q = np.ascontiguousarray(raw, dtype=storage_dtype(bits))
        else:
            scale = real_scale(raw, bits, 1 if self.scale_mode == "axis" else None, f"item {t}")
            q = quantize_real_block(raw, scale[None, :] if np.ndim(scale) else scale, bits)
        zero = zero_points_of(q, bits, 0, raw, scale)
        q = shifted(q, zero, 0)
        stats = SideStats(self.split, zero, raw.shape[0])
        stats.add(q.T)
        item = Item(t, self.arrival(t), float(self.table["deadline_s"][t]), q, scale, stats, self.n_panels)
        for tile in self.tiles:
            item.tile_res[tile], item.tile_bound[tile] = -1, math.inf
        for r in range(self.n_res):
            for tile in self.tiles:
                for panel in range(self.n_panels):
                    item.pending.append(Job(-1, t, tile, panel, r))
        return item

    def _open_in_order(self) -> list:
        return sorted(self.items.values(), key=lambda it: (it.deadline, it.index))

    def _expire(self) -> bool:
        """Close every open item whose deadline has passed."""
        now = self.now()
        late = [it for it in self.items.values() if it.deadline <= now]
        for item in late:
            self._close(item, DEADLINE)
        return bool(late)

    def _close(self, item: Item, state: int) -> None:
        item.state = state
        item.finished_s = self.now()
        item.pending.clear()
        del self.items[item.index]
        for rank, keys in item.holders.items():
            view = self.engine.views[rank]
            for key in keys:
                if key in view.held:
                    del view.held[key]
                    view.evict.append(key)
        self._record(item)
        self.closed_since_publish += 1

    def _record(self, item: Item) -> None:
        rows, cols = self.grid.row_blocks, self.grid.col_blocks
        est = np.zeros((self.grid.m, self.grid.n), dtype=np.float64 if self.real else np.int64)
        res_map = np.full(self.grid.shape, -1, dtype=np.int16)
        bound_map = np.full(self.grid.shape, np.inf)
        var_sum = est_sq = 0.0
        for tile in self.tiles:
            r = item.tile_res[tile]
            res_map[tile] = r
            bound_map[tile] = item.tile_bound[tile]
            if r >= 0:
                tile_est, _, tile_var, tile_sq = self._tile_report(item, tile)
                est[rows[tile[0]], cols[tile[1]]] = tile_est
                var_sum, est_sq = var_sum + tile_var, est_sq + tile_sq
        with self.stats.timing("io"):
            self.output.write_item(self.group, item.index, est, res_map, bound_map)
        row = self.table[item.index]
        resolution = int(res_map.min())
        row["finished_s"] = item.finished_s
        row["first_latency_s"] = item.first_s - item.arrival
        row["latency_s"] = item.reached_s - item.arrival if resolution >= 0 else math.nan
        row["resolution"] = resolution
        row["error_bound"] = float(bound_map.max())
        row["error_estimate"] = relative_error_estimate(var_sum, est_sq) if resolution >= 0 else math.nan
        row["met"] = resolution >= 0
        row["state"] = item.state
        row["bytes_sent"] = item.bytes_sent
        self.table[item.index] = row
        if not self.quiet:
            how = ("exact" if resolution == self.n_res - 1 else
                   f"bound {row['error_bound']:.4g}, estimated relative error {row['error_estimate']:.3g}"
                   if resolution >= 0 else "no result")
            self.log(f"  {self.mode} item {item.index}: resolution {resolution} of 0..{self.n_res - 1} "
                     f"({how}) {'met' if row['met'] else 'MISSED'} deadline, latency "
                     f"{row['latency_s'] * 1e3:.1f} ms, {item.bytes_sent} bytes")

    # ------------------------------------------------------------------ scales and bounds

    def _tile_scales(self, item: Item, tile):
        rows, cols = self.grid.row_blocks[tile[0]], self.grid.col_blocks[tile[1]]
        sa = self.a.scale_vector(rows)
        sb = None
        if item.scale is not None:
            sb = np.ascontiguousarray(np.broadcast_to(item.scale, (self.grid.n,))[cols], dtype=np.float64)
        if sa is None and sb is None:
            return None, None
        return (sa if sa is not None else np.ones(rows.stop - rows.start),
                sb if sb is not None else np.ones(cols.stop - cols.start))

    def _tile_report(self, item: Item, tile, keep: bool = True):
        """``(estimate, bound, var_sum, |estimate|^2)`` of a tile at its resolution (tile_progress)."""
        rows, cols = self.grid.row_blocks[tile[0]], self.grid.col_blocks[tile[1]]
        return tile_report(item.tile_res[tile], item.acc[tile], self.a.stats, item.stats, rows, cols,
                           *self._tile_scales(item, tile), keep=keep)

    # ------------------------------------------------------------------ results

    def add_result(self, job: Job, tile: np.ndarray) -> None:
        """Fold one increment into its item, unless the item closed (or its deadline passed)."""
        item = self.items.get(job.item)
        if item is not None and item.deadline <= self.now():
            self._close(item, DEADLINE)
            item = None
        if item is None:
            self.wasted_jobs += 1
            return
        item.panel_sums.add((job.tile, job.r), tile)
        self._advance(item, job.tile)
        if all(r == self.n_res - 1 for r in item.tile_res.values()):
            self._close(item, COMPLETE)

    def _advance(self, item: Item, tile) -> None:
        while True:
            r = item.tile_res[tile] + 1
            if r >= self.n_res or not item.panel_sums.complete((tile, r)):
                return
            inc = item.panel_sums.pop((tile, r))
            item.acc[tile] = inc if r == 0 else item.acc[tile] + inc
            item.tile_res[tile] = r
            item.tile_bound[tile] = self._tile_report(item, tile, keep=False)[1]
            item.reached_s = self.now()
            if r == 0 and math.isnan(item.first_s) and min(item.tile_res.values()) >= 0:
                item.first_s = item.reached_s

    # ------------------------------------------------------------------ choosing and sending jobs

    def _block_shape(self, job: Job) -> tuple:
        panel, cols = self.grid.k_panels[job.panel], self.grid.col_blocks[job.tile[1]]
        return panel.stop - panel.start, cols.stop - cols.start

    def _missing(self, view: StreamView, job: Job) -> list:
        have = view.held.get(job.b_key, ())
        return [c for c in range(job.r + 1) if c not in have]

    def next_job(self, view: StreamView):
        """Earliest-deadline item first, its lowest pending resolution; among the first
        ``LOOKAHEAD`` such jobs the worker may run, the one needing the fewest new bits.

        A job is only sent if, from the measured job times, the worker should finish it (after
        its queue) by the item's deadline; otherwise the item is passed over for now, so that
        hopeless refinements do not delay the next items' first resolutions."""
        start = self.now() + view.queued_s
        for item in self._open_in_order():
            best, best_cost, group, seen = None, None, None, 0
            for job in item.pending:
                if not view.may_run(job):
                    continue
                if group is None:
                    group = job.r
                    if start + self.job_time[group] > item.deadline:
                        now = time.monotonic()
                        if not view.queue and now > self.last_decay + 0.01:
                            self.job_time[group] *= 0.98  # idle: let a stale, too high estimate
                            self.last_decay = now         # decay (halves in about 0.35 s)
                        break
                elif job.r != group or seen >= LOOKAHEAD:
                    break
                seen += 1
                rows, cols = self._block_shape(job)
                cost = sum(rows * cols * self.split.widths[c] for c in self._missing(view, job))
                if best is None or cost < best_cost:
                    best, best_cost = job, cost
                    if cost == 0:
                        break
            if best is not None:
                item.pending.remove(best)
                if best.id < 0:  # (a lost worker's job, pending again, keeps its id)
                    best.id = self.next_id
                    self.next_id += 1
                    self.jobs[best.id] = best
                return best
        return None

    def job_message(self, view: StreamView, job: Job) -> tuple:
        item = self.items[job.item]
        components, payloads = [], []
        shape = self._block_shape(job)
        for comp in self._missing(view, job):
            buf = self._encoded(item, job, comp)
            components.append((job.b_key, shape, comp))
            payloads.append(buf)
            item.bytes_sent += buf.nbytes
            view.held.setdefault(job.b_key, set()).add(comp)
        item.holders.setdefault(view.rank, set()).add(job.b_key)
        header = {"id": job.id, "r": job.r, "a": job.a_key, "b": job.b_key,
                  "components": components, "evict": view.evict}
        view.evict = []
        return header, payloads

    def _encoded(self, item: Item, job: Job, comp: int) -> np.ndarray:
        key = (job.tile[1], job.panel, comp)
        buf = item.encoded.get(key)
        if buf is None:
            panel, cols = self.grid.k_panels[job.panel], self.grid.col_blocks[job.tile[1]]
            block = np.ascontiguousarray(item.q[panel, cols])
            buf = item.encoded[key] = encode_component(block, self.split.component(comp))
        return buf

    def _measured(self, view: StreamView, job: Job, sent: float | None) -> None:
        """Update the job-time estimate of ``job.r`` from the time its result took to come in
        (counted from its sending or the worker's previous result, whichever is later)."""
        now = time.monotonic()
        took = now - max(sent or 0.0, view.last_done)
        view.last_done = now
        self.job_time[job.r] = 0.7 * self.job_time[job.r] + 0.3 * took

    # ------------------------------------------------------------------ A, resident

    def preload_plan(self, n_workers: int) -> list:
        """Tile rows whose A blocks each worker holds: all of them when A fits in a worker's
        budget (memory/2, blocks with their planes and digits), else a round-robin share."""
        n_rows = len(self.grid.row_blocks)
        itemsize = storage_dtype(self.split.bits)().itemsize
        footprint = BLOCK_FOOTPRINT * self.grid.m * self.grid.k * itemsize
        budget = self.memory // 2
        if footprint <= budget or n_workers <= 1:
            share = None
        else:
            if footprint / min(n_workers, n_rows) > budget:
                raise InputError(f"{self.a.source.label}: A ({self.grid.m}x{self.grid.k}) needs about "
                                 f"{footprint / 2**20:.0f} MiB resident on the workers, more than their "
                                 f"--memory budget allows even split over {n_workers} worker(s)")
            share = [set(range(w, n_rows, n_workers)) for w in range(n_workers)]
        if share is None:
            return [None] * n_workers
        return share

    def _preload_message(self, tile_rows) -> tuple:
        """The preload message (engine.py) of every component of the A blocks of ``tile_rows``
        (None: all)."""
        components, payloads = [], []
        rows = range(len(self.grid.row_blocks)) if tile_rows is None else sorted(tile_rows)
        for ti in rows:
            for pi in range(self.n_panels):
                for comp in range(self.n_res):
                    buf = self.a.encoded(ti, pi, comp)
                    components.append((("A", ti, pi), self.a.block_shape(ti, pi), comp))
                    payloads.append(buf)
        return {"id": -1, "preload": True, "components": components, "evict": []}, payloads

    # ------------------------------------------------------------------ engine hooks (engine.py)

    def new_view(self, rank: int) -> StreamView:
        return StreamView(rank, tile_rows=self.plan[rank - 1] if self.plan is not None and rank > 0 else None)

    def preload(self, view: StreamView) -> tuple:
        header, payloads = self._preload_message(view.tile_rows)
        self.a_bytes[view.rank] = sum(p.nbytes for p in payloads)
        return header, payloads

    def started(self) -> None:
        """A is resident on the workers: the stream's clock starts."""
        self.preload_s = time.monotonic() - self.preload_start
        self.t0 = time.monotonic()

    def tick(self) -> bool:
        opened = self._open_arrived()
        return self._expire() or opened

    def job(self, jid: int) -> Job:
        return self.jobs[jid]

    def job_seconds(self, job: Job) -> float:
        return self.job_time[job.r]

    def result_shape(self, job: Job) -> tuple:
        rows, cols = self.grid.row_blocks[job.tile[0]], self.grid.col_blocks[job.tile[1]]
        return rows.stop - rows.start, cols.stop - cols.start

    def reissue_order(self, view: StreamView):
        """Copies of an open item's jobs once no unsent job of a lower resolution of that item
        is left, the earliest-deadline item first; only to a worker holding the job's A block."""
        def key(jid: int):
            job = self.jobs[jid]
            item = self.items.get(job.item)
            if item is None or not view.may_run(job):
                return None
            head_r = item.pending[0].r if item.pending else self.n_res
            return (item.deadline, item.index, job.r) if job.r < head_r else None
        return key

    def requeue(self, jobs: list) -> None:
        """A lost worker's jobs: pending again in their open items, in resolution order."""
        for job in jobs:
            item = self.items.get(job.item)
            if item is not None:
                item.pending.append(job)
        for item in self.items.values():
            item.pending = deque(sorted(item.pending, key=lambda j: (j.r, j.tile, j.panel)))

    def result(self, view: StreamView, job: Job, info: dict, tile, sent) -> None:
        self._measured(view, job, sent)
        self.add_result(job, tile)

    def after_pass(self) -> None:
        self._maybe_publish()

    def finished(self) -> bool:
        return self.next_item >= self.source.n_items and not self.items

    def next_event_s(self) -> float:
        return self._next_event() - self.now()

    # ------------------------------------------------------------------ the pass

    def run(self) -> dict:
        """Serve the whole stream; returns the phase's summary. Items still open when the engine
        stops early (every worker lost) close with what they have."""
        size = self.comm.Get_size() if self.comm is not None else 1
        if size > 1:
            self.plan = self.preload_plan(size - 1)
        self.preload_start = time.monotonic()
        self.engine.run()
        self.end_s = self.now()
        for item in list(self.items.values()):
            self._close(item, DEADLINE)
        self.output.set_table(self.group, self.table, self.attrs())
        self.output.publish()
        return self.summary()

    def _next_event(self) -> float:
        """Stream time of the next arrival or deadline."""
        times = [it.deadline for it in self.items.values()]
        if self.closed_since_publish:
            times.append(self.next_publish - self.t0)
        if self.next_item < self.source.n_items:
            times.append(self.arrival(self.next_item))
        return min(times) if times else math.inf

    def _maybe_publish(self) -> None:
        """Publish the items closed since the last publish, unless the last publish was less than
        ``PUBLISH_COST_FACTOR`` times its own duration ago (then as soon as that has passed):
        copying the whole file per item would otherwise take most of the master's time on large
        outputs (measured: 75-90% with 60 MB), starving the workers."""
        if self.closed_since_publish and time.monotonic() >= self.next_publish:
            self.closed_since_publish = 0
            self.output.set_table(self.group, self.table, self.attrs())
            t = time.perf_counter()
            with self.stats.timing("io"):
                self.output.publish()
            took = time.perf_counter() - t
            self.publish_s += took
            self.publishes += 1
            self.next_publish = time.monotonic() + PUBLISH_COST_FACTOR * took

    # ------------------------------------------------------------------ summary

    def attrs(self) -> dict:
        return {
            "mode": self.mode,
            "component_bits": np.array(self.split.widths, dtype=np.int64),
            "resolutions_total": self.n_res,
            "items_closed": int((self.table["state"] != OPEN).sum()),
            "a_bytes_per_worker": np.array([self.a_bytes[r] for r in sorted(self.a_bytes)], dtype=np.int64),
            "preload_s": self.preload_s,
            "wasted_jobs": self.wasted_jobs,
            "publishes": self.publishes,
            "master_io_s": self.stats.io_s, "master_publish_s": self.publish_s,
            "master_idle_s": self.stats.idle_s, "master_comm_s": self.stats.comm_s,
            "kernels": kernel_summary(self.engine.kernels),
            "job_s_measured": np.array([self.job_time[r] for r in range(self.n_res)]),
            **self.engine.counts,  # re-issued and re-queued jobs (engine.py)
            "lost_ranks": ",".join(map(str, sorted(set(self.engine.lost_ranks)))) or "none",
        }

    def summary(self) -> dict:
        tab = self.table
        return {"group": self.group, "table": tab, "end_s": getattr(self, "end_s", math.nan),
                "n_res": self.n_res, **self.attrs()}


# --------------------------------------------------------------------------- output

class StreamOutput:
    """The result file: a working HDF5 next to the output, copied and ``os.replace``\\ d onto it
    at every publish, so the output is always a complete file.

    Layout (group ``""`` is the main, layered pass; ``"one_shot"`` the comparison pass)::

        <group>/estimates         (T, M, B) or (T, M) for vector items: each item's best estimate
        <group>/tile_resolution   (T, tile rows, tile cols) int16, -1 = none
        <group>/tile_error_bound  (T, tile rows, tile cols) float64, inf = none
        <group>/items             one row per item (ITEM_DTYPE)
        /comparison               with --compare one-shot: one row per mode
    """

    def __init__(self, path: str, force: bool, attrs: dict):
        self.path = os.path.abspath(path)
        directory, name = os.path.split(self.path)
        check_output_path(path, force)
        self.work_path = os.path.join(directory, f".{name}.work.h5")
        self.tmp_path = os.path.join(directory, f".{name}.tmp-{os.getpid()}.h5")
        try:
            self._file = open_h5(self.work_path, "w")
        except OSError as err:
            raise OutputError(f"cannot create working file {self.work_path}: {one_line(err)}") from err
        if force and os.path.lexists(self.path):
            os.remove(self.path)
        self.attrs = dict(attrs)
        self.tables = {}       # group -> (table, attrs)
        self.extra = {}        # dataset name -> structured array
        self.publishes = 0

    def create_group(self, group: str, n_items: int, m: int, cols: int, vector: bool, real: bool,
                     grid_shape: tuple) -> None:
        g = self._file.require_group(group or "/")
        shape = (n_items, m) if vector else (n_items, m, cols)
        chunk = (1, m) if vector else (1, m, cols)
        g.create_dataset("estimates", shape=shape, dtype=np.float64 if real else np.int64,
                         chunks=chunk, fillvalue=0)
        g.create_dataset("tile_resolution", shape=(n_items, *grid_shape), dtype=np.int16, fillvalue=-1)
        g.create_dataset("tile_error_bound", shape=(n_items, *grid_shape), dtype=np.float64, fillvalue=np.inf)

    def write_item(self, group: str, t: int, estimate: np.ndarray, res_map, bound_map) -> None:
        g = self._file[group or "/"]
        ds = g["estimates"]
        ds[t] = estimate.reshape(ds.shape[1:])
        g["tile_resolution"][t] = res_map
        g["tile_error_bound"][t] = bound_map

    def set_table(self, group: str, table: np.ndarray, attrs: dict) -> None:
        self.tables[group] = (table.copy(), dict(attrs))

    def publish(self, durable: bool = False) -> None:
        try:
            self._file.close()
            shutil.copyfile(self.work_path, self.tmp_path)
            with open_h5(self.tmp_path, "r+") as f:
                for key, value in self.attrs.items():
                    f.attrs[key] = value
                f.attrs["publish_seq"] = self.publishes + 1
                for group, (table, attrs) in self.tables.items():
                    g = f.require_group(group or "/")
                    g.create_dataset("items", data=table)
                    for key, value in attrs.items():
                        g["items"].attrs[key] = value
                for name, data in self.extra.items():
                    f.create_dataset(name, data=data)
            if durable:
                fd = os.open(self.tmp_path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.replace(self.tmp_path, self.path)
        except OSError as err:
            raise OutputError(f"cannot publish {self.path}: {one_line(err)}") from err
        finally:
            if os.path.exists(self.tmp_path):
                os.remove(self.tmp_path)
            self._file = open_h5(self.work_path, "r+")
        self.publishes += 1

    def read_estimates(self, group: str, t: int) -> np.ndarray:
        return self._file[group or "/"]["estimates"][t]

    def close(self) -> None:
        """The final, durable publish; removes the working file."""
        self.publish(durable=True)
        self.discard()

    def discard(self) -> None:
        """Remove the scratch files (the published output, if any, stays)."""
        try:
            if self._file:
                self._file.close()
        except Exception:  # noqa: BLE001 - best effort on the error path
            pass
        for path in (self.work_path, self.tmp_path):
            if os.path.exists(path):
                os.remove(path)


# --------------------------------------------------------------------------- errors and comparison

def reference_errors(a_source, source: StreamSource, output: StreamOutput, groups: list, real: bool) -> dict:
    """Per group, per item: ``max |reference - estimate|`` and ``max |reference|``, where the
    reference is the exact integer product (integer inputs, float64 BLAS when every partial sum
    is below 2**53, else int64) or the float64 product of the inputs (real inputs)."""
    A = a_source.read(slice(None), slice(None))
    exact_f64 = False
    if not real:
        amax = int(np.abs(A.astype(np.int64)).max())
        A_ref = A.astype(np.float64)
    else:
        A_ref = A.astype(np.float64)
    out = {g: (np.zeros(source.n_items), np.zeros(source.n_items)) for g in groups}
    for t in range(source.n_items):
        x = source.read(t)
        if real:
            ref = A_ref @ x.astype(np.float64)
        else:
            xmax = int(np.abs(x.astype(np.int64)).max())
            exact_f64 = amax * xmax * max(A.shape[1], 1) < 2**53
            ref = ((A_ref @ x.astype(np.float64)).astype(np.int64) if exact_f64
                   else A.astype(np.int64) @ x.astype(np.int64))
        for g in groups:
            est = output.read_estimates(g, t).reshape(ref.shape)
            err, scale = out[g]
            if real:
                err[t] = float(np.max(np.abs(ref - est))) if ref.size else 0.0
            else:
                err[t] = float(np.max(np.abs(ref - est.astype(np.int64)))) if ref.size else 0.0
            scale[t] = float(np.max(np.abs(ref))) if ref.size else 0.0
    return out


def bound_errors(phase_table: np.ndarray, a: OperandReader, source: StreamSource, bits: int) -> np.ndarray:
    """Per item, a certified bound of ``max |exact - estimate|`` without computing the exact
    product: the item's bound when every tile has a result, else (a tile missing, its estimate
    being zero) ``max_i sum_k |A_ik| * max |X_t|`` on top (quantised units, times scales)."""
    absrow = a.stats.full_norms()[0]  # sum_k |A_ik|, quantised
    sa = 1.0 if a.scale is None else float(np.max(a.scale))
    out = np.array(phase_table["error_bound"], dtype=np.float64)
    for t in np.nonzero(~np.isfinite(out))[0]:
        x = source.read(int(t)).astype(np.float64)
        out[t] = float(absrow.max()) * sa * float(np.abs(x).max()) * (1 + 1e-12)
    return out


COMPARISON_DTYPE = np.dtype([
    ("mode", "S8"), ("items", "i8"), ("usable", "i8"), ("usable_fraction", "f8"), ("exact", "i8"),
    ("mean_error", "f8"), ("mean_relative_error", "f8"), ("mean_latency_s", "f8"), ("stream_s", "f8"),
    ("throughput_items_per_s", "f8"), ("mean_bytes_per_item", "f8"),
])


def comparison_row(mode: str, table: np.ndarray, errors: np.ndarray, scales: np.ndarray | None) -> np.void:
    n = len(table)
    met = table["met"]
    stream_s = float(np.nanmax(table["finished_s"])) if n else 0.0
    row = np.zeros((), dtype=COMPARISON_DTYPE)
    row["mode"] = mode.encode()
    row["items"] = n
    row["usable"] = int(met.sum())
    row["usable_fraction"] = float(met.mean()) if n else 0.0
    row["exact"] = int((table["resolution"] == table["resolutions_total"] - 1).sum())
    row["mean_error"] = float(np.mean(errors)) if n else 0.0
    if scales is not None:
        rel = np.where(scales > 0, errors / np.where(scales > 0, scales, 1), 0.0)
        row["mean_relative_error"] = float(np.mean(rel)) if n else 0.0
    else:
        row["mean_relative_error"] = math.nan
    row["mean_latency_s"] = float(np.mean(table["latency_s"][met])) if met.any() else math.nan
    row["stream_s"] = stream_s
    row["throughput_items_per_s"] = row["usable"] / stream_s if stream_s > 0 else math.nan
    row["mean_bytes_per_item"] = float(np.mean(table["bytes_sent"])) if n else 0.0
    return row[()]


def format_comparison(rows: list, method: str) -> str:
    head = (f"{'mode':<9} {'items':>5} {'usable by deadline':>19} {'exact':>6} "
            f"{'mean error at deadline':>23} {'(relative)':>10} {'mean latency':>12} "
            f"{'throughput':>12} {'bytes/item':>11}")
    lines = [head]
    for r in rows:
        rel = "n/a" if math.isnan(r["mean_relative_error"]) else f"{r['mean_relative_error']:.4f}"
        lat = "n/a" if math.isnan(r["mean_latency_s"]) else f"{1e3 * r['mean_latency_s']:.1f} ms"
        lines.append(
            f"{r['mode'].decode():<9} {r['items']:>5} {r['usable']:>7}/{r['items']:<4} ({100 * r['usable_fraction']:3.0f}%)"
            f" {r['exact']:>6} {r['mean_error']:>23.6g} {rel:>10} {lat:>12} "
            f"{r['throughput_items_per_s']:>8.2f} it/s {r['mean_bytes_per_item']:>11.0f}")
    lines.append(f"error = max |reference - estimate| per item, estimate 0 where a tile has no result; "
                 f"{method}. throughput = items usable by their deadline / stream time.")
    return "\n".join(lines)
