"""``mpilayer deadline-experiment``: the paper's deadline experiment on real MPI ranks.

A stream of jobs arrives (Poisson, ``--rate`` jobs per second, seeded by ``--seed``). Job t is
a real small integer product ``A @ B_t`` (A: M x K int8, fixed; B_t: K x N int8, one per job;
both generated in memory from ``--seed``, nothing read from disk), run in two *modes* on the same
ranks, one after the other (layered first, then one-shot), with the same arrival times, the same
operands and the same service-time seed (every rank's generator is re-seeded with
``(seed, rank)`` at the start of each mode):

layered
    each operand is cut into m bit components of (nearly) equal width, ``--component-bits W``
    (W = 4, the default: m = 2, 4 + 4 bits; component 0 holds the sign bit and is signed, see components.py).
    Layer l holds the component pairs (i, j) with i + j = l, so there are 2m - 1 layers
    (m = 2: 1, 2 and 1 pairs of a quarter of the work each). A mini-job is one (job, component
    pair, row tile); ``--row-blocks T`` cuts A's rows into T blocks. Layer l of a job is *done* when
    every mini-job of layers <= l is done; then the sum of those pair products is the job's
    resolution-l estimate, and the sum over all layers is the exact product.
one-shot
    a single layer holding all the work: one mini-job per (job, row tile) computing the full
    product of the tile (the pair (0, 0) of a split with one 8-bit component).

The runs use the scheduling engine of every MPI job (mpi/engine.py) with :class:`ExperimentPolicy`;
the workers run worker.py's ``worker_run``, one pass per mode. A is resident: every component of
every row tile goes to each worker once, before the mode's clock starts (the engine's preload);
each component of B_t goes to a worker with its first mini-job that needs it, and is evicted once
the job is complete. A mini-job's header names its component pairs (``pairs``), which the worker
multiplies exactly with mpilayer's kernels, and its share s of the job's bit-products
(``service_share``: w_i * w_j / bits**2 times its share of the rows). The worker then *sleeps*
an emulated service time (no CPU burned, so many ranks fit on few cores): with ``--service-time
exp:MEAN``, MEAN is the mean service time of a *whole job* (all pairs, all tiles), and a mini-job
sleeps s x (a fresh draw of the model), so one-shot and layered carry the same expected total
work; with balanced components (m = 2) the layered total is exactly the one-shot work.
``shifted-exp`` and ``straggler`` clauses of service_time.py apply the same way (a straggler rank
also pays FACTOR - 1 times its real compute); ``hang`` is refused (a hung worker is lost only
after 60 s, far beyond the delays measured).

Scheduling: a mini-job becomes ready at its job's arrival; a worker holds one mini-job at a time
(the engine's ``queue_max`` = 1), so a job arriving later is never stuck behind work queued for
an earlier one, and takes the next ready mini-job. ``--order layer`` (default) serves the lowest
layer of any arrived job first, then by arrival (the paper's priority: a coarse answer for every
job before refining any); ``--order job`` serves FIFO by job arrival, then by layer within a
job. One-shot is FIFO by arrival. ``--redundancy R`` (default 0) is a budget on the engine's
re-issued copies: when nothing is ready, a free worker may take a copy of an outstanding
mini-job, the one with the highest priority, as long as the copies stay within R x the mini-jobs
issued so far (R = 0.2: at most 20% extra mini-jobs, the paper's 20% redundancy). As for every
engine re-issue, only a mini-job out for more than ``engine.REISSUE_AFTER`` median turnarounds
is copied (a straggling one, not one that just started), and the first result wins: the other
copy is cancelled and its worker stops sleeping. The master sleep-waits as the engine does with
one job per worker (backing off from 50 us to 2 ms; never past the next arrival), so a result
may be seen up to 2 ms late. With ``-n 1``, rank 0 computes and sleeps every mini-job itself
(the engine's local mode; no copies).

Every result comes back to the master, which adds it to its job's estimate and, when a job is
complete, checks it against ``A @ B_t`` (float64 BLAS, exact for int8 operands: every sum of K
products stays below 2**53; both modes); a mismatch is a failure.

Delay of (job, layer) = time from the job's arrival to the completion of every mini-job of
layers <= layer, on the master's clock; layers are numbered from 0, like resolutions. A layer
meets a deadline d when its delay <= d. Output in ``-o DIR`` (refused if it holds a result,
unless ``--force``): ``delays.csv`` (job, mode, layer, arrival_s, delay_s, relative_error: the
layer's result against A @ B_t, :func:`layer_errors`), ``summary.csv`` (per
mode and layer: cumulative work share, mean relative error, mean/median/95th-percentile delay,
P(delay <= deadline)),
``success_vs_deadline.csv`` (the curve P(delay <= d) over a grid of d, computed from the
recorded delays), ``delay_per_layer.png`` and ``success_vs_deadline.png``; the summary table
is printed. The default ``--threshold`` (the d of the P(delay <= d) column) is 10 x the mean service time of one component pair
of a job (MEAN / m**2: a quarter job for m = 2).

Exit status: 0 done, 2 bad options, 1 a failure (a worker error, a wrong product, a worker lost).
"""
from __future__ import annotations

import csv
import heapq
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from mpilayer.apps.stream import StreamView
from mpilayer.core.coding import field_values
from mpilayer.core.components import ComponentSplit
from mpilayer.core.wire_format import encode_component
from mpilayer.errors import InputError, MpilayerError
from mpilayer.mpi.engine import Engine, Policy
from mpilayer.mpi.protocol import fail_setup, send_setup, yield_cores_to_workers

EXIT_INPUT, EXIT_FAILED = 2, 1
BITS = 8
MODES = ("layered", "one-shot")
WORKER_TIMEOUT_S = 60.0   # a silent worker is lost after this (then its mini-jobs are sent again)
ENGINE_MEMORY = 2**30     # the engine's memory budget (it keeps memory/10 bytes in flight); jobs are KiB


# --------------------------------------------------------------------------- the work of a job

def component_widths(m: int, bits: int = BITS) -> tuple:
    """m widths summing to ``bits``, as equal as possible, the wider ones first."""
    if not 1 <= m <= bits:
        raise ValueError(f"--components must be 1..{bits}, not {m}")
    base, extra = divmod(bits, m)
    return tuple(base + (1 if i < extra else 0) for i in range(m))


def mode_split(mode: str, m: int) -> ComponentSplit:
    """The split a mode's workers use: m components, or one 8-bit component (one-shot)."""
    return ComponentSplit(BITS, component_widths(m if mode == "layered" else 1))


def layer_pairs(m: int) -> list:
    """Layer l -> the component pairs (i, j) with i + j = l, for l = 0 .. 2m - 2."""
    return [[(i, l - i) for i in range(m) if 0 <= l - i < m] for l in range(2 * m - 1)]


def row_tiles(rows: int, tiles: int) -> list:
    """``tiles`` near-equal row ranges ``(lo, hi)`` covering ``range(rows)``."""
    edges = np.linspace(0, rows, tiles + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def make_operands(seed: int, shape: tuple, job: int):
    """A (fixed) and B_job, int8, from the seed."""
    M, K, N = shape
    A = np.random.default_rng([seed & 0xFFFFFFFF, 0xA]).integers(-128, 128, size=(M, K), dtype=np.int8)
    B = np.random.default_rng([seed & 0xFFFFFFFF, 0xB, job]).integers(-128, 128, size=(K, N), dtype=np.int8)
    return A, B


def layer_errors(seed: int, shape: tuple, jobs: int, m: int) -> np.ndarray:
    """``err[job, layer]``: relative Frobenius error |C_l - A B_t|_F / |A B_t|_F of each layer's
    result, C_l the sum of the component-pair products of layers <= l (what the job holds when
    layer l is done; 0 at the last layer). It depends on the data only, not on the timing, so it
    is computed after the runs, in float64 (exact: int8 products, sums below 2**53)."""
    split = mode_split("layered", m)
    fields = [split.component(c) for c in range(m)]
    A = make_operands(seed, shape, 0)[0]
    a_parts = [field_values(A, f).astype(np.float64) * 2.0 ** f.lo for f in fields]
    out = np.zeros((jobs, 2 * m - 1))
    for t in range(jobs):
        B = make_operands(seed, shape, t)[1]
        b_parts = [field_values(B, f).astype(np.float64) * 2.0 ** f.lo for f in fields]
        exact = A.astype(np.float64) @ B.astype(np.float64)
        norm = np.linalg.norm(exact) or 1.0
        held = np.zeros_like(exact)
        for layer, pairs in enumerate(layer_pairs(m)):
            for i, j in pairs:
                held += a_parts[i] @ b_parts[j]
            out[t, layer] = np.linalg.norm(held - exact) / norm
    return out


@dataclass(frozen=True)
class MiniJob:
    id: int              # unique in the mode: the engine's job id
    job: int
    layer: int           # 0 for one-shot
    pairs: tuple         # ((i, j),) component pairs of the mode's split (one-shot: ((0, 0),))
    tile: int            # row tile of A
    rows: tuple          # (lo, hi) rows of A
    share: float         # of the job's bit-products


def mini_jobs(job: int, mode: str, m: int, tiles: list, rows: int) -> list:
    """Job ``job``'s mini-jobs, ids ``job * n .. job * n + n - 1``."""
    widths = component_widths(m)
    pairs = [(layer, p) for layer, ps in enumerate(layer_pairs(m)) for p in ps] if mode == "layered" else [(0, (0, 0))]
    n = len(tiles) * len(pairs)
    out = []
    for ti, (lo, hi) in enumerate(tiles):
        frac = (hi - lo) / rows
        for layer, (i, j) in pairs:
            share = frac if mode == "one-shot" else widths[i] * widths[j] / BITS ** 2 * frac
            out.append(MiniJob(job * n + len(out), job, layer, ((i, j),), ti, (lo, hi), share))
    return out


# --------------------------------------------------------------------------- the policy

class ExperimentPolicy(Policy):
    """One mode's stream of jobs as a policy of the scheduling engine (mpi/engine.py): arrivals,
    the ready mini-jobs in priority order, A resident and B_t's components on the workers, the
    copies' budget, and per job its layers' completion times and the exactness check."""

    def __init__(self, mode: str, args, arrivals: np.ndarray, tiles: list):
        self.mode, self.arrivals, self.tiles = mode, arrivals, tiles
        self.split = mode_split(mode, args.components)
        self.seed, self.shape = args.seed, tuple(args.shape)
        self.redundancy = args.redundancy
        self.by_layer = mode == "layered" and args.order == "layer"
        self.mean_s = args.service_time.shift + args.service_time.mean
        self.A = make_operands(args.seed, self.shape, 0)[0]
        # the reference product in float64 BLAS: int8 x int8 sums of K terms stay below 2**53, so
        # it is exact, and the master (busy checking, not dispatching) costs the workers no time;
        # numpy's int64 matmul took 10-25 ms per job here and delayed every mini-job waiting for it
        self.A_ref = self.A.astype(np.float64)
        self.per_job = [mini_jobs(t, mode, args.components, tiles, self.shape[0]) for t in range(len(arrivals))]
        self.n_layers = 2 * args.components - 1 if mode == "layered" else 1
        self.remaining = np.zeros((len(arrivals), self.n_layers), dtype=np.int64)
        for mjs in self.per_job:
            for mj in mjs:
                self.remaining[mj.job, mj.layer] += 1
        self.left = self.remaining.sum(axis=1)
        self.total = int(self.left.sum())
        self.done_at = np.full((len(arrivals), self.n_layers), np.nan)  # on the clock of started()
        self.jobs = {}          # id -> MiniJob, of the arrived jobs
        self.ready = []         # heap of (priority, id): arrived, not sent (or a lost worker's)
        self.answered = set()   # ids with a result
        self.sent_ids = set()   # ids sent at least once
        self.issued = self.copies = 0
        self.arrived = 0        # jobs arrived
        self.b = {}             # job -> B_t, from its arrival to its check
        self.b_encoded = {}     # (job, component) -> its encoded buffer
        self.holders = {}       # job -> ranks holding components of its B_t
        self.sums = {}          # job -> int64 sum of its results
        self.views = {}
        self._a_message = None
        self.t0 = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    def priority(self, mj: MiniJob) -> tuple:
        return (mj.layer, mj.job) if self.by_layer else (mj.job, mj.layer)

    def delays(self) -> np.ndarray:
        """delay[job, layer] after the job's arrival (NaN: not done)."""
        return self.done_at - self.arrivals[:, None]

    # ------------------------------------------------------------------ engine hooks (engine.py)

    def new_view(self, rank: int) -> StreamView:
        """The stream's worker view: B_t's components held there (``held``), keys to evict."""
        view = self.views[rank] = StreamView(rank)
        return view

    def preload(self, view):
        """A, resident: every component of every row tile, one message per worker."""
        if self._a_message is None:
            components, payloads = [], []
            for ti, (lo, hi) in enumerate(self.tiles):
                block = np.ascontiguousarray(self.A[lo:hi])
                for c in range(self.split.n_resolutions):
                    components.append((("A", ti), block.shape, c))
                    payloads.append(encode_component(block, self.split.component(c)))
            self._a_message = {"id": -1, "preload": True, "components": components, "evict": []}, payloads
        return self._a_message

    def started(self) -> None:
        self.t0 = time.monotonic()

    def tick(self) -> bool:
        """Make the mini-jobs of every job arrived by now ready."""
        opened = False
        while self.arrived < len(self.arrivals) and self.arrivals[self.arrived] <= self.now():
            t = self.arrived
            self.b[t] = make_operands(self.seed, self.shape, t)[1]
            for mj in self.per_job[t]:
                self.jobs[mj.id] = mj
                heapq.heappush(self.ready, (self.priority(mj), mj.id))
            self.arrived += 1
            opened = True
        return opened

    def next_job(self, view):
        while self.ready:
            _, jid = heapq.heappop(self.ready)
            if jid not in self.answered:  # (a lost worker's mini-job may have been answered since)
                return self.jobs[jid]
        return None

    def job(self, jid: int) -> MiniJob:
        return self.jobs[jid]

    def job_message(self, view, mj: MiniJob) -> tuple:
        """The header (worker.py: ``pairs`` to multiply, ``service_share`` of the emulated time)
        and the components of B_t the worker lacks."""
        key = ("B", mj.job)
        held = view.held.setdefault(key, set())
        shape = (self.shape[1], self.shape[2])
        components, payloads = [], []
        for c in sorted({j for _, j in mj.pairs} - held):
            buf = self.b_encoded.get((mj.job, c))
            if buf is None:
                buf = self.b_encoded[(mj.job, c)] = encode_component(self.b[mj.job], self.split.component(c))
            components.append((key, shape, c))
            payloads.append(buf)
            held.add(c)
        self.holders.setdefault(mj.job, set()).add(view.rank)
        r = max(max(p) for p in mj.pairs)  # the resolution whose increment holds the pairs
        header = {"id": mj.id, "r": r, "pairs": mj.pairs, "a": ("A", mj.tile), "b": key,
                  "components": components, "evict": view.evict, "service_share": mj.share}
        view.evict = []
        return header, payloads

    def job_seconds(self, mj: MiniJob) -> float:
        return mj.share * self.mean_s

    def result_shape(self, mj: MiniJob) -> tuple:
        return mj.rows[1] - mj.rows[0], self.shape[2]

    def sent(self, view, mj: MiniJob) -> None:
        if mj.id in self.sent_ids:
            self.copies += 1
        else:
            self.sent_ids.add(mj.id)
            self.issued += 1

    def reissue_order(self, view):
        """``--redundancy R``: copies only when nothing is ready and within R x the mini-jobs
        issued; the highest priority first."""
        if self.ready or self.copies >= self.redundancy * self.issued:
            return lambda jid: None
        return lambda jid: self.priority(self.jobs[jid])

    def requeue(self, jobs: list) -> None:
        """A lost worker's mini-jobs: ready again, to be issued anew."""
        for mj in jobs:
            self.sent_ids.discard(mj.id)
            self.issued -= 1
            heapq.heappush(self.ready, (self.priority(mj), mj.id))

    def result(self, view, mj: MiniJob, info: dict, tile, sent) -> None:
        """The first answer to a mini-job: into its job's sum; a layer is done when every
        mini-job of its layers <= it is; a complete job is checked."""
        self.answered.add(mj.id)
        C = self.sums.setdefault(mj.job, np.zeros((self.shape[0], self.shape[2]), dtype=np.int64))
        C[mj.rows[0]:mj.rows[1]] += tile
        self.remaining[mj.job, mj.layer] -= 1
        self.left[mj.job] -= 1
        now = self.now()
        for layer in range(self.n_layers):
            if self.remaining[mj.job, layer] > 0:
                break
            if math.isnan(self.done_at[mj.job, layer]):
                self.done_at[mj.job, layer] = now
        if self.left[mj.job] == 0:
            self._check(mj.job)

    def _check(self, t: int) -> None:
        """Job t is complete: compare with A @ B_t (exact in float64), and drop B_t everywhere."""
        C = self.sums.pop(t)
        expected = (self.A_ref @ self.b.pop(t).astype(np.float64)).astype(np.int64)
        if not np.array_equal(C, expected):
            raise RuntimeError(f"{self.mode} job {t}: the sum of its mini-jobs differs from A @ B_t "
                               f"(max |error| {np.abs(C - expected).max()})")
        key = ("B", t)
        for rank in self.holders.pop(t, ()):
            view = self.views[rank]
            if view.held.pop(key, None) is not None:
                view.evict.append(key)
        for c in range(self.split.n_resolutions):
            self.b_encoded.pop((t, c), None)

    def finished(self) -> bool:
        return len(self.answered) == self.total

    def next_event_s(self) -> float:
        if self.t0 is None or self.arrived >= len(self.arrivals):
            return math.inf
        return self.arrivals[self.arrived] - self.now()


# --------------------------------------------------------------------------- options

def check_options(args, size: int) -> None:
    """InputError (one line) for options that make no sense; run on rank 0 only."""
    if not args.rate > 0:
        raise InputError(f"--rate must be > 0 jobs per second, not {args.rate:g}")
    if args.jobs < 1:
        raise InputError(f"--jobs must be >= 1, not {args.jobs}")
    try:
        if args.components is not None:  # the old spelling --components M
            component_widths(args.components)
        else:
            args.components = components_of(args.component_bits)
    except ValueError as err:
        raise InputError(str(err)) from None
    if args.row_blocks < 1 or args.row_blocks > args.shape[0]:
        raise InputError(f"--row-blocks must be 1..M (= {args.shape[0]} rows of A), not {args.row_blocks}")
    st = args.service_time
    if st.hangs:
        raise InputError("--service-time: hang clauses are not supported by deadline-experiment "
                         "(it has no failure handling); use exp, shifted-exp and straggler")
    if not (st.mean or st.shift):
        raise InputError("--service-time: give exp:MEAN or shifted-exp:SHIFT,MEAN (MEAN = mean service "
                         "time of a whole job); the experiment needs random service times")
    try:
        st.check_ranks(size)
    except ValueError as err:
        raise InputError(str(err)) from None
    if args.threshold is not None and not args.threshold > 0:
        raise InputError(f"--threshold must be > 0 seconds, not {args.threshold:g}")
    if not 0 <= args.redundancy <= 1:
        raise InputError(f"--redundancy must be 0..1 (a fraction of the mini-jobs), not {args.redundancy:g}")
    if args.order not in ("layer", "job"):
        raise InputError(f"--order must be layer or job, not {args.order!r}")
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:  # the plots; checked before any work
        raise InputError("deadline-experiment needs matplotlib for its plots; "
                         f"install it with `{sys.executable} -m pip install matplotlib`")
    old = [f for f in OUTPUT_FILES if os.path.exists(os.path.join(args.output, f))]
    if old and not args.force:
        raise InputError(f"{args.output} already holds a deadline-experiment result ({old[0]}); "
                         "pass --force to overwrite it")
    try:
        os.makedirs(args.output, exist_ok=True)
        probe = os.path.join(args.output, ".write_test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        raise InputError(f"-o {args.output}: cannot write there ({err.strerror or err})") from None


def components_of(component_bits) -> int:
    """M, the number of components, of --component-bits W (W-bit components) or W,W,...; the
    widths must be the (almost) equal split of the 8 bits that component_widths(M) makes."""
    if isinstance(component_bits, int) and 1 <= component_bits <= BITS:
        m = -(-BITS // component_bits)
    elif isinstance(component_bits, tuple) and sum(component_bits) == BITS:
        m = len(component_bits)
    else:
        raise ValueError(f"--component-bits must be W or W,W,... summing to {BITS}, not {component_bits}")
    wanted = component_bits if isinstance(component_bits, tuple) else (component_bits,)
    if component_widths(m)[:len(wanted)] != wanted:
        raise ValueError(f"--component-bits {','.join(map(str, np.atleast_1d(component_bits)))}: deadline-experiment "
                         f"splits the {BITS} bits (almost) equally, widest first, e.g. 4 (4,4), 3 (3,3,2), 2 or 1")
    return m


def default_deadline(args) -> float:
    st = args.service_time
    return 10.0 * (st.shift + st.mean) / args.components ** 2


# --------------------------------------------------------------------------- ranks

def run(args) -> int:
    from mpi4py import MPI

    from mpilayer.mpi.worker import serve_setups

    comm = MPI.COMM_WORLD
    if comm.Get_rank() != 0:
        return serve_setups(comm)  # worker.py's worker_run, one pass per mode
    try:
        check_options(args, comm.Get_size())
    except MpilayerError as err:
        return fail_setup(comm, err, EXIT_INPUT)
    return _master(comm, args)


def _master(comm, args) -> int:
    size = comm.Get_size()
    M, K, N = args.shape
    m = args.components
    deadline = args.threshold if args.threshold is not None else default_deadline(args)
    rng = np.random.default_rng([args.seed & 0xFFFFFFFF, 0xA2])
    arrivals = np.cumsum(rng.exponential(1.0 / args.rate, size=args.jobs))
    tiles = row_tiles(M, args.row_blocks)
    n_layers = 2 * m - 1
    workers = max(1, size - 1)
    if size > 2:
        yield_cores_to_workers(5)  # its bookkeeping runs in the workers' gaps
    widths = component_widths(m)
    log = (lambda *a, **k: None) if args.quiet else print
    log(f"mpilayer deadline-experiment: {args.jobs} jobs per mode of A ({M}x{K}) @ B_t ({K}x{N}) int8, "
        f"{m} components ({'+'.join(map(str, widths))} bits) -> {n_layers} layers (0..{n_layers - 1}), "
        f"{args.row_blocks} row block(s), Poisson arrivals at {args.rate:g}/s, service time "
        f"{args.service_time.spec} per whole job, {workers} worker(s) on {size} rank(s), order {args.order}, "
        f"redundancy {args.redundancy:g}, threshold {deadline:g} s", flush=True)
    config = {"reissue": True, "worker_timeout": WORKER_TIMEOUT_S, "service_time": args.service_time,
              "seed": args.seed, "queue_max": 1, "master_nice": 0}
    delays = {}
    for mode in MODES:
        engine, running = None, False
        try:
            policy = ExperimentPolicy(mode, args, arrivals, tiles)
            engine = Engine(comm, policy, config, ENGINE_MEMORY, log=log)
            if size > 1:
                send_setup(comm, {"split": policy.split, "service_time": args.service_time, "seed": args.seed})
                running = True
            engine.run()
            if engine.stopped_by != "complete":
                raise RuntimeError(f"{mode}: no worker left (rank(s) "
                                   f"{', '.join(map(str, sorted(set(engine.lost_ranks))))} stopped answering)")
            if size > 1:
                running = False
                if not engine.stop_workers():
                    raise RuntimeError(f"{mode}: worker rank(s) {', '.join(map(str, engine.unanswered))} did "
                                       "not answer the stop")
        except Exception as err:  # noqa: BLE001 - a worker error, a wrong product: stop every rank
            print(f"mpilayer: error: {err}", file=sys.stderr, flush=True)
            if size > 1:
                if running and not engine.stop_workers(timeout=10) or engine is not None and engine.unanswered:
                    time.sleep(0.2)  # let the launcher forward the line above
                    comm.Abort(EXIT_FAILED)
                send_setup(comm, {"error": str(err), "status": EXIT_FAILED})
            return EXIT_FAILED
        delays[mode] = policy.delays()
        wall = engine.end_time - policy.t0
        busy = (sum(row["compute_s"] for row in engine.rank_rows) if size > 1  # (emulated sleeps included)
                else engine.stats.compute_s)
        log(f"  {mode:<8}: {args.jobs} jobs in {wall:.2f} s, {policy.total} mini-jobs, {policy.copies} copies "
            f"({engine.counts['cancelled']} cancelled), busy {busy:.2f} s of worker time (utilisation "
            f"{busy / (workers * wall):.2f}), all {args.jobs} products exact", flush=True)
    if size > 1:
        send_setup(comm, {"done": True})
    errors = {"layered": layer_errors(args.seed, tuple(args.shape), args.jobs, m),
              "one-shot": np.zeros((args.jobs, 1))}  # one-shot: the exact product or nothing
    try:
        rows = write_outputs(args.output, delays, errors, arrivals, deadline, m)
    except OSError as err:
        print(f"mpilayer: error: -o {args.output}: cannot write the results ({err.strerror or err})",
              file=sys.stderr, flush=True)
        return EXIT_FAILED
    print(format_table(rows, deadline, m), flush=True)
    print(f"wrote {', '.join(os.path.join(args.output, f) for f in OUTPUT_FILES)}", flush=True)
    return 0


# --------------------------------------------------------------------------- report

OUTPUT_FILES = ("delays.csv", "summary.csv", "success_vs_deadline.csv", "delay_per_layer.png",
                "success_vs_deadline.png")


def series(delays: dict, m: int) -> list:
    """(label, mode, layer, cumulative work share, delays) for every layer and one-shot."""
    widths = component_widths(m)
    out = []
    cum = 0.0
    for layer, pairs in enumerate(layer_pairs(m)):
        cum += sum(widths[i] * widths[j] for i, j in pairs) / BITS ** 2
        out.append((f"layer {layer}", "layered", layer, cum, delays["layered"][:, layer]))
    out.append(("one-shot", "one-shot", 0, 1.0, delays["one-shot"][:, 0]))
    return out


def deadline_grid(delays: dict) -> np.ndarray:
    top = max(float(np.max(d)) for d in delays.values())
    return np.linspace(0.0, 1.05 * top, 200)


def write_outputs(out_dir: str, delays: dict, errors: dict, arrivals: np.ndarray, deadline: float, m: int) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(out_dir, "delays.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["job", "mode", "layer", "arrival_s", "delay_s", "relative_error"])
        for mode in MODES:
            d, e = delays[mode], errors[mode]
            for t in range(d.shape[0]):
                for layer in range(d.shape[1]):
                    w.writerow([t, mode, layer, f"{arrivals[t]:.6f}", f"{d[t, layer]:.6f}", f"{e[t, layer]:.6g}"])
    ser = series(delays, m)
    rows = []
    for label, mode, layer, share, d in ser:
        rows.append({"mode": mode, "layer": layer, "label": label, "work_share": share,
                     "mean_relative_error": float(np.mean(errors[mode][:, layer])),
                     "mean_delay_s": float(np.mean(d)), "median_delay_s": float(np.median(d)),
                     "p95_delay_s": float(np.percentile(d, 95)), "deadline_s": deadline,
                     "p_meet_deadline": float(np.mean(d <= deadline))})
    with open(os.path.join(out_dir, "summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "label"], extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    grid = deadline_grid(delays)
    with open(os.path.join(out_dir, "success_vs_deadline.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["deadline_s", "mode", "layer", "p_meet"])
        for label, mode, layer, _, d in ser:
            for g in grid:
                w.writerow([f"{g:.6f}", mode, layer, f"{np.mean(d <= g):.6f}"])

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    labels = [s[0] for s in ser]
    means = [r["mean_delay_s"] for r in rows]
    p95 = [r["p95_delay_s"] for r in rows]
    colors = ["tab:blue"] * (len(ser) - 1) + ["tab:red"]
    ax.bar(labels, means, color=colors, label="mean delay")
    ax.plot(labels, p95, "k_", markersize=18, mew=2, label="95th percentile")
    ax.axhline(deadline, color="gray", ls="--", label=f"deadline {deadline:g} s")
    for i, r in enumerate(rows):
        ax.text(i, means[i], f"{means[i]:.3g}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("delay after arrival (s)")
    ax.set_title("Delay per layer (layered) vs one-shot")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "delay_per_layer.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, mode, layer, share, d in ser:
        ax.plot(grid, [np.mean(d <= g) for g in grid], label=f"{label} ({share:.0%} of the work)"
                if mode == "layered" else "one-shot (100%)",
                color="tab:red" if mode == "one-shot" else None, lw=2 if mode == "one-shot" else 1.5,
                ls="--" if mode == "one-shot" else "-")
    ax.axvline(deadline, color="gray", ls=":", label=f"--threshold {deadline:g} s")
    ax.set_xlabel("deadline after arrival (s)")
    ax.set_ylabel("P(delay <= deadline)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Probability of meeting the deadline")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "success_vs_deadline.png"), dpi=110)
    plt.close(fig)
    return rows


def format_table(rows: list, deadline: float, m: int) -> str:
    lines = [f"{'':<10} {'work':>6} {'rel. error':>10} {'mean delay':>11} {'median':>9} {'p95':>9} "
             f"{'P(<= ' + format(deadline, 'g') + ' s)':>14}"]
    for r in rows:
        lines.append(f"{r['label']:<10} {r['work_share']:>6.0%} {r['mean_relative_error']:>10.4f} "
                     f"{r['mean_delay_s']:>9.3f} s {r['median_delay_s']:>7.3f} s "
                     f"{r['p95_delay_s']:>7.3f} s {r['p_meet_deadline']:>14.3f}")
    lines.append("rel. error: mean over jobs of |C_l - A B_t|_F / |A B_t|_F, C_l the sum of the layers <= l "
                 "(the truncated component products, no estimate)")
    return "\n".join(lines)
