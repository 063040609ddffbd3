"""Mini-jobs and the master's view of the run: what a job is, the order jobs are handed out in,
and what the master knows of each worker and of each resolution's progress.

A *mini-job* is the increment of one resolution for one (tile, k-panel): the component pairs
that resolution adds, computed as its one or two terms (products.py). With ``--code`` a code
group also has parity jobs, whose A block is a combination of K row blocks (coding.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mpilayer.core.components import ComponentSplit
from mpilayer.core.partition import TileGrid
from mpilayer.io.operand_readers import CodedOperand
from mpilayer.mpi.engine import WorkerView


@dataclass
class MiniJob:
    id: int
    tile: tuple   # (ti, tj); for a parity job (group, tj)
    panel: int    # WHOLE_K: every k-panel, streamed by the worker (a distributed result, mini_jobs.make_jobs)
    r: int
    code_row: int = -1  # -1: an ordinary job; >= K: a parity job of code group tile[0] (--code)

    def needs(self) -> tuple:
        """Components of the A block and of the B block this job's terms read: every one up to r
        (``c_A(r) T_B(r) + T_A(r-1) c_B(r)``)."""
        comps = tuple(range(self.r + 1))
        return comps, comps

    def keys(self) -> tuple:
        a = ("A", self.tile[0], self.panel) if self.code_row < 0 else ("P", (self.tile[0], self.code_row), self.panel)
        return a, ("B", self.tile[1], self.panel)


WHOLE_K = -1


def make_jobs(grid: TileGrid, split: ComponentSplit, coded: CodedOperand | None = None,
              whole_k: bool = False) -> list:
    """Every mini-job, in scheduling order: resolution, then tile, then k-panel. With a code,
    resolution, then code group, tile column and k-panel, then the group's K ordinary jobs
    followed by its parity jobs. With ``whole_k``, one job per tile and resolution covers every
    k-panel (panel WHOLE_K): the worker that computes it reads the panels' blocks one after the
    other and sums them, so it holds the tile's whole product (a distributed result)."""
    jobs = []
    n_cols, n_panels = len(grid.col_blocks), len(grid.k_panels)
    if whole_k:
        return [MiniJob(i, tile, WHOLE_K, r)
                for i, (r, tile) in enumerate((r, t) for r in range(split.n_resolutions) for t in grid.tiles())]
    for r in range(split.n_resolutions):
        if coded is None:
            for tile in grid.tiles():
                for panel in range(n_panels):
                    jobs.append(MiniJob(len(jobs), tile, panel, r))
            continue
        for g in range(coded.n_groups):
            for tj in range(n_cols):
                for panel in range(n_panels):
                    for ti in coded.members(g):
                        jobs.append(MiniJob(len(jobs), (ti, tj), panel, r))
                    for row in range(coded.code.k, coded.code.n):
                        jobs.append(MiniJob(len(jobs), (g, tj), panel, r, row))
    return jobs


@dataclass
class MatmulView(WorkerView):
    """The engine's view of a worker (engine.WorkerView), with what the matmul policy tracks."""

    held_bytes: dict = field(default_factory=dict)  # block key -> estimated bytes on the worker
    reads: frozenset = frozenset()  # sides ("A", "B") whose blocks it reads itself (data_plane.py)


@dataclass
class Progress:
    """Per-resolution bookkeeping, for progress lines and /timeline."""

    n_resolutions: int
    n_tiles: int
    tiles_at: list = None        # tiles_at[r]: tiles that reached r
    bytes_sent: list = None
    bytes_received: list = None

    def __post_init__(self):
        n = self.n_resolutions
        self.tiles_at = [0] * n
        self.bytes_sent = [0] * n
        self.bytes_received = [0] * n
