"""Operands read where they live: workers read, quantise and encode their own blocks.

When the inputs are HDF5 files the workers can open (a shared filesystem), a job carries only
the keys of the blocks a worker lacks (``"reads"`` in its header) instead of their components:
the worker reads the hyperslab itself and quantises it with the scales and zero points every
rank computed together (parallel_prep.py), through the same :class:`operand_readers.OperandReader` code
as the master, so its blocks are bit-identical to master-sent ones. At start-up each worker
checks that the same path opens as the same file the master sees (dataset shape and dtype, file
size and mtime; inode and device may differ across nodes); a worker that cannot open an input
gets that operand's blocks from the master, and the log says so in one line naming the rank and
file.

The workers of a node share the blocks they read through MPI shared memory (node_share.py:
one read per node instead of one per worker; ``MPILAYER_NODE_SHARE=0`` turns that off, and the
log says per node which is used). Every worker counts the bytes it reads from the inputs
(:class:`CountingSource`, the ``bytes_read`` column of /ranks; summed over a ``host``: per node).

``MPILAYER_DATA_PLANE=0`` turns it off: rank 0 prepares the operands alone and sends every block
(``mpilayer bench master``'s ``master-sent`` path); ``MPILAYER_FAULT=no-input:RANK`` makes worker
RANK fail to open the inputs (tests).
"""
from __future__ import annotations

import os

import numpy as np

from mpilayer.errors import MpilayerError, one_line

SIDES = ("A", "B")


def enabled() -> bool:
    return os.environ.get("MPILAYER_DATA_PLANE", "1") != "0"


def describe(reader) -> dict:
    """What another rank needs to open one operand and cut it into the master's blocks."""
    source = reader.source
    st = os.stat(source.path)
    return {"path": os.path.abspath(source.path), "dataset": source.dataset, "label": source.label,
            "shape": tuple(source.shape), "dtype": source.dtype.str, "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "major": reader.majors[0].stop - reader.majors[0].start,
            "k_panel": reader.panels[0].stop, "scale_mode": reader.scale_mode,
            "chunk_cache": source._file.id.get_access_plist().get_cache()[2], "cache_bytes": reader.cache.budget}


class UnreadSource:
    """An input this rank could not open: its shape and dtype only (reads raise). The rank
    still knows the operand's blocks, scales and statistics, but never reads them."""

    def __init__(self, desc: dict):
        self.path, self.label = desc["path"], desc["label"]
        self.shape, self.dtype = tuple(desc["shape"]), np.dtype(desc["dtype"])
        self.is_integer = self.dtype.kind in "iu"

    def read(self, rows, cols):
        raise RuntimeError(f"{self.label}: not readable on this rank")


class CountingSource:
    """A MatrixSource that counts the bytes it reads (what a node reads from HDF5)."""

    def __init__(self, source):
        self._source = source
        self.bytes_read = 0

    def __getattr__(self, name):
        return getattr(self._source, name)

    def read(self, rows, cols):
        block = self._source.read(rows, cols)
        self.bytes_read += block.nbytes
        return block


def bytes_read(readers: dict) -> int:
    """Bytes this rank's readers read from the inputs so far."""
    return sum(getattr(r.source, "bytes_read", 0) for r in readers.values())


def open_readers(comm, spec: dict, split) -> tuple:
    """Open the inputs of ``spec`` (``{side: describe()}``) on this worker and share their blocks
    with the node's other workers where it can (node_share.attach, collective over the workers):
    ``({side: OperandReader}, {side: why it could not be opened}, log line of this node or None)``;
    an input that failed gets a reader on an :class:`UnreadSource`."""
    from mpilayer.mpi import node_share

    readers, problems = {}, {}
    injected = os.environ.get("MPILAYER_FAULT") == f"no-input:{comm.Get_rank()}"  # fallback tests
    for side in SIDES:
        desc = spec[side]
        try:
            if injected:
                raise OSError("cannot open it here (injected: MPILAYER_FAULT)")
            source = _open(desc)
        except (MpilayerError, OSError) as err:
            problems[side] = one_line(err)
            source = UnreadSource(desc)
        readers[side] = node_share.WorkerReader(source, side, split, desc["scale_mode"], desc["major"],
                                                desc["k_panel"], node_share.WorkerCache(desc["cache_bytes"]))
    _, note = node_share.attach(comm, readers, set(spec) - set(problems), spec["A"]["cache_bytes"])
    return readers, problems, note


def _open(desc: dict):
    from mpilayer.io.h5io import MatrixSource

    source = MatrixSource(desc["path"], desc["dataset"], chunk_cache_bytes=desc["chunk_cache"])
    st = os.stat(desc["path"])
    seen = (tuple(source.shape), source.dtype.str, st.st_size, st.st_mtime_ns)
    wanted = (tuple(desc["shape"]), desc["dtype"], desc["size"], desc["mtime_ns"])
    if seen != wanted:
        source.close()
        raise OSError(f"not the file the master sees (shape, dtype, size, mtime {seen} != {wanted})")
    return CountingSource(source)


def readable(readers: dict) -> dict:
    """The readers of the inputs this rank opened."""
    return {side: r for side, r in readers.items() if not isinstance(r.source, UnreadSource)}


def read_block(readers: dict, key: tuple) -> np.ndarray:
    """Worker side: block ``key`` = (side, major, panel) as ``q - z``, read from the input (or
    from the node's shared memory; a failed read gives back its claim there)."""
    side, mi, pi = key
    reader = readers[side]
    try:
        return reader.block(mi, pi)
    except BaseException:
        shared = getattr(reader.cache, "shared", None)
        if shared is not None:
            shared.release()
        raise
