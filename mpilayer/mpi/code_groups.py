"""The master's bookkeeping of code groups under ``--code`` (coding.py): which jobs form a group,
which workers hold its rows, and when enough results are in to finish it.

A group is K row blocks of A (a code group of CodedOperand) at one tile column, k-panel and
resolution: K ordinary mini-jobs (code rows 0..K-1; rows of blocks past the end of A are known
zeros) and N-K parity jobs. Each row goes to a different worker, so up to N-K silent workers
cost a group at most N-K rows. The group is finished by its first K results: the ordinary
rows among them are used as they are, the missing ones decoded exactly.
"""
from __future__ import annotations

import numpy as np

from mpilayer.core.coding import Code


class CodeGroups:
    """Results and worker placement of every unfinished code group."""

    def __init__(self, code: Code, jobs: list, result_shape, increment_bound):
        """``result_shape(job)``: shape of a job's result tile; ``increment_bound(job)``: a bound on
        ``|entry|`` of one block's increment for that job (for the decoder's overflow check)."""
        self.code = code
        self.result_shape, self.increment_bound = result_shape, increment_bound
        self.jobs_of = {}   # group key -> {code row: job}
        for job in jobs:
            self.jobs_of.setdefault(self.key(job), {})[self.code_row(job)] = job
        self.results = {}   # group key -> {code row: int64 array, group rows x tile cols}
        self.ranks = {}     # group key -> ranks that were sent one of its rows
        self.finished = set()
        self.decoded = 0          # ordinary results recovered by decoding
        self.parity_results = 0   # parity results received (used or not)

    def key(self, job) -> tuple:
        g = job.tile[0] if job.code_row >= 0 else job.tile[0] // self.code.k
        return g, job.tile[1], job.panel, job.r

    def code_row(self, job) -> int:
        return job.code_row if job.code_row >= 0 else job.tile[0] % self.code.k

    def may_take(self, rank: int, job, live_ranks) -> bool:
        """False if ``rank`` was already sent another row of the job's group while some worker
        of ``live_ranks`` (those not lost) was not: when every live worker holds a row (too few
        workers are left), rows double up rather than wait forever."""
        holders = self.ranks.get(self.key(job), ())
        return rank not in holders or all(r in holders for r in live_ranks)

    def assign(self, rank: int, job) -> None:
        self.ranks.setdefault(self.key(job), set()).add(rank)

    def record(self, job, tile: np.ndarray):
        """Store a job's result. When the group has K results, finish it and return
        ``(decoded, unfinished)``: the missing ordinary jobs with their decoded tiles, and every
        other job of the group that has no result (not needed any more). Else None."""
        key = self.key(job)
        if key in self.finished:
            return None
        if job.code_row >= 0:
            self.parity_results += 1
        jobs = self.jobs_of[key]
        shape = self.result_shape(jobs[self.code.k])  # a parity job's: the group's rows
        group = self.results.get(key)
        if group is None:  # rows of blocks past the end of A: zero results, known without a job
            group = self.results[key] = {i: np.zeros(shape, dtype=np.int64)
                                         for i in range(self.code.k) if i not in jobs}
        padded = np.zeros(shape, dtype=np.int64)
        padded[:tile.shape[0]] = tile
        group[self.code_row(job)] = padded
        if len(group) < self.code.k:
            return None
        decoded = self.code.decode(group, self.increment_bound(job))
        out = []
        for i, full in decoded.items():
            missing = jobs[i]
            out.append((missing, full[:self.result_shape(missing)[0]]))
        self.decoded += len(out)
        unfinished = [j for row, j in jobs.items() if row not in group and row not in decoded]
        del self.results[key]
        self.ranks.pop(key, None)
        self.finished.add(key)
        return out, unfinished
