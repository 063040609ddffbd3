"""A distributed result: tiles of C stay in the files the workers wrote, an index joins them.

Each worker writes every tile it computes at resolution r to its own small HDF5 file
(:func:`write_part`, atomically: temp file then rename), under ``<output>.parts/<run>/r<r>/``, and
sends the master only the tile's summary (bound, error sums, part file name). The master
publishes the output as a small *index file*, atomically per completed resolution like
:class:`result_store.ResultStore`: the tile maps, attributes and tables as in a single-file result,
and /C (and /resolutions/<r> with keep_all) as HDF5 *virtual datasets* mapping every tile to the
part file holding its published resolution (paths relative to the index). h5py, ``read_result``
and ``mpilayer info`` read it like an ordinary result; :func:`gather` turns it into one.

Part files are never rewritten: a tile at a new resolution is a new file, so a published index
stays valid while the run goes on, and a crash leaves the last published resolution readable.
A new run on the same output writes under a new ``<run>`` directory; when it starts, a worker
removes every part that neither the output as published nor the new run refers to
(:func:`stale_parts`), so between runs the parts take at most the published
output's tiles, and during a run also the tiles of its earlier resolutions (at most L x C).
"""
from __future__ import annotations

import os
import shutil
import time

import h5py
import numpy as np
from h5py import h5d, h5p, h5s, h5t

from mpilayer.errors import InputError, OutputError, one_line
from mpilayer.io.h5io import check_output_path, open_h5
from mpilayer.io.result_store import ResultStore, _fsync_path, timeline_array, write_attrs
from mpilayer.io.run_guard import remove_quietly

LAYOUT = "distributed"
PART_DATASET = "tile"
AUTO_MIN_BYTES = 64 * 2**20  # --layout auto: distributed from this size of C (as float64) up
                             # (read_result loads C up to this size by default)


def choose_layout(requested: str, workers: int, worker_reads: dict, coded: bool, c_bytes: int) -> str:
    """``"single"`` or ``"distributed"`` for ``--layout``; InputError if distributed is asked for
    and the run cannot be: workers must read both inputs (they read their blocks, and their
    tiles' estimates need the operands' statistics), and no ``--code`` (parity results are
    combined on rank 0)."""
    why = None
    if workers < 1:
        why = "it needs worker ranks"
    elif len(worker_reads) < workers or not all(sides == {"A", "B"} for sides in worker_reads.values()):
        why = "every worker must open both inputs (shared files; MPILAYER_DATA_PLANE not 0)"
    elif coded:
        why = "not with --code"
    if requested == "distributed" and why:
        raise InputError(f"--layout distributed: {why}")
    if requested == "auto":
        return "distributed" if why is None and c_bytes >= AUTO_MIN_BYTES else "single"
    return requested


def planned_layout(requested: str, workers: int, coded: bool, c_bytes: int) -> str:
    """The layout :func:`choose_layout` will pick if every worker opens both inputs (known only
    after the preparation, which already needs the tile: partition.default_tile), without its
    errors: ``"single"`` where it would refuse."""
    readers = {rank: {"A", "B"} for rank in range(1, workers + 1)}
    try:
        return choose_layout(requested, workers, readers, coded, c_bytes)
    except InputError:
        return "single"


def parts_root(output: str) -> str:
    directory, name = os.path.split(os.path.abspath(output))
    return os.path.join(directory, f"{name}.parts")


def part_path(run_dir: str, r: int, tile: tuple) -> str:
    return os.path.join(run_dir, f"r{r}", f"t{tile[0]}_{tile[1]}.h5")


def write_part(path: str, tile: np.ndarray, sync: "PartSync | None" = None) -> None:
    """Write one tile to ``path`` atomically: a killed process never leaves a torn part (several
    copies of a re-issued job may write the same, bit-identical, tile: the last rename wins).
    With ``sync`` (the final resolution's tiles, which the durable final publish refers to) the
    file is handed to it to be fsynced in the background (:class:`PartSync`); earlier
    resolutions' parts are not fsynced, like a single file's intermediate publishes."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = None
    try:
        with open_h5(tmp, "w") as f:
            f.create_dataset(PART_DATASET, data=tile)
        if sync is not None:
            fd = os.open(tmp, os.O_RDONLY)  # this file's own inode, whatever is renamed onto path later
        os.replace(tmp, path)
    except OSError as err:
        if fd is not None:
            os.close(fd)
        remove_quietly(tmp)
        raise OutputError(f"cannot write result part {path}: {one_line(err)}") from err
    if sync is not None:
        sync.add(fd, path)


class PartSync:
    """fsync of a worker's final parts on a thread of its own.

    fsync waits for the disk (~25 ms per 8 MiB tile on the project's VM, 0.17 s of a 1.4 s
    n = 4096 run when each part waited for its own), while the worker has the next job to
    compute; so the parts are renamed into place at once, readable, and :meth:`wait`, before
    the worker acknowledges the stop, makes sure every one is on disk, and the directories
    naming them. The master's durable final publish comes after every acknowledgement, so it
    never refers to a part that is not on disk; a killed worker loses nothing either (the
    page cache outlives it)."""

    def __init__(self):
        self._pool = None
        self._pending = []  # (future, path)
        self._dirs = set()

    def add(self, fd: int, path: str) -> None:
        """Sync the open file ``fd`` (then close it), renamed to ``path``."""
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="mpilayer-part-sync")
        self._pending.append((self._pool.submit(_fsync_and_close, fd), path))
        self._dirs.add(os.path.dirname(path))

    def wait(self) -> None:
        """Block until every part added is on disk; OutputError naming the first that is not."""
        pending, dirs, self._pending, self._dirs = self._pending, self._dirs, [], set()
        failed = None
        for future, path in pending:
            try:
                future.result()
            except OSError as err:
                failed = failed or OutputError(f"cannot write result part {path}: {one_line(err)}")
        if failed is not None:
            raise failed
        for d in sorted(dirs):
            try:
                _fsync_path(d)
            except OSError as err:
                raise OutputError(f"cannot write result parts in {d}: {one_line(err)}") from err


def _fsync_and_close(fd: int) -> None:
    try:
        if os.environ.get("MPILAYER_FAULT") == "part-sync":  # failure-path tests
            raise OSError(5, "Input/output error (injected: MPILAYER_FAULT=part-sync)")
        os.fsync(fd)
    finally:
        os.close(fd)


class DistributedStore(ResultStore):
    """:class:`ResultStore`'s interface for a distributed result (module docstring).
    ``write_tile`` takes the part file of the tile instead of its values."""

    layout = LAYOUT

    def _create_working_file(self):
        """No working file: a run directory for the parts, unique to this run."""
        self.parts = {}      # (ti, tj) -> part file of its current resolution
        self.res_parts = {}  # r -> {(ti, tj): part file} (keep_all)
        root = parts_root(self.path)
        self.run_dir = os.path.join(root, f"run-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        try:
            os.makedirs(self.run_dir)
        except OSError as err:
            raise OutputError(f"cannot create {self.run_dir}: {one_line(err)}") from err
        self.run_rel = os.path.relpath(self.run_dir, os.path.dirname(self.path))
        return self.run_dir

    def write_tile(self, ti, tj, data, resolution, error_bound, part=None):
        """Record that tile ``(ti, tj)`` reached ``resolution`` and lies in ``part``."""
        self._check_open()
        if part is None:
            raise ValueError("a distributed result stores tiles as part files")
        if resolution < self.tile_resolution[ti, tj]:
            raise ValueError(f"tile ({ti}, {tj}) already at resolution {self.tile_resolution[ti, tj]}, "
                             f"got {resolution}")
        self.parts[ti, tj] = part
        if self.keep_all:
            self.res_parts.setdefault(int(resolution), {})[ti, tj] = part
        self.tile_resolution[ti, tj] = int(resolution)
        self.tile_error_bound[ti, tj] = float(error_bound)

    def publish(self, attrs=None, timeline=None, tables=None, durable=True):
        """Write the index file to a temp file and rename it onto the output (atomic)."""
        self._check_open()
        if self.before_publish is not None:
            self.before_publish()
        attrs, timeline, tables = dict(attrs or {}), list(timeline or []), dict(tables or {})
        seq = self.publish_seq + 1
        try:
            with open_h5(self.tmp_path, "w") as f:
                c = self._virtual_dataset(f, "C", self.parts)
                if self.keep_all:
                    group = f.create_group("resolutions")
                    for r, parts in sorted(self.res_parts.items()):
                        self._virtual_dataset(group, str(r), parts)
                f.create_dataset("tile_resolution", data=self.tile_resolution)
                f.create_dataset("tile_error_bound", data=self.tile_error_bound)
                own = {**self._own_attrs(seq), "layout": LAYOUT,
                       "parts": self.run_rel}
                write_attrs(c, {**self.static_attrs, **attrs, **own})
                for name, rows in {"timeline": timeline, **tables}.items():
                    if rows:
                        f.create_dataset(name, data=timeline_array(rows))
            if durable:
                _fsync_path(self.tmp_path)
            os.replace(self.tmp_path, self.path)
            if durable:
                _fsync_path(os.path.dirname(self.path))
        except (OSError, RuntimeError) as err:
            raise OutputError(f"cannot publish {self.path}: {one_line(err)}") from err
        finally:
            remove_quietly(self.tmp_path)
        self.publish_seq = seq
        self._last = (attrs, timeline, tables)

    def _virtual_dataset(self, parent, name: str, parts: dict):
        """C over ``parts`` as a virtual dataset ``parent[name]`` (tiles without a part read as 0).
        Built with h5py's low-level calls: its VirtualLayout parses a selection per tile, which
        made publishing a 64-tile index cost 10-11 ms of the master's CPU (now 7-7.5 ms)."""
        dcpl = h5p.create(h5p.DATASET_CREATE)
        dcpl.set_layout(h5d.VIRTUAL)
        dcpl.set_fill_value(np.zeros(1, dtype=self.dtype))
        space = h5s.create_simple(self.shape)
        dataset = PART_DATASET.encode()
        for (ti, tj), part in parts.items():
            rows, cols = self.tile_slices(ti, tj)
            shape = (rows.stop - rows.start, cols.stop - cols.start)
            space.select_hyperslab((rows.start, cols.start), shape)
            dcpl.set_virtual(space, self._relative(part).encode(), dataset, h5s.create_simple(shape))
        space.select_all()
        h5d.create(parent.id, name.encode(), h5t.py_create(self.dtype, logical=1), space, dcpl=dcpl)
        return parent[name]

    def _relative(self, part: str) -> str:
        """``part``'s path relative to the index (a string operation for this run's parts)."""
        if part.startswith(self.run_dir + os.sep):
            return self.run_rel + part[len(self.run_dir):]
        return os.path.relpath(part, os.path.dirname(self.path))

    def discard(self):
        """Remove the temp index (and this run's parts if nothing was published); never raises."""
        if self._file is not None and self.publish_seq == 0:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            try:
                os.rmdir(parts_root(self.path))  # if no other run's parts are left in it
            except OSError:
                pass
        self._file = None
        remove_quietly(self.tmp_path)
        if self._own_lock:
            self.lock.release()


def published_run(output: str):
    """The run directory of parts the output as published now refers to (None: no distributed
    output), read on the master when a run starts (one attribute: cheap)."""
    try:
        with open_h5(output, "r") as f:
            return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(output)), str(f["C"].attrs["parts"])))
    except (OSError, KeyError, ValueError):
        return None


def stale_parts(output: str, run_dir: str, published) -> list:
    """Part files and directories of earlier runs on ``output`` that no index refers to, for the
    run writing under ``run_dir``: the directories of all other runs but ``published`` (the one
    of the output as published when the run started: :func:`published_run`), and in that one the
    parts the output's index does not refer to. The output stays readable (should the run have
    published meanwhile, its index refers to ``run_dir`` only). A worker computes and removes
    them when the run starts (worker.serve_setups): the master is a control plane."""
    output = os.path.abspath(output)
    root, base = parts_root(output), os.path.dirname(output)
    keep, stale = {os.path.normpath(run_dir)}, []
    if published is not None:
        keep.add(published)
        try:
            with open_h5(output, "r") as f:
                datasets = [f["C"]] + (list(f["resolutions"].values()) if "resolutions" in f else [])
                used = {os.path.normpath(os.path.join(base, src.file_name))
                        for ds in datasets if ds.is_virtual for src in ds.virtual_sources()}
            for directory, _, names in os.walk(published):
                stale += [os.path.join(directory, n) for n in names if os.path.join(directory, n) not in used]
        except (OSError, KeyError, ValueError):
            pass  # the output went away or is no longer distributed: keep the directory whole
    try:
        runs = sorted(os.listdir(root))
    except OSError:
        runs = []
    return stale + [os.path.join(root, name) for name in runs
                    if name.startswith("run-") and os.path.join(root, name) not in keep]


def missing_parts(f) -> list:
    """Part files a distributed index refers to that do not exist (an ordinary result: [])."""
    c = f.get("C")
    if c is None or not c.is_virtual:
        return []
    base = os.path.dirname(os.path.abspath(f.filename))
    names = {src.file_name for src in c.virtual_sources()}
    return sorted(n for n in names if not os.path.exists(os.path.join(base, n)))


def gather(index: str, output: str, force: bool = False) -> None:
    """Copy a distributed result into one ordinary result file (atomically)."""
    output = os.path.abspath(output)
    check_output_path(output, force)
    tmp = os.path.join(os.path.dirname(output), f".{os.path.basename(output)}.tmp-{os.getpid()}.h5")
    try:
        with open_h5(index, "r") as src, open_h5(tmp, "w") as dst:
            missing = missing_parts(src)
            if missing:
                raise OutputError(f"{index}: {len(missing)} part file(s) missing, e.g. {missing[0]}")
            for name, obj in src.items():
                if isinstance(obj, h5py.Group):
                    group = dst.create_group(name)
                    for key, ds in obj.items():
                        _copy_dataset(ds, group, key)
                else:
                    _copy_dataset(obj, dst, name)
            dst["C"].attrs["layout"] = "single"
            if "parts" in dst["C"].attrs:
                del dst["C"].attrs["parts"]
        os.replace(tmp, output)
    except OSError as err:
        raise OutputError(f"cannot gather {index} into {output}: {one_line(err)}") from err
    finally:
        remove_quietly(tmp)


def _copy_dataset(ds, parent, name) -> None:
    """An ordinary copy of ``ds`` (a virtual one is read through), row block by row block."""
    if not ds.is_virtual:
        parent.copy(ds, name)
        return
    out = parent.create_dataset(name, shape=ds.shape, dtype=ds.dtype, chunks=True, fillvalue=0)
    step = max(1, (64 * 2**20) // max(1, ds.shape[1] * ds.dtype.itemsize))
    for r0 in range(0, ds.shape[0], step):
        out[r0:r0 + step] = ds[r0:r0 + step]
    for key, value in ds.attrs.items():
        out.attrs[key] = value
