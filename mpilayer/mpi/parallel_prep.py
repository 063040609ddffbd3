"""Scales, checks, zero points and statistics of both operands, computed by every rank at once.

Instead of a serial pass over both operands on rank 0, each worker that can open an input
(data_plane.py) reads a share of its row blocks of A / column blocks of B (consecutive blocks,
one run per worker that can; rank 0 only if none can), and the shares are combined with
collectives over small vectors. Each share is read from the input once: the first pass keeps
the raw blocks (within the rank's block cache), the second quantises them from memory.

1. first pass (operand_readers.OperandReader.first_pass_sums): per row/column sum, min and max
   of the raw values, NaN/Inf checks -- of both operands combined with two Allreduce (SUM of the
   sums, MIN of the minima and of the negated maxima); the first error in block order
   (Allgather) is raised on every rank;
2. every rank derives the same scales, integer range check and zero points from them
   (``finish_first_pass``), so a bad input gives every rank the same one-line InputError;
3. second pass: the estimates' statistics (estimates.SideStats) of each share, of both
   operands combined by Allreduce SUM with every entry outside the rank's own rows/columns
   zeroed.

Every row/column is summed by exactly one rank in the serial order of its k-panels, and x + 0 is
x, so the results are bit-identical to the serial pass. Afterwards every rank holds the scales,
zero points and complete statistics: the workers quantise their own blocks with them.
"""
from __future__ import annotations

import time

import numpy as np

from mpilayer.errors import InputError
from mpilayer.mpi import data_plane
from mpilayer.mpi.protocol import POLL_MIN_S, send_setup


def master_prepare(comm, a, b, bits: int, log) -> tuple:
    """Rank 0: start the workers' shares (set-up message ``"prepare"``) and take part in the
    collectives; returns ``({worker rank: sides it reads}, bytes rank 0 sent in them)``. Raises
    InputError (after every rank has seen it)."""
    spec = {"A": data_plane.describe(a), "B": data_plane.describe(b)}
    send_setup(comm, {"prepare": spec, "split": a.split, "bits": bits})
    sleep_barrier(comm)  # while the workers open the inputs
    problems = comm.allgather({})
    for rank, mine in enumerate(problems):
        for side, why in sorted(mine.items()):
            log(f"worker rank {rank} cannot open {spec[side]['path']} ({why}): the master sends its {side} blocks")
    for note in comm.gather(None, root=0):  # per node: blocks in shared memory or not (node_share.py)
        if note:
            log(note)
    nbytes = prepare(comm, {"A": a, "B": b}, problems, bits)
    return {rank: frozenset(side for side in data_plane.SIDES if side not in problems[rank])
            for rank in range(1, comm.Get_size())}, nbytes


def worker_prepare(comm, message: dict) -> dict:
    """A worker: open the inputs, take its share; returns the readers of the inputs it can read
    (with the scales, zero points and statistics), or ``{}`` if the inputs were rejected (the
    master then ends the set-up with the error)."""
    readers, mine, note = data_plane.open_readers(comm, message["prepare"], message["split"])
    sleep_barrier(comm)
    problems = comm.allgather(mine)
    comm.gather(note, root=0)
    try:
        prepare(comm, readers, problems, message["bits"])
    except InputError:
        return {}
    return data_plane.readable(readers)


def shares(n_majors: int, problems: list, side: str, rank: int) -> list:
    """Major blocks of ``side`` this rank reads: consecutive runs, one per worker that opened it
    (rank 0, the control plane, only when none did), so that a rank reads B's column blocks in
    one hyperslab per k-panel (OperandReader._blocks_raw)."""
    able = [r for r, mine in enumerate(problems) if side not in mine and r > 0] or [0]
    if rank not in able:
        return []
    i, n_able = able.index(rank), len(able)
    return list(range(i * n_majors // n_able, (i + 1) * n_majors // n_able))


def prepare(comm, readers: dict, problems: list, bits: int) -> int:
    """Both passes over both operands, collectively (module docstring): each pass over A and B,
    then one round of collectives for both (a round costs milliseconds with more ranks than
    cores); errors of A before those of B, as serially. Returns the bytes of the vectors this
    rank contributed to the reductions."""
    from mpi4py import MPI

    rank, nbytes = comm.Get_rank(), 0
    mine = {side: shares(len(r.majors), problems, side, rank) for side, r in readers.items()}
    sums, errors = [], {}
    for side in data_plane.SIDES:
        reader = readers[side]
        try:
            sums.append(reader.first_pass_sums(mine[side]))
        except InputError as err:
            errors[side] = (getattr(err, "block", (0, 0)), str(err))
            sums.append((np.zeros(reader.length), np.full(reader.length, np.inf), np.full(reader.length, -np.inf)))
    sleep_barrier(comm)  # rank 0 (no share) must not spin a core in the collective meanwhile
    everyone = comm.allgather(errors)
    for side in data_plane.SIDES:  # the first error in block order, A's before B's
        first = min((e[side] for e in everyone if side in e), default=None)
        if first is not None:
            raise InputError(first[1])
    total = np.concatenate([t for t, _, _ in sums])
    low = np.concatenate([lo for _, lo, _ in sums] + [-hi for _, _, hi in sums])  # max(hi) = -min(-hi)
    comm.Allreduce(MPI.IN_PLACE, total, op=MPI.SUM)
    comm.Allreduce(MPI.IN_PLACE, low, op=MPI.MIN)
    nbytes += total.nbytes + low.nbytes
    at, n_lo = 0, len(total)
    for side in data_plane.SIDES:
        reader, cut = readers[side], slice(at, at + readers[side].length)
        reader.finish_first_pass(total[cut], low[cut], -low[n_lo:][cut], bits)
        at = cut.stop
    shares_stats = []
    for side in data_plane.SIDES:
        reader = readers[side]
        owned = np.zeros(reader.length, dtype=bool)
        for mi in mine[side]:
            owned[reader.majors[mi]] = True
        shares_stats.append((reader.share_stats(mine[side]), owned))
    sleep_barrier(comm)
    nbytes += combine_owned(comm, shares_stats)
    for side, (stats, _) in zip(data_plane.SIDES, shares_stats):
        readers[side].set_stats(stats)
    return nbytes


BARRIER_POLL_MAX_S = (0.002, 0.001)  # longest sleep of rank 0 / of a worker in sleep_barrier


def sleep_barrier(comm) -> None:
    """A barrier that sleep-waits (MPICH's blocking collectives spin a core; on a shared node
    that core belongs to a worker), backing off from 50 us to BARRIER_POLL_MAX_S. Rank 0 polls
    less often and so is usually the last to leave: the collective after the barrier then finds
    every worker in it, and rank 0 does not spin there. Its barrier completes only when it polls,
    so its longest sleep delays every rank: 10 ms made the preparation of float32 4096^2 on 3
    ranks 0.23-0.27 s, 2 ms 0.16-0.18 s, for the same CPU of rank 0 (0.07-0.09 s per run)."""
    req = comm.Ibarrier()
    delay, longest = POLL_MIN_S, BARRIER_POLL_MAX_S[comm.Get_rank() > 0]
    while not req.Test():
        time.sleep(delay)
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
    nbytes = 0
    for group in by_dtype.values():  # one reduction per dtype
        packed = np.concatenate([value.ravel() for value in group])
        comm.Allreduce(MPI.IN_PLACE, packed, op=MPI.SUM)
        nbytes += packed.nbytes
        start = 0
        for value in group:
            value.ravel()[...] = packed[start:start + value.size]
            start += value.size
    return nbytes
