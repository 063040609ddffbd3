"""Scales, checks, zero points and statistics of both operands, computed by every rank at once.

Instead of a serial pass over both operands on rank 0, each worker that can open an input
(data_plane.py) reads a share of its row blocks of A / column blocks of B (consecutive blocks,
one run per worker that can; rank 0 only if none can), and the shares are combined with
collectives over small vectors. Each share is read from the input once: the first pass keeps
the raw blocks (within the rank's block cache), the second quantises them from memory.

1. first pass (operand_readers.OperandReader.first_pass_sums): per row/column sum, min and max
   of the raw values, NaN/Inf checks -- of both operands combined with two Iallreduce (SUM of the
   sums, MIN of the minima, of the negated maxima and of each operand's first bad block); the
   first error in block order is raised on every rank (its message gathered only then);
2. every rank derives the same scales, integer range check and zero points from them
   (``finish_first_pass``), so a bad input gives every rank the same one-line InputError;
3. second pass: the estimates' statistics (estimates.SideStats) of each share, of both
   operands combined by Iallreduce SUM with every entry outside the rank's own rows/columns
   zeroed.

Rank 0 reads no share while a worker can. When every operand has a worker that opened it, the
collectives run among the workers alone (an MPI-3 group communicator that rank 0 is not in), and
the first worker sends rank 0 the combined result, or the input error, in one message
(``TAG_PREPARED``): rank 0 then waits for one message, sleeping ever longer (its polls do not
hold up the workers' collectives, as they would if it took part), instead of waking for every
round. Otherwise rank 0 takes part and reads the shares no worker can.

Every row/column is summed by exactly one rank in the serial order of its k-panels, and x + 0 is
x, so the results are bit-identical to the serial pass. Afterwards every rank holds the scales,
zero points and complete statistics: the workers quantise their own blocks with them.
"""
from __future__ import annotations

import pickle
import time

import numpy as np

from mpilayer.errors import InputError
from mpilayer.mpi import data_plane
from mpilayer.mpi.protocol import POLL_MIN_S, TAG_PREPARED, send_setup


def master_prepare(comm, a, b, bits: int, log) -> tuple:
    """Rank 0: start the workers' shares (set-up message ``"prepare"``) and take part in the
    collectives (or wait for their result: :func:`workers_alone`); returns ``({worker rank: sides
    it reads}, bytes of the preparation through rank 0)``. Raises InputError (after every rank has
    seen it)."""
    spec = {"A": data_plane.describe(a), "B": data_plane.describe(b)}
    send_setup(comm, {"prepare": spec, "split": a.split, "bits": bits})
    everyone = sleep_allgather(comm, ({}, None))  # while the workers open the inputs
    problems = [mine for mine, _ in everyone]
    for rank, mine in enumerate(problems):
        for side, why in sorted(mine.items()):
            log(f"worker rank {rank} cannot open {spec[side]['path']} ({why}): the master sends its {side} blocks")
    for _, note in everyone:  # per node: blocks in shared memory or not (node_share.py)
        if note:
            log(note)
    readers = {"A": a, "B": b}
    nbytes = receive_prepared(comm, readers, bits) if workers_alone(problems) else prepare(comm, readers, problems, bits)[0]
    return {rank: frozenset(side for side in data_plane.SIDES if side not in problems[rank])
            for rank in range(1, comm.Get_size())}, nbytes


def worker_prepare(comm, message: dict) -> dict:
    """A worker: open the inputs, take its share; returns the readers of the inputs it can read
    (with the scales, zero points and statistics), or ``{}`` if the inputs were rejected (the
    master then ends the set-up with the error)."""
    readers, mine, note = data_plane.open_readers(comm, message["prepare"], message["split"])
    problems = [theirs for theirs, _ in sleep_allgather(comm, (mine, note))]
    try:
        if workers_alone(problems):
            prepare_among_workers(comm, readers, problems, message["bits"])
        else:
            prepare(comm, readers, problems, message["bits"])
    except InputError:
        return {}
    return data_plane.readable(readers)


def workers_alone(problems: list) -> bool:
    """Whether every operand has a worker that opened it: rank 0 then reads no share and takes
    no part in the collectives (``problems``: per rank, the sides it could not open)."""
    return len(problems) > 1 and all(any(side not in mine for mine in problems[1:]) for side in data_plane.SIDES)


def prepare_among_workers(comm, readers: dict, problems: list, bits: int) -> None:
    """A worker's part of :func:`prepare` over a communicator of the workers alone; the first
    worker then sends rank 0 what it needs (:func:`receive_prepared`): per operand the first
    pass's sums, minima and maxima and the combined statistics, or the InputError's message."""
    workers = comm.Create_group(comm.Get_group().Excl([0]))  # collective over the workers only
    outcome = None
    try:
        _, first = prepare(workers, readers, problems, bits, rank=comm.Get_rank())
        outcome = {side: (*first[side], readers[side].stats) for side in data_plane.SIDES}
    except InputError as err:
        outcome = str(err)
        raise
    finally:
        workers.Free()
        if comm.Get_rank() == 1 and outcome is not None:
            comm.send(outcome, dest=0, tag=TAG_PREPARED)


def receive_prepared(comm, readers: dict, bits: int) -> int:
    """Rank 0's side of :func:`prepare_among_workers`: sleep-wait for the first worker's message,
    then set the scales, zero points and statistics of ``readers`` from it, or raise its
    InputError. Returns the message's bytes."""
    from mpi4py import MPI

    status = MPI.Status()
    _sleep_until(lambda: comm.Iprobe(source=1, tag=TAG_PREPARED, status=status), master=True)
    nbytes = status.Get_count()
    outcome = comm.recv(source=1, tag=TAG_PREPARED)
    if isinstance(outcome, str):
        raise InputError(outcome)
    for side, reader in readers.items():
        total, lo, hi, stats = outcome[side]
        reader.finish_first_pass(total, lo, hi, bits)
        reader.set_stats(stats)
    return nbytes


def shares(n_majors: int, problems: list, side: str, rank: int) -> list:
    """Major blocks of ``side`` this rank reads: consecutive runs, one per worker that opened it
    (rank 0, the control plane, only when none did), so that a rank reads B's column blocks in
    one hyperslab per k-panel (OperandReader._blocks_raw)."""
    able = [r for r, mine in enumerate(problems) if side not in mine and r > 0] or [0]
    if rank not in able:
        return []
    i, n_able = able.index(rank), len(able)
    return list(range(i * n_majors // n_able, (i + 1) * n_majors // n_able))


def prepare(comm, readers: dict, problems: list, bits: int, rank: int | None = None) -> tuple:
    """Both passes over both operands, collectively (module docstring): each pass over A and B,
    then one round of non-blocking collectives for both, sleep-waited (:func:`sleep_wait`); the
    first error of a pass travels as its block's position in the MIN reduction (A's before B's,
    as serially), its message in one more round only when there is one. ``rank``: this rank's
    number in ``problems`` (default: its rank in ``comm``). Returns the bytes of the vectors this
    rank contributed to the reductions and, per operand, the first pass's combined ``(sums,
    minima, maxima)``."""
    from mpi4py import MPI

    rank, nbytes, first_pass = comm.Get_rank() if rank is None else rank, 0, {}
    mine = {side: shares(len(r.majors), problems, side, rank) for side, r in readers.items()}
    sums, errors, first = [], {}, np.full(len(data_plane.SIDES), np.inf)
    for i, side in enumerate(data_plane.SIDES):
        reader = readers[side]
        try:
            sums.append(reader.first_pass_sums(mine[side]))
        except InputError as err:
            mi, pi = getattr(err, "block", (0, 0))
            first[i] = mi * len(reader.panels) + pi  # block order: exact in float64
            errors[side] = (first[i], str(err))
            sums.append((np.zeros(reader.length), np.full(reader.length, np.inf), np.full(reader.length, -np.inf)))
    total = np.concatenate([t for t, _, _ in sums])
    low = np.concatenate([lo for _, lo, _ in sums] + [-hi for _, _, hi in sums] + [first])  # max(hi) = -min(-hi)
    sleep_wait(comm, [comm.Iallreduce(MPI.IN_PLACE, total, op=MPI.SUM),
                      comm.Iallreduce(MPI.IN_PLACE, low, op=MPI.MIN)])
    nbytes += total.nbytes + low.nbytes
    if np.isfinite(low[-len(first):]).any():  # every rank sees it: the message from the rank that found it
        everyone = sleep_allgather(comm, errors)
        for side in data_plane.SIDES:
            found = min((e[side] for e in everyone if side in e), default=None)
            if found is not None:
                raise InputError(found[1])
    at, n_lo = 0, len(total)
    for side in data_plane.SIDES:
        reader, cut = readers[side], slice(at, at + readers[side].length)
        first_pass[side] = (total[cut], low[cut], -low[n_lo:2 * n_lo][cut])
        reader.finish_first_pass(*first_pass[side], bits)
        at = cut.stop
    shares_stats = []
    for side in data_plane.SIDES:
        reader = readers[side]
        owned = np.zeros(reader.length, dtype=bool)
        for mi in mine[side]:
            owned[reader.majors[mi]] = True
        shares_stats.append((reader.share_stats(mine[side]), owned))
    nbytes += combine_owned(comm, shares_stats)
    for side, (stats, _) in zip(data_plane.SIDES, shares_stats):
        readers[side].set_stats(stats)
    return nbytes, first_pass


BARRIER_POLL_MAX_S = (0.002, 0.001)  # longest sleep of rank 0 / of a worker in sleep_wait ...
RANK0_POLL = (5e-4, 8, 0.01)  # ... except rank 0's: from 0.5 ms, up to 1/8 of its wait so far (at most 10 ms)


def sleep_allgather(comm, obj) -> list:
    """``comm.allgather(obj)`` without spinning: the pickles' lengths, then their bytes, each
    gathered by a non-blocking collective and sleep-waited (:func:`sleep_wait`)."""
    from mpi4py import MPI

    data = np.frombuffer(pickle.dumps(obj, pickle.HIGHEST_PROTOCOL), dtype=np.uint8)
    sizes = np.zeros(comm.Get_size(), dtype=np.int64)
    sleep_wait(comm, [comm.Iallgather(np.array([data.size], dtype=np.int64), sizes)])
    counts = [int(size) for size in sizes]
    starts = [sum(counts[:i]) for i in range(len(counts))]
    out = np.empty(sum(counts), dtype=np.uint8)
    sleep_wait(comm, [comm.Iallgatherv(data, [out, counts, starts, MPI.BYTE])])
    return [pickle.loads(out[start:start + count].tobytes()) for start, count in zip(starts, counts)]


def sleep_wait(comm, requests: list) -> None:
    """Wait for non-blocking collectives, sleeping between tests: MPICH's blocking collectives
    spin a core (on a shared node a worker's), and rank 0, which reads no share, would spin for
    the whole of the workers' reading."""
    from mpi4py import MPI

    _sleep_until(lambda: MPI.Request.Testall(requests), master=MPI.COMM_WORLD.Get_rank() == 0)


def _sleep_until(done, master: bool) -> None:
    """Call ``done()`` until it is true, sleeping in between. A worker backs off from 50 us to
    1 ms. Rank 0's sleeps delay every rank when it takes part in a collective (a collective
    completes only as its ranks poll: 10 ms from the start made the preparation of float32
    4096^2 on 3 ranks 0.23-0.27 s, 2 ms 0.16-0.18 s), but each of its wake-ups costs it 30-80 us
    of CPU (a test under 1 us: 150 wake-ups in a 0.3 s wait at 2 ms). So they grow past 2 ms
    only as a share of the wait so far (RANK0_POLL): the wait ends at most 1/8 later, after ~40
    wake-ups."""
    start = time.monotonic()
    delay, longest = (RANK0_POLL[0] if master else POLL_MIN_S), BARRIER_POLL_MAX_S[not master]
    while not done():
        time.sleep(delay)
        if master:
            longest = min(max(BARRIER_POLL_MAX_S[0], (time.monotonic() - start) / RANK0_POLL[1]), RANK0_POLL[2])
        delay = min(2 * delay, longest)


def combine_owned(comm, shares_stats: list) -> int:
    """For each ``(stats, owned)``, every per-row/column array of ``stats`` (last axis =
    ``len(owned)``) becomes the owners' values: entries this rank does not own are zeroed, then
    summed over the ranks in place (one reduction per dtype for all of them). Returns the bytes
    reduced."""
    from mpi4py import MPI

    arrays = []
    for stats, owned in shares_stats:
        mine = [value for name, value in vars(stats).items()
                if isinstance(value, np.ndarray) and value.ndim and value.shape[-1] == owned.size and name != "zero"]
        for value in mine:
            value[..., ~owned] = 0
        arrays += mine
    by_dtype = {}
    for value in arrays:
        by_dtype.setdefault(value.dtype, []).append(value)
    packs = [np.concatenate([value.ravel() for value in group]) for group in by_dtype.values()]
    sleep_wait(comm, [comm.Iallreduce(MPI.IN_PLACE, packed, op=MPI.SUM) for packed in packs])  # one per dtype
    nbytes = 0
    for group, packed in zip(by_dtype.values(), packs):
        nbytes += packed.nbytes
        start = 0
        for value in group:
            value.ravel()[...] = packed[start:start + value.size]
            start += value.size
    return nbytes
