"""Crash-safe storage of the product C.

The master writes tiles of C into a *working file* as they finish a resolution
and, after each completed global resolution, *publishes*: the closed working
file is copied to a temp file in the output directory, the run's attributes
and timeline are added to the copy, the copy is fsynced and ``os.replace``\\ d
onto the output path, then the directory is fsynced. Readers of the output
therefore see the previous or the new published state, never a torn file,
whatever process is killed when. With ``force``, a previous output stays until
the first publish replaces it. The store holds ``<output>.lock``
(run_guard.OutputLock) from before it touches any scratch file until
:meth:`discard`, so two runs never share the scratch files, and leftovers of
killed runs are removed when the lock is taken.

Layout of a result file::

    /C                 (M, N) int64 or float64, chunked by tile, fill value 0;
                       attributes = run attributes + the store's own (below)
    /tile_resolution   int16 (tile rows, tile cols), -1 = not computed yet
    /tile_error_bound  float64, certified max |C - exact| per tile, inf unset
    /resolutions/<r>   (keep_all) C's tiles as they were at resolution r
    /timeline          compound table, one row per timeline entry
"""

import json
import numbers
import os
import shutil

import h5py
import numpy as np
from h5py import h5a, h5s, h5t

from mpilayer.errors import InputError, OutputError, one_line
from mpilayer.io.h5io import check_output_path, open_h5
from mpilayer.io.run_guard import OutputLock, check_not_input, remove_quietly

__all__ = ["FORMAT", "ResultStore", "read_result", "timeline_array"]

FORMAT = "mpilayer-result"
FORMAT_VERSION = 1
#: HDF5 refuses chunks of 4 GiB or more; stay well below.
MAX_CHUNK_BYTES = 2**30
#: read_result loads /C only up to this size unless told otherwise.
DEFAULT_MAX_C_BYTES = 64 * 2**20


class ResultStore:
    """Working file for C plus atomic publication to ``path``.

    Parameters
    ----------
    path : str or os.PathLike
        The output file.
    shape : (int, int)
        Shape of C.
    dtype : numpy dtype
        int64 or float64 (any signed integer or float dtype is accepted).
    tile_shape : (int, int)
        Tile size; the last tile row/column may be smaller. /C is chunked by
        tile (clipped to the matrix) so a tile write touches one chunk.
    n_resolutions : int
        Resolutions are numbered ``0 .. n_resolutions - 1``.
    attrs : dict
        Run attributes (inputs, bits, split, ...) written at every publish;
        the attributes given to :meth:`publish` are added to (and override) them.
    keep_all : bool
        Also keep each tile as it was at every resolution, in /resolutions/<r>.
    tile_source : callable, optional
        ``tile_source(ti, tj) -> array``: the tile's current estimate. With it, /C
        is not kept in the working file: every publish writes all tiles that
        have a resolution straight from the source into the copy, so C is
        written once per publish instead of once per tile update plus once per
        copy (``write_tile`` then only needs ``data`` for ``keep_all``).
    force : bool
        Allow replacing an existing ``path``. The old file stays until the first
        publish replaces it atomically, so a run that fails before then leaves it.
    inputs : sequence of paths
        Files the run reads: ``path`` must not be one of them or a link to one.
    lock : run_guard.OutputLock, optional
        The output's lock, taken by the caller (which then releases it); without
        it the store takes its own and releases it in :meth:`discard`.
    before_publish : callable, optional
        Called before every publish; raise there to refuse publishing (e.g. an
        input changed under the run).

    Raises
    ------
    OutputError
        If the output directory is missing or not writable, ``path`` exists
        and ``force`` is false, ``path`` is an input, another run holds the
        output's lock, or the working file cannot be created.

    Attributes
    ----------
    grid : (int, int)
        Number of tile rows and tile columns.
    tile_resolution, tile_error_bound : numpy.ndarray
        In-memory tile maps (read them, do not write them); published with /C.
    publish_seq : int
        Number of successful publishes so far.
    work_path, tmp_path : str
        The scratch files.

    Notes
    -----
    Besides the run's attributes, every published /C carries ``format``,
    ``format_version``, ``n_resolutions``, ``tile_shape``, ``publish_seq``
    (1, 2, ...), ``min_tile_resolution`` and ``max_tile_error_bound``, computed
    from the same tile maps that are published, so they always agree.
    """

    layout = "single"  # C in the output file itself (distributed_store.DistributedStore: "distributed")

    def __init__(self, path, shape, dtype, tile_shape, n_resolutions, attrs=None, keep_all=False, force=False,
                 tile_source=None, inputs=(), lock=None, before_publish=None):
        self.path = os.path.abspath(os.fspath(path))
        self.shape = _pair(shape, "shape")
        self.tile_shape = _pair(tile_shape, "tile_shape")
        self.dtype = np.dtype(dtype)
        if self.dtype.kind not in "if":
            raise ValueError(f"result dtype must be a signed integer or float, not {self.dtype}")
        self.n_resolutions = int(n_resolutions)
        if not 0 < self.n_resolutions <= np.iinfo(np.int16).max:
            raise ValueError(f"n_resolutions must be in 1..32767, got {n_resolutions}")
        self.keep_all = bool(keep_all)
        self.tile_source = tile_source
        self.static_attrs = dict(attrs or {})
        self.grid = tuple(-(-n // t) for n, t in zip(self.shape, self.tile_shape))
        self.tile_resolution = np.full(self.grid, -1, dtype=np.int16)
        self.tile_error_bound = np.full(self.grid, np.inf)
        self.publish_seq = 0
        self._last = ({}, [], {})
        self.before_publish = before_publish
        self._file = None

        directory, name = os.path.split(self.path)
        self.work_path = os.path.join(directory, f".{name}.work.h5")
        self.tmp_path = os.path.join(directory, f".{name}.tmp-{os.getpid()}.h5")
        check_output_path(self.path, force)
        check_not_input(self.path, inputs)
        self._own_lock = lock is None
        self.lock = OutputLock(self.path) if lock is None else lock  # before touching any scratch file
        try:
            self.lock.remove_stale_scratch()
            self._file = self._create_working_file()
        except BaseException:
            self.discard()
            raise

    # -- construction -----------------------------------------------------

    def _create_working_file(self):
        """Create the scratch HDF5 next to the output (same FS: atomic rename)."""
        try:
            f = open_h5(self.work_path, "w")
        except OSError as err:
            raise OutputError(f"cannot create working file {self.work_path}: {one_line(err)}") from err
        try:
            f.create_dataset("C", **self._c_layout())
            f.create_dataset("tile_resolution", data=self.tile_resolution)
            f.create_dataset("tile_error_bound", data=self.tile_error_bound)
            if self.keep_all:
                f.create_group("resolutions")
        except (OSError, RuntimeError) as err:
            _close_quietly(f)
            raise OutputError(f"cannot write working file {self.work_path}: {one_line(err)}") from err
        return f

    def _c_layout(self):
        """Dataset keywords shared by /C and /resolutions/<r>."""
        return dict(shape=self.shape, dtype=self.dtype, chunks=self._chunk_shape(), fillvalue=0)

    def _chunk_shape(self):
        """One chunk per tile, clipped to C and halved until HDF5 accepts it."""
        rows, cols = (max(1, min(t, n)) for t, n in zip(self.tile_shape, self.shape))
        while rows * cols * self.dtype.itemsize > MAX_CHUNK_BYTES:
            if rows >= cols:
                rows = -(-rows // 2)
            else:
                cols = -(-cols // 2)
        return rows, cols

    # -- writing ----------------------------------------------------------

    def tile_slices(self, ti, tj):
        """Rows and columns of C covered by tile ``(ti, tj)``."""
        if not (0 <= ti < self.grid[0] and 0 <= tj < self.grid[1]):
            raise IndexError(f"tile ({ti}, {tj}) outside the {self.grid[0]}x{self.grid[1]} tile grid")
        (tr, tc), (m, n) = self.tile_shape, self.shape
        return slice(ti * tr, min((ti + 1) * tr, m)), slice(tj * tc, min((tj + 1) * tc, n))

    def write_tile(self, ti, tj, data, resolution, error_bound):
        """Store a tile's estimate at ``resolution`` in the working file.

        Parameters
        ----------
        ti, tj : int
            Tile row and column.
        data : array_like
            The tile's values, of the tile's (clipped) shape; must cast to the
            store's dtype without changing kind (no float data into int64).
        resolution : int
            ``0 .. n_resolutions - 1``; must not go below the tile's current one.
        error_bound : float
            Certified bound on ``max |tile - exact|`` (>= 0, may be inf).

        Notes
        -----
        Nothing becomes visible in ``path`` until the next :meth:`publish`.
        """
        self._check_open()
        rows, cols = self.tile_slices(ti, tj)
        if data is None and self.tile_source is not None and not self.keep_all:
            data = np.zeros((0, 0), self.dtype)  # the maps only; /C comes from tile_source
        data = np.asarray(data)
        expected = (rows.stop - rows.start, cols.stop - cols.start)
        if data.size and data.shape != expected or data.size == 0 and self.tile_source is None:
            raise ValueError(f"tile ({ti}, {tj}) must have shape {expected}, got {data.shape}")
        if not np.can_cast(data.dtype, self.dtype, "same_kind"):
            raise ValueError(f"cannot store {data.dtype} tile in a {self.dtype} result")
        resolution = int(resolution)
        if not 0 <= resolution < self.n_resolutions:
            raise ValueError(f"resolution {resolution} outside 0..{self.n_resolutions - 1}")
        if resolution < self.tile_resolution[ti, tj]:
            raise ValueError(
                f"tile ({ti}, {tj}) already at resolution {self.tile_resolution[ti, tj]}, got {resolution}"
            )
        if not float(error_bound) >= 0:
            raise ValueError(f"error bound must be >= 0, got {error_bound}")
        if data.size:
            block = np.ascontiguousarray(data, dtype=self.dtype)
            try:
                if self.tile_source is None:
                    self._file["C"].write_direct(block, dest_sel=np.s_[rows, cols])
                if self.keep_all:
                    self._resolution_dataset(resolution).write_direct(block, dest_sel=np.s_[rows, cols])
            except (OSError, RuntimeError) as err:
                raise OutputError(f"cannot write working file {self.work_path}: {one_line(err)}") from err
        self.tile_resolution[ti, tj] = resolution
        self.tile_error_bound[ti, tj] = float(error_bound)

    def _resolution_dataset(self, resolution):
        """``/resolutions/<r>``, created when the first tile reaches r."""
        group = self._file["resolutions"]
        name = str(resolution)
        if name not in group:
            group.create_dataset(name, **self._c_layout())
        return group[name]

    # -- publishing -------------------------------------------------------

    def publish(self, attrs=None, timeline=None, tables=None, durable=True):
        """Make the current state the content of ``path``, atomically.

        Parameters
        ----------
        attrs : dict, optional
            Attributes of this state (resolution, stopped_by, elapsed_s, ...),
            written on /C over the constructor's ``attrs``. Values may be str,
            int, float, bool, None (stored as ``"none"``), sequences, numpy
            arrays, or dicts (stored as JSON).
        timeline : list of dict, optional
            Rows of /timeline; all dicts should share keys (missing ones are
            filled with None). Numbers, bools, strings and None are allowed.

        tables : dict of list of dict, optional
            More tables like /timeline (e.g. ``{"ranks": rows}``).
        durable : bool
            fsync the copy and the directory. The replace is atomic either way, so
            a killed process never leaves a torn file; fsync also survives a crash
            of the machine, at the cost of waiting for the disk.

        Raises
        ------
        OutputError
            If the copy cannot be written or renamed; ``path`` then still holds
            the previous state.
        """
        self._check_open()
        if self.before_publish is not None:
            self.before_publish()
        attrs = dict(attrs or {})
        timeline = list(timeline or [])
        tables = dict(tables or {})
        seq = self.publish_seq + 1
        try:
            self._close_working_file()
            shutil.copyfile(self.work_path, self.tmp_path)
            self._finish_copy(self.tmp_path, attrs, {"timeline": timeline, **tables}, seq)
            if durable:
                _fsync_path(self.tmp_path)
            os.replace(self.tmp_path, self.path)
            if durable:
                _fsync_path(os.path.dirname(self.path))
        except (OSError, RuntimeError) as err:  # h5py reports HDF5 failures (ENOSPC, EIO) as either
            raise OutputError(f"cannot publish {self.path}: {one_line(err)}") from err
        finally:
            remove_quietly(self.tmp_path)  # gone already after a successful replace
            self._reopen_working_file()
        self.publish_seq = seq
        self._last = (attrs, timeline, tables)

    def _close_working_file(self):
        """Write the tile maps and close, so the file on disk is complete."""
        try:
            self._file["tile_resolution"][...] = self.tile_resolution
            self._file["tile_error_bound"][...] = self.tile_error_bound
        finally:
            self._file.close()

    def _reopen_working_file(self):
        """After a publish (or a failed one), reopen the working file for the next tiles."""
        if self._file:  # still open (h5py File objects are falsy once closed)
            return
        try:
            self._file = open_h5(self.work_path, "r+")
        except OSError as err:
            self._file = None
            self.discard()
            raise OutputError(f"cannot reopen working file {self.work_path}: {one_line(err)}") from err

    def _finish_copy(self, tmp_path, attrs, tables, seq):
        """Add attributes and tables (/timeline, /ranks, ...) to the copy about to be published."""
        with open_h5(tmp_path, "r+") as f:
            if self.tile_source is not None:
                self._write_tiles(f["C"])
            write_attrs(f["C"], {**self.static_attrs, **attrs, **self._own_attrs(seq)})
            for name, rows in tables.items():
                if rows:
                    f.create_dataset(name, data=timeline_array(rows))

    def _write_tiles(self, dataset):
        """Every tile that has a resolution, from ``tile_source``, into the copy's /C.

        When tiles and chunks coincide (the usual case), each tile is written as a raw chunk
        (``H5Dwrite_chunk``: no selection, conversion or filter pipeline; twice as fast); an
        edge tile is padded to the chunk, the padding lying outside the dataset.
        """
        chunk = dataset.chunks
        aligned = chunk == tuple(min(t, n) for t, n in zip(self.tile_shape, self.shape))
        for ti, tj in zip(*np.nonzero(self.tile_resolution >= 0)):
            rows, cols = self.tile_slices(ti, tj)
            block = np.ascontiguousarray(self.tile_source(int(ti), int(tj)), dtype=self.dtype)
            if not aligned:
                dataset.write_direct(block, dest_sel=np.s_[rows, cols])
                continue
            if block.shape != chunk:
                padded = np.zeros(chunk, dtype=self.dtype)
                padded[: block.shape[0], : block.shape[1]] = block
                block = padded
            dataset.id.write_direct_chunk((rows.start, cols.start), memoryview(block).cast("B"))

    def _own_attrs(self, seq):
        """Attributes the store guarantees, derived from the published maps."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "n_resolutions": self.n_resolutions,
            "tile_shape": np.array(self.tile_shape, dtype=np.int64),
            "publish_seq": seq,
            "min_tile_resolution": int(self.tile_resolution.min()),
            "max_tile_error_bound": float(self.tile_error_bound.max()),
        }

    # -- ending -----------------------------------------------------------

    def close(self, attrs=None, timeline=None, tables=None):
        """Publish a final time and remove the scratch files.

        ``attrs``/``timeline`` default to those of the last publish.
        """
        if self._file is None:
            return
        last_attrs, last_timeline, last_tables = self._last
        self.publish(last_attrs if attrs is None else attrs, last_timeline if timeline is None else timeline,
                     last_tables if tables is None else tables)
        self.discard()

    def discard(self):
        """Remove the scratch files without publishing (``path`` keeps the last
        published state) and release the lock if the store took it. Used on
        errors too, so it never raises; safe to call twice."""
        if self._file is not None:
            _close_quietly(self._file)
            self._file = None
        remove_quietly(self.work_path)
        remove_quietly(self.tmp_path)
        if self._own_lock:
            self.lock.release()

    def _check_open(self):
        if self._file is None:
            raise ValueError(f"result store for {self.path} is closed")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        """Leave the last published state and no scratch; publishing a final
        state is :meth:`close`'s job, which needs the run's attributes."""
        self.discard()


# -- helpers ---------------------------------------------------------------


def _pair(value, what):
    """Two positive ints, or ValueError (a caller bug, not a user error)."""
    pair = tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{what} must be two positive integers, got {value!r}")
    return pair


def _close_quietly(h5file):
    """Close an h5py file whose last writes may fail (full disk): the error is already reported."""
    try:
        h5file.close()
    except Exception:  # noqa: BLE001 - closing is best effort on an error path
        pass


def _fsync_path(path):
    """fsync a file or directory by name (the rename is durable only then)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_attrs(obj, items: dict) -> None:
    """Attributes ``items`` (converted by :func:`_attr_value`) of ``obj``, which has none of them
    yet. Strings, numbers and 1-D numeric arrays go through h5py's low-level calls, stored as
    ``obj.attrs[key] = value`` stores them (read back equal, same HDF5 types): its attribute
    manager cost 60-70 us per attribute, about half of a 48-attribute publish of an index file
    on the master."""
    text = h5py.string_dtype()
    text_tid, scalar = h5t.py_create(text, logical=True), h5s.create(h5s.SCALAR)  # shared: each h5py id costs
    for key, value in items.items():
        value = _attr_value(value)
        if isinstance(value, str):
            tid, data = text_tid, np.array(value, dtype=text)
        else:
            data = np.asarray(value)
            if data.dtype.kind not in "biuf" or data.ndim > 1:
                obj.attrs[key] = value
                continue
            tid = h5t.py_create(data.dtype)
        space = scalar if data.ndim == 0 else h5s.create_simple(data.shape)
        h5a.create(obj.id, key.encode(), tid, space).write(np.ascontiguousarray(data))


def _attr_value(value):
    """Convert a Python value to something h5py stores as an attribute."""
    if value is None:
        return "none"
    if isinstance(value, dict):
        return json.dumps(value, default=str)
    if isinstance(value, np.ndarray) and value.dtype.kind in "US":
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if any(isinstance(v, (str, bytes)) for v in value):
            return np.array([_python_value(v) for v in value], dtype=h5py.string_dtype())
        return np.asarray(value)
    return value


def timeline_array(rows):
    """Turn a list of dicts into a structured array for an HDF5 compound table.

    Column types follow the values: all bool -> bool, all int -> int64, any
    float -> float64 (None -> NaN), any str -> UTF-8 string (None -> "none").
    Keys missing from some rows count as None.
    """
    keys = list(dict.fromkeys(k for row in rows for k in row))
    columns = {key: [row.get(key) for row in rows] for key in keys}
    fields = [(key, _column_dtype(values)) for key, values in columns.items()]
    table = np.empty(len(rows), dtype=fields)
    for key, dtype in fields:
        table[key] = [_cell(v, dtype) for v in columns[key]]
    return table


def _column_dtype(values):
    present = [v for v in values if v is not None]
    if any(isinstance(v, (str, bytes)) or not isinstance(v, (numbers.Number, np.bool_)) for v in present):
        return h5py.string_dtype()
    if not present:
        return h5py.string_dtype()
    if all(isinstance(v, (bool, np.bool_)) for v in present) and len(present) == len(values):
        return np.dtype(bool)
    if all(isinstance(v, numbers.Integral) for v in present) and len(present) == len(values):
        return np.dtype(np.int64)
    return np.dtype(np.float64)


def _cell(value, dtype):
    if dtype.kind == "O":
        if isinstance(value, bytes):
            return value.decode("utf-8", "replace")
        return "none" if value is None else str(value)
    if value is None:
        return np.nan
    return value


# -- reading -----------------------------------------------------------------


def read_result(path, max_c_bytes=DEFAULT_MAX_C_BYTES):
    """Read a published result file.

    Parameters
    ----------
    path : str or os.PathLike
    max_c_bytes : int
        /C is loaded only if it is at most this big (pass 0 to skip it);
        otherwise ``result["C"]`` is None and callers read it with h5py.

    Returns
    -------
    dict
        ``attrs`` (dict of Python values), ``shape``, ``dtype``, ``C``
        (ndarray or None), ``tile_resolution``, ``tile_error_bound``,
        ``timeline`` (structured array with str fields, or None when absent),
        ``resolutions`` (sorted list of r kept under /resolutions).

    Raises
    ------
    InputError
        For a missing or unreadable file, or one without /C.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such result file")
    try:
        with open_h5(path, "r") as f:
            return _read_open_result(f, path, max_c_bytes)
    except InputError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError) as err:
        raise InputError(f"{path}: cannot read result file ({one_line(err)})") from err


def _read_open_result(f, path, max_c_bytes):
    from mpilayer.io.distributed_store import missing_parts

    c = f.get("C")
    if not isinstance(c, h5py.Dataset):
        raise InputError(f"{path}: not an mpilayer result (no /C dataset)")
    missing = missing_parts(f)  # a distributed result whose part files are gone would read as zeros
    if missing:
        raise InputError(f"{path}: {len(missing)} part file(s) of this distributed result are missing, "
                         f"e.g. {missing[0]}")
    nbytes = int(np.prod(c.shape)) * c.dtype.itemsize
    result = {
        "attrs": {key: _python_value(value) for key, value in c.attrs.items()},
        "shape": tuple(int(n) for n in c.shape),
        "dtype": c.dtype,
        "C": c[...] if nbytes <= max_c_bytes else None,
        "tile_resolution": f["tile_resolution"][...] if "tile_resolution" in f else None,
        "tile_error_bound": f["tile_error_bound"][...] if "tile_error_bound" in f else None,
        "timeline": _decode_table(f["timeline"][...]) if "timeline" in f else None,
        "ranks": _decode_table(f["ranks"][...]) if "ranks" in f else None,
        "resolutions": sorted(int(k) for k in f["resolutions"]) if "resolutions" in f else [],
    }
    return result


def _python_value(value):
    """h5py attribute value -> plain Python (str, int, float, bool, tuple)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return tuple(_python_value(v) for v in value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def _decode_table(table):
    """Replace bytes in object fields by str so callers can compare to str."""
    for name in table.dtype.names or ():
        if table.dtype[name].kind == "O":
            table[name] = [_python_value(v) for v in table[name]]
    return table
