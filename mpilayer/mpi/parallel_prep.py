"""Scales, checks, zero points and statistics of both operands, computed by every rank at once.

Instead of a serial pass over both operands on rank 0, each worker that can open an input
(data_plane.py) reads a share of its row blocks of A / column blocks of B (round robin over the
workers that can; rank 0 only if none can), and the shares are combined with collectives over small vectors:

1. first pass (blocks.OperandReader.first_pass_sums): per row/column sum, min and max of the raw
   values, NaN/Inf checks -- combined with Allreduce (SUM, MIN, MAX); the first error in block
   order (Allgather) is raised on every rank;
2. every rank derives the same scales, integer range check and zero points from them
   (``finish_first_pass``), so a bad input gives every rank the same one-line InputError;
3. second pass: the estimates' statistics (estimates.SideStats) of each share, combined by
   Allreduce SUM with every entry outside the rank's own rows/columns zeroed.

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
    nbytes = prepare(comm, {"A": a, "B": b}, problems, bits)
    return {rank: frozenset(side for side in data_plane.SIDES if side not in problems[rank])
            for rank in range(1, comm.Get_size())}, nbytes


def worker_prepare(comm, message: dict) -> dict:
    """A worker: open the inputs, take its share; returns the readers of the inputs it can read
    (with the scales, zero points and statistics), or ``{}`` if the inputs were rejected (the
    master then ends the set-up with the error)."""
    readers, mine = data_plane.open_readers(comm, message["prepare"], message["split"])
    sleep_barrier(comm)
    problems = comm.allgather(mine)
    try:
        prepare(comm, readers, problems, message["bits"])
    except InputError:
        return {}
    return data_plane.readable(readers)


def shares(n_majors: int, problems: list, side: str, rank: int) -> list:
    """Major blocks of ``side`` this rank reads: round robin over the workers that opened it
    (rank 0, the control plane, only when none did)."""
    able = [r for r, mine in enumerate(problems) if side not in mine and r > 0] or [0]
    return [mi for mi in range(n_majors) if able[mi % len(able)] == rank]


def prepare(comm, readers: dict, problems: list, bits: int) -> int:
    """Both passes over both operands, collectively (module docstring); A before B, as serially.
    Returns the bytes of the vectors this rank contributed to the reductions."""
    from mpi4py import MPI

    rank, nbytes = comm.Get_rank(), 0
    mine = {side: shares(len(r.majors), problems, side, rank) for side, r in readers.items()}
    for side in data_plane.SIDES:
        reader = readers[side]
        error = None
        try:
            total, lo, hi = reader.first_pass_sums(mine[side])
        except InputError as err:
            error, total = (getattr(err, "block", (0, 0)), str(err)), np.zeros(reader.length)
            lo, hi = np.full(reader.length, np.inf), np.full(reader.length, -np.inf)
        sleep_barrier(comm)  # rank 0 (no share) must not spin a core in the collective meanwhile
        first = min((e for e in comm.allgather(error) if e is not None), default=None)
        if first is not None:
            raise InputError(first[1])
        for vector, op in ((total, MPI.SUM), (lo, MPI.MIN), (hi, MPI.MAX)):
            comm.Allreduce(MPI.IN_PLACE, vector, op=op)
            nbytes += vector.nbytes
        reader.finish_first_pass(total, lo, hi, bits)
    for side in data_plane.SIDES:
        reader = readers[side]
        stats = reader.share_stats(mine[side])
        sleep_barrier(comm)
        owned = np.zeros(reader.length, dtype=bool)
        for mi in mine[side]:
            owned[reader.majors[mi]] = True
        nbytes += combine_owned(comm, stats, owned)
        reader.set_stats(stats)
    return nbytes


BARRIER_POLL_MAX_S = (0.01, 0.001)  # longest sleep of rank 0 / of a worker in sleep_barrier


def sleep_barrier(comm) -> None:
    """A barrier that sleep-waits (MPICH's blocking collectives spin a core; on a shared node
    that core belongs to a worker), backing off from 50 us to BARRIER_POLL_MAX_S. Rank 0 polls
    less often (measured: 2 ms polls were a third of its preparation CPU) and so is the last to
    leave: the collective after the barrier then finds every worker in it, and rank 0 does not
    spin there (the workers may, for at most 10 ms)."""
    req = comm.Ibarrier()
    delay, longest = POLL_MIN_S, BARRIER_POLL_MAX_S[comm.Get_rank() > 0]
    while not req.Test():
        time.sleep(delay)
        delay = min(2 * delay, longest)


def combine_owned(comm, stats, owned: np.ndarray) -> int:
    """Every per-row/column array of ``stats`` (last axis = ``len(owned)``) becomes the owners'
    values: entries this rank does not own are zeroed, then summed over the ranks in place.
    Returns the bytes reduced."""
    from mpi4py import MPI

    arrays = [value for name, value in vars(stats).items()
              if isinstance(value, np.ndarray) and value.ndim and value.shape[-1] == owned.size and name != "zero"]
    for value in arrays:
        value[..., ~owned] = 0
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
