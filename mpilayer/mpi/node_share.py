"""One copy per node: the workers of a node share the quantised operand blocks in MPI-3 shared memory.

Without it every worker reads from HDF5 and quantises each block its jobs need, so a node of w
workers reads an operand up to w times (and again after an eviction). With it, the workers of a
node (``Split_type(COMM_TYPE_SHARED)`` of the workers' communicator; rank 0, the control plane,
takes no part) allocate one window per operand (``Win.Allocate_shared``, all of it in the node's
first worker's segment, mapped by the others with ``Shared_query``) that holds:

- a state word per block (int32): EMPTY, CLAIMED (a rank is reading it) or READY;
- every block ``q - z`` (the OperandReader's quantised block, C-contiguous) at a fixed offset.

The first rank of the node that needs a block claims it with an atomic compare-and-swap, reads
and quantises it as before (so the values are bit-identical), copies it into the window,
``Win.Sync`` (memory barrier) and only then marks it READY; a rank that finds it READY syncs and
uses the window's memory in place (a read-only view, no copy); one that finds it CLAIMED waits.
A rank whose read fails gives its claims back (EMPTY), so its node-mates read the block themselves
and report the same error. Blocks quantised for the statistics (parallel_prep.py) land in the
window too, so a node reads each block from HDF5 about once for the whole run.

Falls back to private blocks (each worker reads its own, as without it) when the node has one
worker reading an input, when the windows would not fit the node's block caches (each worker's
share of ``--memory`` for blocks, as the master's cache), when MPI cannot allocate them, or with
``MPILAYER_NODE_SHARE=0``; the master logs one line per node saying which.
"""
from __future__ import annotations

import os
import socket
import time

import numpy as np

from mpilayer.io.operand_readers import LRUCache, OperandReader

EMPTY, CLAIMED, READY = 0, 1, 2
ALIGN = 64  # bytes: every block starts on a cache line
WAIT_MAX_S = 1e-3  # longest sleep while a node-mate reads a block (a read takes milliseconds)

_LIVE = []  # NodeShare objects of this process, freed together (free_all)


def enabled() -> bool:
    return os.environ.get("MPILAYER_NODE_SHARE", "1") != "0"


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def layout(reader) -> tuple:
    """``(shapes, offsets, bytes, dtype)`` of an operand's window: the state words, then every
    block (mi, pi) in that order, each on a cache line."""
    shapes = [reader.block_shape(mi, pi) for mi in range(len(reader.majors)) for pi in range(len(reader.panels))]
    dtype = np.dtype(f"i{reader.element_bytes}")
    offsets, offset = [], _aligned(4 * len(shapes))
    for shape in shapes:
        offsets.append(offset)
        offset += _aligned(int(np.prod(shape)) * dtype.itemsize)
    return shapes, offsets, offset, dtype


class SharedBlocks:
    """The blocks of one operand in one window of a node (module docstring)."""

    def __init__(self, node_comm, reader):
        from mpi4py import MPI

        self.n_panels = len(reader.panels)
        self.shapes, self.offsets, self.nbytes, self.dtype = layout(reader)
        leader = node_comm.Get_rank() == 0
        self.win = MPI.Win.Allocate_shared(self.nbytes if leader else 0, 4, comm=node_comm)
        buf, _ = self.win.Shared_query(0)
        self.memory = np.frombuffer(buf, dtype=np.uint8)
        self.win.Lock_all(MPI.MODE_NOCHECK)  # one passive epoch for the whole run: atomics and Sync
        if leader:
            self.memory[:4 * len(self.shapes)].view(np.int32)[:] = EMPTY
        self.win.Sync()
        node_comm.Barrier()
        self.win.Sync()
        self.mine = set()  # blocks this rank has claimed and not yet filled
        self._one, self._out, self._cmp = (np.zeros(1, np.int32) for _ in range(3))

    def _index(self, mi: int, pi: int) -> int:
        return mi * self.n_panels + pi

    def _atomic(self, idx: int, value: int, compare: int | None = None) -> int:
        """Compare-and-swap (``compare`` given) or swap the state word of block ``idx``; returns the old state."""
        from mpi4py import MPI

        self._one[0] = value
        if compare is None:
            self.win.Fetch_and_op([self._one, MPI.INT32_T], [self._out, MPI.INT32_T], 0, idx, op=MPI.REPLACE)
        else:
            self._cmp[0] = compare
            self.win.Compare_and_swap([self._one, MPI.INT32_T], [self._cmp, MPI.INT32_T], [self._out, MPI.INT32_T],
                                      0, idx)
        self.win.Flush(0)
        return int(self._out[0])

    def _view(self, idx: int) -> np.ndarray:
        start = self.offsets[idx]
        shape = self.shapes[idx]
        return self.memory[start:start + int(np.prod(shape)) * self.dtype.itemsize].view(self.dtype).reshape(shape)

    def _ready(self, idx: int) -> np.ndarray:
        self.win.Sync()  # see what the filling rank wrote before it marked the block READY
        view = self._view(idx)
        view.flags.writeable = False
        return view

    def get(self, mi: int, pi: int):
        """Block (mi, pi) from the window, or None when this rank is to read it (it has claimed
        it: it must :meth:`put` it, or :meth:`release` its claims on failure)."""
        idx = self._index(mi, pi)
        if idx in self.mine:
            return None
        delay = 5e-5
        while True:
            state = self._atomic(idx, CLAIMED, compare=EMPTY)
            if state == EMPTY:
                self.mine.add(idx)
                return None
            if state == READY:
                return self._ready(idx)
            time.sleep(delay)  # a node-mate is reading it
            delay = min(2 * delay, WAIT_MAX_S)

    def put(self, mi: int, pi: int, q: np.ndarray) -> np.ndarray:
        """Copy block (mi, pi) into the window and mark it READY; returns the window's view."""
        idx = self._index(mi, pi)
        if q.dtype != self.dtype or q.shape != self.shapes[idx]:
            raise ValueError(f"block {(mi, pi)}: {q.dtype} {q.shape}, the window holds {self.dtype} {self.shapes[idx]}")
        if idx not in self.mine:
            if self._atomic(idx, CLAIMED, compare=EMPTY) != EMPTY:  # a node-mate has (or fills) it
                return q
            self.mine.add(idx)
        self._view(idx)[...] = q
        self.win.Sync()  # the block's bytes before its READY
        self._atomic(idx, READY)
        self.mine.discard(idx)
        return self._ready(idx)

    def release(self) -> None:
        """Give back the claims of blocks this rank failed to fill."""
        for idx in sorted(self.mine):
            self._atomic(idx, EMPTY)
        self.mine.clear()

    def free(self) -> None:
        self.memory = None
        self.win.Unlock_all()
        self.win.Free()


class WorkerCache(LRUCache):
    """A worker reader's cache. Quantised blocks (``("q", side, mi, pi)`` keys) live in the node's
    window when the side is shared (``shared``), else are not kept (the worker holds the blocks of
    its jobs itself: worker.WorkerState); raw blocks that the preparation's first pass keeps for
    its second stay private within ``budget`` bytes, so a worker reads its share once."""

    def __init__(self, budget: int, shared: SharedBlocks | None = None):
        super().__init__(budget)
        self.shared = shared

    def get(self, key):
        if key[0] == "q":
            return self.shared.get(key[2], key[3]) if self.shared is not None else None
        return super().get(key)

    def put(self, key, value: np.ndarray) -> np.ndarray:
        if key[0] == "q":
            return self.shared.put(key[2], key[3], value) if self.shared is not None else value
        return super().put(key, value)


class WorkerReader(OperandReader):
    """A worker's OperandReader (with a :class:`WorkerCache`): a worker never sends components,
    so its quantising pass encodes none for the wire (the master's does when they fit its cache)."""

    def _encode_now(self) -> bool:
        return False


class NodeShare:
    """The node communicator of the workers and the windows of the operands they share."""

    def __init__(self, node_comm, sides: dict):
        self.node_comm, self.sides = node_comm, sides  # side -> SharedBlocks

    def free(self) -> None:
        """Collective over the node's workers."""
        for side in sorted(self.sides):
            self.sides[side].free()
        self.sides = {}
        self.node_comm.Free()


def attach(comm, readers: dict, readable: set, cache_bytes: int) -> tuple:
    """Workers only, collectively (rank 0 takes no part): share the blocks of the inputs this node
    reads. ``readers``: ``{side: OperandReader}``; ``readable``: the sides this rank opened;
    ``cache_bytes``: each rank's block cache (the master's, ``--memory``/5). The readers' caches
    (:class:`WorkerCache`) of shared sides get the window. Returns ``(NodeShare or None, note)``:
    ``note`` is the node's log line on its first worker, None on the others."""
    from mpi4py import MPI

    workers = comm.Create_group(comm.Get_group().Excl([0]))
    node_comm = workers.Split_type(MPI.COMM_TYPE_SHARED)
    ranks = node_comm.allgather((comm.Get_rank(), sorted(readable)))
    workers.Free()
    first = ranks[0][0] == comm.Get_rank()
    node = f"worker rank(s) {','.join(str(r) for r, _ in ranks)} on {socket.gethostname()}"
    sides = [s for s in sorted(readers) if sum(s in mine for _, mine in ranks) >= 2]
    window = sum(layout(readers[s])[2] for s in sides)
    why = None
    if not node_comm.bcast(enabled(), root=0):
        why = "MPILAYER_NODE_SHARE=0"
    elif not sides:
        why = "no input read by two workers of this node"
    elif window > len(ranks) * cache_bytes:
        why = f"the blocks ({_mib(window)}) exceed the node's block caches ({_mib(len(ranks) * cache_bytes)})"
    shared = {}
    if why is None:
        try:
            for side in sides:
                shared[side] = SharedBlocks(node_comm, readers[side])
        except MPI.Exception as err:  # (collective: every rank of the node fails alike)
            for blocks in shared.values():
                blocks.free()
            shared, why = {}, f"no MPI shared memory: {err.Get_error_string()}"
    if why is not None:
        node_comm.Free()
        note = f"{node}: each worker reads its own blocks ({why})"
        return None, note if first else None
    for side, blocks in shared.items():
        readers[side].cache.shared = blocks
    share = NodeShare(node_comm, shared)
    _LIVE.append(share)
    note = (f"{node}: {' and '.join(sides)} blocks in MPI shared memory ({_mib(window)}), "
            "read from the input once per node")
    return share, note if first else None


def free_all() -> None:
    """Free every share of this process (collective over each node's workers: call it where
    they all end, worker.serve_setups)."""
    while _LIVE:
        _LIVE.pop().free()


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
