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
    product of the tile.

Workers compute every mini-job for real with mpilayer's exact kernels (``add_terms`` on
``OperandBlock`` bit fields) and then *sleep* an emulated service time (no CPU burned, so many
ranks fit on few cores): with ``--service-time exp:MEAN``, MEAN is the mean service time of a
*whole job* (all pairs, all tiles); a mini-job holding a share s of the job's bit-products
(w_i * w_j / bits**2 times its share of the rows) sleeps s x (a fresh draw of the model), so
one-shot and layered carry the same expected total work, and with balanced components
(m = 2) the layered total is exactly the one-shot work. ``shifted-exp`` and ``straggler``
clauses of service_time.py apply the same way (a straggler rank also pays FACTOR - 1 times
its real compute); ``hang`` is refused (the experiment has no failure handling).

Scheduling on rank 0 (the master): a mini-job becomes ready at its job's arrival; a free
worker takes the next ready mini-job (dynamic, one mini-job per worker at a time).
``--order layer`` (default) serves the lowest layer of any arrived job first, then by arrival
(the paper's priority: a coarse answer for every job before refining any);
``--order job`` serves FIFO by job arrival, then by layer within a job. One-shot is FIFO by
arrival. ``--redundancy R`` (default 0) lets a worker that finds nothing ready take a *copy* of
the outstanding mini-job with the highest priority not yet copied, as long as the copies stay
within R x the mini-jobs issued so far (R = 0.2: at most 20% extra mini-jobs, the paper's 20%
redundancy); the first result wins, the other copy runs to its end (no cancellation) and is
ignored. Copies are only made when nothing is ready, so they never hold back original work
already waiting, though they can keep a worker busy when a new job arrives. The master sleep-waits (Iprobe with a
50 us..2 ms backoff, and never past the next arrival); with ``-n 1``, rank 0 computes and
sleeps every mini-job itself.

Every result comes back to the master, which adds it to its job's estimate and, when a job is
complete, checks it against ``A @ B_t`` in numpy int64 (both modes); a mismatch is a failure.

Delay of (job, layer) = time from the job's arrival to the completion of every mini-job of
layers <= layer, on the master's clock; layers are numbered from 0, like resolutions. A layer
meets a deadline d when its delay <= d. Output in ``-o DIR`` (refused if it holds a result,
unless ``--force``): ``delays.csv`` (job, mode, layer, arrival_s, delay_s), ``summary.csv`` (per
mode and layer: cumulative work share, mean/median/95th-percentile delay, P(delay <= deadline)),
``success_vs_deadline.csv`` (the curve P(delay <= d) over a grid of d, computed from the
recorded delays), ``delay_per_layer.png`` and ``success_vs_deadline.png``; the summary table
is printed. The default ``--threshold`` (the d of the P(delay <= d) column) is 10 x the mean service time of one component pair
of a job (MEAN / m**2: a quarter job for m = 2).

Exit status: 0 done, 2 bad options, 1 a failure (a worker error or a wrong product).
"""
from __future__ import annotations

import csv
import heapq
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from mpilayer.core.components import BitField, ComponentSplit
from mpilayer.core.service_time import ServiceTime
from mpilayer.errors import InputError, MpilayerError
from mpilayer.mpi.protocol import (TAG_ERROR, TAG_JOB, TAG_RESULT, TAG_SETUP, TAG_STOP, TAG_STOPPED, format_exception,
                                   last_line, send_setup, wait_for_message)

EXIT_INPUT, EXIT_FAILED = 2, 1
BITS = 8
MODES = ("layered", "one-shot")


# --------------------------------------------------------------------------- the work of a job

def component_widths(m: int, bits: int = BITS) -> tuple:
    """m widths summing to ``bits``, as equal as possible, the wider ones first."""
    if not 1 <= m <= bits:
        raise ValueError(f"--components must be 1..{bits}, not {m}")
    base, extra = divmod(bits, m)
    return tuple(base + (1 if i < extra else 0) for i in range(m))


def layer_pairs(m: int) -> list:
    """Layer l -> the component pairs (i, j) with i + j = l, for l = 0 .. 2m - 2."""
    return [[(i, l - i) for i in range(m) if 0 <= l - i < m] for l in range(2 * m - 1)]


def row_tiles(rows: int, tiles: int) -> list:
    """``tiles`` near-equal row ranges ``(lo, hi)`` covering ``range(rows)``."""
    edges = np.linspace(0, rows, tiles + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def make_operands(seed: int, shape: tuple, job: int):
    """A (fixed) and B_job, int8, from the seed; the same on every rank."""
    M, K, N = shape
    A = np.random.default_rng([seed & 0xFFFFFFFF, 0xA]).integers(-128, 128, size=(M, K), dtype=np.int8)
    B = np.random.default_rng([seed & 0xFFFFFFFF, 0xB, job]).integers(-128, 128, size=(K, N), dtype=np.int8)
    return A, B


@dataclass(frozen=True)
class MiniJob:
    job: int
    layer: int           # 0 for one-shot
    pairs: tuple         # ((i, j), ...) component pairs; () = the full product (one-shot)
    rows: tuple          # (lo, hi) rows of A
    share: float         # of the job's bit-products


def mini_jobs(job: int, mode: str, m: int, tiles: list, rows: int) -> list:
    widths = component_widths(m)
    out = []
    for lo, hi in tiles:
        frac = (hi - lo) / rows
        if mode == "one-shot":
            out.append(MiniJob(job, 0, (), (lo, hi), frac))
            continue
        for layer, pairs in enumerate(layer_pairs(m)):
            for p in pairs:
                share = widths[p[0]] * widths[p[1]] / BITS ** 2 * frac
                out.append(MiniJob(job, layer, (p,), (lo, hi), share))
    return out


class Computer:
    """Computes mini-jobs exactly with mpilayer's kernels, keeping the operand blocks of the
    current job (planes and digits are cached inside OperandBlock)."""

    def __init__(self, seed: int, shape: tuple, m: int):
        from mpilayer.core.products import OperandBlock

        self.seed, self.shape = seed, shape
        self.split = ComponentSplit(BITS, component_widths(m))
        self.full = BitField(0, BITS, BITS)
        self._OperandBlock = OperandBlock
        self.A = make_operands(seed, shape, 0)[0]
        self._a_blocks = {}
        self._job, self._b = None, None

    def operand_b(self, job: int):
        if self._job != job:
            self._job = job
            self._b = self._OperandBlock(make_operands(self.seed, self.shape, job)[1], "B", BITS)
        return self._b

    def compute(self, mj: MiniJob) -> np.ndarray:
        from mpilayer.core.products import add_terms

        lo, hi = mj.rows
        if mj.rows not in self._a_blocks:
            self._a_blocks[mj.rows] = self._OperandBlock(np.ascontiguousarray(self.A[lo:hi]), "A", BITS)
        a, b = self._a_blocks[mj.rows], self.operand_b(mj.job)
        if not mj.pairs:
            terms = [(self.full, self.full)]
        else:
            terms = [(self.split.component(i), self.split.component(j)) for i, j in mj.pairs]
        out, _ = add_terms(None, a, b, terms)
        return out


class Sleeper:
    """The emulated service time of one rank: share x (a draw of the model), plus
    (FACTOR - 1) x compute for a straggler rank."""

    def __init__(self, model: ServiceTime, rank: int, seed: int):
        self.model, self.rank, self.seed = model, rank, seed
        self.reset()

    def reset(self) -> None:
        self.rng = np.random.default_rng([int(self.seed) & 0xFFFFFFFF, self.rank])
        self.factor = self.model.stragglers.get(self.rank, 1.0)

    def seconds(self, share: float, compute_s: float) -> float:
        base = self.model.shift + (self.rng.exponential(self.model.mean) if self.model.mean else 0.0)
        return share * base * self.factor + compute_s * (self.factor - 1.0)


def serve(comp: Computer, sleeper: Sleeper, mj: MiniJob):
    t0 = time.perf_counter()
    result = comp.compute(mj)
    compute_s = time.perf_counter() - t0
    sleep_s = sleeper.seconds(mj.share, compute_s)
    if sleep_s > 0:
        time.sleep(sleep_s)
    return result, compute_s, sleep_s


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


    comm = MPI.COMM_WORLD
    if comm.Get_rank() != 0:
        return _worker(comm)
    try:
        check_options(args, comm.Get_size())
    except MpilayerError as err:
        send_setup(comm, {"error": str(err), "status": EXIT_INPUT})
        print(f"mpilayer: error: {err}", file=sys.stderr)
        return EXIT_INPUT
    try:
        return _master(comm, args)
    except Exception as err:  # noqa: BLE001 - any failure must stop the workers
        print(f"mpilayer: error: {err}", file=sys.stderr, flush=True)
        if comm.Get_size() > 1:
            try:
                send_setup(comm, {"error": str(err), "status": EXIT_FAILED})
            finally:
                time.sleep(0.2)
                comm.Abort(EXIT_FAILED)
        return EXIT_FAILED


def _wait(comm, status, until: float | None = None) -> bool:
    """Sleep-wait for any message; False if ``until`` (monotonic) came first."""
    from mpi4py import MPI

    return wait_for_message(comm, MPI.ANY_SOURCE, status, until)


def _worker(comm) -> int:
    from mpi4py import MPI

    status = MPI.Status()
    comp = sleeper = None
    while True:
        _wait(comm, status)
        tag = status.Get_tag()
        msg = comm.recv(source=0, tag=tag)
        if tag == TAG_STOP:
            comm.send(None, dest=0, tag=TAG_STOPPED)
            return 0
        if tag == TAG_SETUP:
            if "error" in msg:
                return msg["status"]
            try:
                if comp is None:
                    comp = Computer(msg["seed"], msg["shape"], msg["components"])
                    sleeper = Sleeper(msg["service_time"], comm.Get_rank(), msg["seed"])
                    comp.compute(MiniJob(0, 0, (), (0, min(8, comp.shape[0])), 0.0))  # warm-up
                sleeper.reset()
            except Exception:  # noqa: BLE001
                comm.send(format_exception(comm), dest=0, tag=TAG_ERROR)
                continue
            comm.send({"ready": True}, dest=0, tag=TAG_RESULT)
        elif tag == TAG_JOB:
            try:
                result, compute_s, sleep_s = serve(comp, sleeper, msg["mj"])
            except Exception:  # noqa: BLE001
                comm.send(format_exception(comm), dest=0, tag=TAG_ERROR)
                continue
            comm.send({"id": msg["id"], "result": result, "compute_s": compute_s, "sleep_s": sleep_s},
                      dest=0, tag=TAG_RESULT)


def _master(comm, args) -> int:
    from mpi4py import MPI

    size = comm.Get_size()
    M, K, N = args.shape
    m = args.components
    deadline = args.threshold if args.threshold is not None else default_deadline(args)
    rng = np.random.default_rng([args.seed & 0xFFFFFFFF, 0xA2])
    arrivals = np.cumsum(rng.exponential(1.0 / args.rate, size=args.jobs))
    tiles = row_tiles(M, args.row_blocks)
    n_layers = 2 * m - 1
    workers = list(range(1, size)) or [0]
    setup = {"seed": args.seed, "shape": (M, K, N), "components": m, "service_time": args.service_time}
    local = None
    if size == 1:
        local = (Computer(args.seed, (M, K, N), m), Sleeper(args.service_time, 0, args.seed))
        local[0].compute(MiniJob(0, 0, (), (0, min(8, M)), 0.0))
    yield_cores = size > 2 and hasattr(os, "nice")
    if yield_cores:
        try:
            os.nice(5)
        except OSError:
            pass
    widths = component_widths(m)
    log = (lambda *a, **k: None) if args.quiet else print
    log(f"mpilayer deadline-experiment: {args.jobs} jobs per mode of A ({M}x{K}) @ B_t ({K}x{N}) int8, "
          f"{m} components ({'+'.join(map(str, widths))} bits) -> {n_layers} layers (0..{n_layers - 1}), {args.row_blocks} row block(s), "
          f"Poisson arrivals at {args.rate:g}/s, service time {args.service_time.spec} per whole job, "
          f"{len(workers)} worker(s) on {size} rank(s), order {args.order}, redundancy {args.redundancy:g}, "
          f"threshold {deadline:g} s", flush=True)
    checker = _Checker(args.seed, (M, K, N))
    delays = {}
    stats = {}
    status = MPI.Status()
    for mode in MODES:
        if size > 1:
            send_setup(comm, dict(setup, mode=mode))
            for _ in workers:
                _wait(comm, status)
                src, tag = status.Get_source(), status.Get_tag()
                msg = comm.recv(source=src, tag=tag)
                if tag == TAG_ERROR:
                    raise RuntimeError(f"worker {src}: {last_line(msg)}")
        else:
            local[1].reset()
        delays[mode], stats[mode] = _run_mode(comm, mode, args, arrivals, tiles, workers, local, checker, status)
        d = delays[mode]
        log(f"  {mode:<8}: {args.jobs} jobs in {stats[mode]['wall_s']:.2f} s, {stats[mode]['minijobs']} mini-jobs, "
              f"{stats[mode]['copies']} copies, busy {stats[mode]['busy_s']:.2f} s of worker time (utilisation "
              f"{stats[mode]['busy_s'] / (len(workers) * stats[mode]['wall_s']):.2f}), all {args.jobs} products exact",
              flush=True)
        assert d.shape == (args.jobs, n_layers if mode == "layered" else 1)
    if size > 1:
        for r in workers:
            comm.send(None, dest=r, tag=TAG_STOP)
        for r in workers:
            _wait(comm, status)
            comm.recv(source=status.Get_source(), tag=status.Get_tag())
    rows = write_outputs(args.output, delays, arrivals, deadline, m)
    print(format_table(rows, deadline, m), flush=True)
    print(f"wrote {', '.join(os.path.join(args.output, f) for f in OUTPUT_FILES)}", flush=True)
    return 0


class _Checker:
    """Accumulates each job's results and checks the finished job against numpy int64."""

    def __init__(self, seed, shape):
        self.seed, self.shape = seed, shape
        self.sums = {}
        self.A = make_operands(seed, shape, 0)[0].astype(np.int64)

    def add(self, mj: MiniJob, result: np.ndarray) -> None:
        C = self.sums.setdefault(mj.job, np.zeros((self.shape[0], self.shape[2]), dtype=np.int64))
        C[mj.rows[0]:mj.rows[1]] += result

    def finish(self, job: int, mode: str) -> None:
        C = self.sums.pop(job)
        expected = self.A @ make_operands(self.seed, self.shape, job)[1].astype(np.int64)
        if not np.array_equal(C, expected):
            raise RuntimeError(f"{mode} job {job}: the sum of its mini-jobs differs from A @ B_t "
                               f"(max |error| {np.abs(C - expected).max()})")


def _run_mode(comm, mode, args, arrivals, tiles, workers, local, checker, status):
    """Serve one mode's stream in real time; returns (delays[job, layer], stats)."""
    M = args.shape[0]
    m = args.components
    n_layers = 2 * m - 1 if mode == "layered" else 1
    per_job = [mini_jobs(t, mode, m, tiles, M) for t in range(args.jobs)]
    remaining = np.zeros((args.jobs, n_layers), dtype=np.int64)
    for t, mjs in enumerate(per_job):
        for mj in mjs:
            remaining[t, mj.layer] += 1
    left_in_job = remaining.sum(axis=1)
    done_at = np.full((args.jobs, n_layers), np.nan)
    ready = []
    next_job = 0
    idle = list(workers)
    out = {}          # message id -> (mini-job number, rank)
    copied = set()    # mini-job numbers with a copy out
    done = set()
    issued = copies = 0
    seq = 0
    busy_s = 0.0
    t0 = time.monotonic()

    def key(mj):
        if mode == "layered" and args.order == "layer":
            return (mj.layer, mj.job)
        return (mj.job, mj.layer)

    def complete(mj, result, now):
        checker.add(mj, result)
        remaining[mj.job, mj.layer] -= 1
        left_in_job[mj.job] -= 1
        if left_in_job[mj.job] == 0:
            checker.finish(mj.job, mode)
        for layer in range(n_layers):  # layers <= l all done -> l done
            if remaining[mj.job, layer] > 0:
                break
            if np.isnan(done_at[mj.job, layer]):
                done_at[mj.job, layer] = now

    finished = 0
    total = sum(len(p) for p in per_job)
    while finished < total:
        now = time.monotonic() - t0
        while next_job < args.jobs and arrivals[next_job] <= now:
            for mj in per_job[next_job]:
                heapq.heappush(ready, (key(mj), seq, mj))  # seq = the mini-job's number
                seq += 1
            next_job += 1
        while idle and ready:
            _, num, mj = heapq.heappop(ready)
            rank = idle.pop(0)
            if local is not None:
                result, compute_s, sleep_s = serve(local[0], local[1], mj)
                busy_s += compute_s + sleep_s
                complete(mj, result, time.monotonic() - t0)
                finished += 1
                idle.append(rank)
                break  # look at arrivals again before the next mini-job
            out[seq] = (num, mj, rank)
            comm.send({"id": seq, "mj": mj}, dest=rank, tag=TAG_JOB)
            seq += 1
            issued += 1
        while local is None and idle and not ready and copies < args.redundancy * issued:
            candidates = [(key(mj), num) for num, mj, _ in out.values() if num not in copied and num not in done]
            if not candidates:
                break
            num = min(candidates)[1]
            mj = next(v[1] for v in out.values() if v[0] == num)
            rank = idle.pop(0)
            copied.add(num)
            out[seq] = (num, mj, rank)
            comm.send({"id": seq, "mj": mj}, dest=rank, tag=TAG_JOB)
            seq += 1
            copies += 1
        if local is not None:
            if not ready and next_job < args.jobs and finished < total:
                time.sleep(max(0.0, arrivals[next_job] - (time.monotonic() - t0)))
            continue
        until = t0 + arrivals[next_job] if next_job < args.jobs else None
        if not out and until is None:
            continue
        if not _wait(comm, status, until):
            continue
        src, tag = status.Get_source(), status.Get_tag()
        msg = comm.recv(source=src, tag=tag)
        if tag == TAG_ERROR:
            raise RuntimeError(f"worker {src}: {last_line(msg)}")
        if tag != TAG_RESULT or "id" not in msg:
            continue
        num, mj, rank = out.pop(msg["id"])
        busy_s += msg["compute_s"] + msg["sleep_s"]
        idle.append(rank)
        if num in done:
            continue  # the other copy won
        done.add(num)
        complete(mj, msg["result"], time.monotonic() - t0)
        finished += 1
    wall = time.monotonic() - t0
    # losing copies still out: wait for them so that the next mode starts with idle workers
    while out:
        _wait(comm, status)
        src, tag = status.Get_source(), status.Get_tag()
        msg = comm.recv(source=src, tag=tag)
        if tag == TAG_ERROR:
            raise RuntimeError(f"worker {src}: {last_line(msg)}")
        if tag == TAG_RESULT and "id" in msg:
            out.pop(msg["id"], None)
            busy_s += msg["compute_s"] + msg["sleep_s"]
    return done_at - arrivals[:, None], {"wall_s": wall, "busy_s": busy_s, "minijobs": total, "copies": copies}


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


def write_outputs(out_dir: str, delays: dict, arrivals: np.ndarray, deadline: float, m: int) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(out_dir, "delays.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["job", "mode", "layer", "arrival_s", "delay_s"])
        for mode in MODES:
            d = delays[mode]
            for t in range(d.shape[0]):
                for layer in range(d.shape[1]):
                    w.writerow([t, mode, layer, f"{arrivals[t]:.6f}", f"{d[t, layer]:.6f}"])
    ser = series(delays, m)
    rows = []
    for label, mode, layer, share, d in ser:
        rows.append({"mode": mode, "layer": layer, "label": label, "work_share": share,
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
    lines = [f"{'':<10} {'work':>6} {'mean delay':>11} {'median':>9} {'p95':>9} {'P(<= ' + format(deadline, 'g') + ' s)':>14}"]
    for r in rows:
        lines.append(f"{r['label']:<10} {r['work_share']:>6.0%} {r['mean_delay_s']:>9.3f} s {r['median_delay_s']:>7.3f} s "
                     f"{r['p95_delay_s']:>7.3f} s {r['p_meet_deadline']:>14.3f}")
    return "\n".join(lines)
