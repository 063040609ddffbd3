"""Emulated service times of workers: random delays, slow ranks and hung ranks (``--service-time``).

A worker computes each mini-job for real, then *sleeps* an emulated extra time before it sends
the result, so the master sees a slower worker without any CPU being burned: many worker ranks
fit on a few cores. A model is one or more clauses joined by ``+``:

``none``
    no emulation (the default).
``exp:MEAN``
    every mini-job takes an extra exponential time of mean MEAN seconds (the paper's model of
    random service times); with small tiles the real compute is negligible and a job's service
    time is about Exp(MEAN).
``shifted-exp:SHIFT,MEAN``
    an extra SHIFT + Exp(MEAN) seconds.
``straggler:RANK:FACTOR``
    rank RANK is FACTOR times slower (FACTOR >= 1): each of its jobs takes FACTOR times its
    service time without the clause, i.e. FACTOR x (compute + any ``exp``/``shifted-exp`` extra).
    It sleeps the difference.
``hang:RANK:AFTER``
    rank RANK (or ``all``: every worker) answers AFTER mini-jobs, then stops answering: on
    its next job it sleeps until the MPI job ends (it exits by itself if its launcher dies).

Only one of ``exp``/``shifted-exp`` may appear; several ``straggler`` and ``hang`` clauses may
(one per rank). Every rank draws from its own generator, seeded with ``(seed, rank)``, in the
order it computes its jobs, so a run is reproducible up to the scheduling.
Example: ``--service-time exp:0.02+straggler:1:10 --seed 3``.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

ALL = -1  # hang:all:AFTER


@dataclass(frozen=True)
class ServiceTime:
    """A parsed ``--service-time`` model (picklable: it travels in the set-up message)."""

    spec: str = "none"
    shift: float = 0.0
    mean: float = 0.0                                 # exponential part, seconds
    stragglers: dict = field(default_factory=dict)    # rank -> factor
    hangs: dict = field(default_factory=dict)         # rank (or ALL) -> jobs answered before the hang

    @property
    def active(self) -> bool:
        return bool(self.shift or self.mean or self.stragglers or self.hangs)

    def check_ranks(self, size: int) -> None:
        """ValueError unless every RANK names a rank that computes: 1..size-1 (0 with one rank)."""
        workers = range(1, size) if size > 1 else range(0, 1)
        for what, ranks in (("straggler", self.stragglers), ("hang", self.hangs)):
            for rank in ranks:
                if rank != ALL and rank not in workers:
                    where = f"ranks 1..{size - 1}; rank 0 is the master" if size > 1 else "rank 0 alone"
                    raise ValueError(f"--service-time {what}:{rank}: no worker rank {rank} in a run of "
                                     f"{size} rank(s) (the workers are {where})")

    def for_rank(self, rank: int, seed: int) -> "RankServiceTime | None":
        """The emulator of one worker rank, or None when nothing applies to it."""
        if not (self.shift or self.mean or rank in self.stragglers or rank in self.hangs or ALL in self.hangs):
            return None
        return RankServiceTime(self, rank, seed)


class RankServiceTime:
    """Per-rank draws: the extra seconds to sleep after each job, and when to hang."""

    def __init__(self, model: ServiceTime, rank: int, seed: int):
        self.model, self.rank = model, rank
        self.rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, rank])
        self.factor = model.stragglers.get(rank, 1.0)
        self.hang_after = model.hangs.get(rank, model.hangs.get(ALL))

    def extra(self, compute_s: float, share: float = 1.0) -> float:
        """Seconds to sleep after a job that took ``compute_s`` of real compute; ``share`` scales
        the drawn time (a job holding that share of a unit whose time the model draws: the
        deadline experiment's mini-jobs, header ``service_share``)."""
        base = self.model.shift + (self.rng.exponential(self.model.mean) if self.model.mean else 0.0)
        return share * base * self.factor + compute_s * (self.factor - 1.0)

    def hangs_now(self, jobs_answered: int) -> bool:
        return self.hang_after is not None and jobs_answered >= self.hang_after


def hang_forever() -> None:
    """The emulated hang: sleep (no CPU) until the MPI job is ended from outside, or exit if
    the launcher's process that started this one has gone (so no orphan outlives a test)."""
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def parse_service_time(text: str) -> ServiceTime:
    """Parse a ``--service-time`` string; ValueError with a one-line message if malformed."""
    spec = text.strip()
    shift = mean = 0.0
    base = None
    stragglers, hangs = {}, {}
    if spec.lower() in ("", "none"):
        return ServiceTime("none")
    for clause in spec.split("+"):
        name, _, rest = clause.strip().partition(":")
        name = name.lower()
        if name == "exp" or name == "shifted-exp":
            if base is not None:
                raise ValueError(f"--service-time: only one of exp/shifted-exp may be given, not {base!r} "
                                 f"and {clause.strip()!r}")
            base = clause.strip()
            values = _numbers(rest, 1 if name == "exp" else 2, clause,
                              "exp:MEAN" if name == "exp" else "shifted-exp:SHIFT,MEAN")
            shift, mean = (0.0, values[0]) if name == "exp" else values
            if mean <= 0 or shift < 0:
                raise ValueError(f"--service-time {clause.strip()!r}: MEAN must be > 0 and SHIFT >= 0 seconds")
        elif name in ("straggler", "hang"):
            form = "straggler:RANK:FACTOR" if name == "straggler" else "hang:RANK:AFTER_JOBS"
            parts = rest.split(":")
            if len(parts) != 2:
                raise ValueError(f"--service-time {clause.strip()!r}: expected {form}")
            rank = _rank(parts[0], clause, form, allow_all=name == "hang")
            table = stragglers if name == "straggler" else hangs
            if rank in table:
                raise ValueError(f"--service-time: rank {parts[0]} appears in two {name} clauses")
            if name == "straggler":
                factor = _numbers(parts[1], 1, clause, form)[0]
                if factor < 1:
                    raise ValueError(f"--service-time {clause.strip()!r}: FACTOR must be >= 1")
                table[rank] = factor
            else:
                try:
                    after = int(parts[1])
                except ValueError:
                    after = -1
                if after < 0:
                    raise ValueError(f"--service-time {clause.strip()!r}: AFTER_JOBS must be an integer >= 0")
                table[rank] = after
        else:
            raise ValueError(f"--service-time: unknown model {clause.strip()!r}; use none, exp:MEAN, "
                             f"shifted-exp:SHIFT,MEAN, straggler:RANK:FACTOR or hang:RANK:AFTER_JOBS, "
                             f"joined with '+'")
    return ServiceTime(spec, shift, mean, stragglers, hangs)


def _numbers(text: str, count: int, clause: str, form: str) -> list:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise ValueError(f"--service-time {clause.strip()!r}: expected {form} with numbers in seconds")
    return values


def _rank(text: str, clause: str, form: str, allow_all: bool) -> int:
    if allow_all and text.strip().lower() == "all":
        return ALL
    try:
        rank = int(text)
    except ValueError:
        rank = -1
    if rank < 0:
        raise ValueError(f"--service-time {clause.strip()!r}: RANK must be a rank number"
                         + (" or 'all'" if allow_all else "") + f" ({form})")
    return rank
