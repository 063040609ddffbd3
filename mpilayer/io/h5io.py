"""Reading input matrices from HDF5, tile by tile.

Rank 0 never holds a whole operand: it opens each input once
(:class:`MatrixSource`) and reads hyperslabs as tiles are needed. Every problem
a user can cause (missing file, wrong dataset, unsupported dtype, NaN, shape
mismatch, corrupt chunk) becomes an :class:`~mpilayer.errors.InputError` whose
one-line message names the file and dataset. No MPI here.
"""

import contextlib
import os

import h5py
import numpy as np

from mpilayer.errors import InputError, OutputError, one_line

__all__ = [
    "SUPPORTED_DTYPES",
    "MatrixSource",
    "atomic_h5_file",
    "check_chain",
    "check_finite",
    "open_h5",
    "parse_dataset_spec",
]

#: Input dtypes the quantiser handles exactly. uint8/uint16 are accepted because
#: every value fits int32; int64/uint32/uint64 are not, since their values may
#: exceed the quantiser's range and checking that would mean reading the whole
#: operand before starting.
SUPPORTED_DTYPES = tuple(
    np.dtype(name) for name in ("float32", "float64", "int8", "int16", "int32", "uint8", "uint16")
)

#: Raw-data chunk cache per open input: big enough that a row of tiles reuses
#: chunks that straddle tile borders instead of decompressing them again.
CHUNK_CACHE_BYTES = 64 * 2**20


def open_h5(path, mode="r", **kwargs):
    """Open an HDF5 file, tolerating file systems without lock support.

    Parallel file systems (Lustre, some NFS) often reject ``flock``; HDF5 then
    fails to open even a read-only file. ``locking="best-effort"`` keeps the
    protection where it works and ignores it where it does not.
    """
    try:
        return h5py.File(path, mode, locking="best-effort", **kwargs)
    except (TypeError, ValueError) as err:  # h5py/HDF5 too old for best-effort
        if "locking" not in str(err):
            raise
        return h5py.File(path, mode, **kwargs)


def check_output_path(path, force: bool) -> None:
    """Fail before any work if ``path`` cannot (or, without ``force``, may not) be written:
    one message for every command that writes a file."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise OutputError(f"cannot write {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: directory {directory} is not writable")
    if os.path.isdir(path):
        raise OutputError(f"cannot write {path}: it is a directory")
    if os.path.lexists(path) and not force:
        raise OutputError(f"{path} exists; pass --force to overwrite it")


@contextlib.contextmanager
def atomic_h5_file(path):
    """Write an HDF5 file under a temp name and rename it to ``path`` when the ``with`` block
    ends without error: readers (and a Ctrl-C) never see a half-written file."""
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}.h5")
    try:
        with open_h5(tmp, "w") as f:
            yield f
        os.replace(tmp, path)
    except OSError as err:
        raise OutputError(f"cannot write {path}: {one_line(err)}") from err
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def parse_dataset_spec(spec, default_dataset=None):
    """Split ``"FILE:/DATASET"`` into file and dataset path.

    Parameters
    ----------
    spec : str
        ``"a.h5:/group/A"``, or just ``"a.h5"`` when ``default_dataset`` is set.
        The split is at the last ``':'`` followed by ``'/'``, so file names that
        contain colons (``C:/data/a.h5:/A``) still work. A spec naming an
        existing file as a whole is taken as a file name.
    default_dataset : str, optional
        Dataset used when ``spec`` names none.

    Returns
    -------
    (str, str)
        The file path and the absolute dataset path (leading ``'/'``).

    Raises
    ------
    InputError
        If the file part is empty, or no dataset is given and there is no default.
    """
    spec = os.fspath(spec)
    cut = spec.rfind(":/")
    if cut >= 0 and not os.path.isfile(spec):
        path, dataset = spec[:cut], spec[cut + 1 :]
    else:
        path, dataset = spec, default_dataset
    if not path:
        raise InputError(f"{spec!r}: no file name before ':'; give it as FILE:/DATASET")
    if not dataset:
        raise InputError(f"{spec}: no dataset given; give it as FILE:/DATASET")
    if not dataset.startswith("/"):
        dataset = "/" + dataset
    return path, dataset


def check_finite(block, label, row0=0, col0=0):
    """Raise if a real-valued block holds NaN or Inf, naming the first position.

    Parameters
    ----------
    block : numpy.ndarray
        A 2-D block read from the dataset.
    label : str
        ``"file:/dataset"`` for the message.
    row0, col0 : int
        Position of ``block[0, 0]`` in the whole matrix, so the message gives
        the user's row and column, not the block's.

    Raises
    ------
    InputError
        ``"a.h5:/A: NaN or Inf at row i, column j"`` (0-based).
    """
    if block.dtype.kind != "f":
        return
    finite = np.isfinite(block)
    if finite.all():
        return
    i, j = np.argwhere(~finite)[0]
    value = block[i, j]
    raise InputError(f"{label}: NaN or Inf ({value}) at row {row0 + int(i)}, column {col0 + int(j)} (0-based)")


def _dtype_problem(dtype):
    """Return why ``dtype`` is unsupported, or None when it is fine."""
    if h5py.check_enum_dtype(dtype) is not None or dtype.kind == "b":
        return f"dtype {dtype} (enum/bool) is not supported; store numbers"
    if dtype.kind in "iuf" and dtype.newbyteorder("=") in SUPPORTED_DTYPES:
        return None
    advice = ""
    if dtype.kind in "iu":
        advice = "; convert it to int32 (if the values fit) or float64"
    elif dtype.kind == "f":
        advice = "; convert it to float32 or float64"
    supported = ", ".join(str(d) for d in SUPPORTED_DTYPES)
    return f"dtype {dtype} is not supported (supported: {supported}){advice}"


class MatrixSource:
    """A 2-D HDF5 dataset opened once and read by hyperslabs.

    Parameters
    ----------
    spec_or_path : str or os.PathLike
        ``"a.h5:/A"``, or a file path when ``dataset`` is given.
    dataset : str, optional
        Dataset path; overrides (or supplies) the one in ``spec_or_path``.
    chunk_cache_bytes : int, optional
        HDF5 raw-data chunk cache for this input (part of the run's memory budget).

    Attributes
    ----------
    path, dataset : str
        The file and the absolute dataset path.
    shape : tuple of int
    dtype : numpy.dtype
        The native-byte-order dtype that :meth:`read` returns.
    is_integer : bool
    chunks : tuple of int or None
        The dataset's chunk shape (None when contiguous); tiles aligned to it
        read fastest.
    label : str
        ``"a.h5:/A"``, for messages.

    Raises
    ------
    InputError
        At construction, for a missing/unreadable/non-HDF5 file, a missing
        dataset, a group, a dataset that is not 2-D or empty, or an unsupported
        dtype.
    """

    def __init__(self, spec_or_path, dataset=None, chunk_cache_bytes=CHUNK_CACHE_BYTES):
        spec_or_path = os.fspath(spec_or_path)
        if dataset is None:
            self.path, self.dataset = parse_dataset_spec(spec_or_path)
        else:
            self.path, self.dataset = spec_or_path, dataset if dataset.startswith("/") else "/" + dataset
        self.label = f"{self.path}:{self.dataset}"
        self._identity = _identity(self.path)
        self._file = _open_input(self.path, self.label, chunk_cache_bytes)
        try:
            self._ds = self._find_dataset()
            self._validate()
        except BaseException:
            self._file.close()
            raise
        self.shape = tuple(int(n) for n in self._ds.shape)
        self.dtype = self._ds.dtype.newbyteorder("=")
        self.is_integer = self.dtype.kind in "iu"
        self.chunks = self._ds.chunks

    def _find_dataset(self):
        """Look the dataset up, telling a missing object from a group."""
        try:
            obj = self._file.get(self.dataset)
        except (KeyError, OSError, RuntimeError, ValueError) as err:
            raise InputError(f"{self.label}: cannot open dataset ({one_line(err)})") from err
        if obj is None:
            raise InputError(f"{self.label}: no such dataset in {self.path}")
        if not isinstance(obj, h5py.Dataset):
            kind = "a group" if isinstance(obj, h5py.Group) else f"a {type(obj).__name__}"
            raise InputError(f"{self.label}: is {kind}, not a dataset")
        return obj

    def _validate(self):
        """Reject shapes and dtypes the multiplication cannot take."""
        shape = self._ds.shape
        if shape is None or len(shape) != 2:
            dims = "no dataspace" if shape is None else f"shape {tuple(shape)}"
            raise InputError(f"{self.label}: expected a 2-D matrix, found {dims}")
        if 0 in shape:
            raise InputError(f"{self.label}: matrix is empty (shape {shape[0]}x{shape[1]})")
        problem = _dtype_problem(self._ds.dtype)
        if problem:
            raise InputError(f"{self.label}: {problem}")

    def read(self, rows, cols):
        """Read the hyperslab ``[rows, cols]``, and only that, from the file.

        Parameters
        ----------
        rows, cols : slice
            Step 1 (or None); bounds are clipped like numpy slicing.

        Returns
        -------
        numpy.ndarray
            C-contiguous, in :attr:`dtype`, equal to ``matrix[rows, cols]``.

        Raises
        ------
        InputError
            If HDF5 fails to read (e.g. a corrupt or truncated chunk).
        """
        if self._file is None:
            raise ValueError(f"{self.label}: read after close()")
        r0, r1 = _clip(rows, self.shape[0])
        c0, c1 = _clip(cols, self.shape[1])
        out = np.empty((r1 - r0, c1 - c0), dtype=self.dtype)
        if out.size == 0:
            return out
        try:
            self._ds.read_direct(out, source_sel=np.s_[r0:r1, c0:c1])
        except (OSError, RuntimeError, ValueError, TypeError) as err:
            self.check_unchanged()
            raise InputError(
                f"{self.label}: cannot read rows {r0}:{r1}, columns {c0}:{c1} "
                f"(corrupt or unreadable file? {one_line(err)})"
            ) from err
        self.check_unchanged()  # after the read: a block read while the file changed is refused too
        return out

    def check_unchanged(self):
        """InputError if the file was modified, replaced or removed since it was opened (device,
        inode, size, mtime, ctime): a product mixing old and new data must never pass for exact."""
        if _identity(self.path) != self._identity:
            raise InputError(f"{self.label}: {self.path} changed during the run (modified, replaced or "
                             "removed); no result from it is published as complete")

    def check_finite(self, block, rows, cols):
        """Raise InputError naming row and column if ``block`` has NaN/Inf.

        ``rows`` and ``cols`` are the slices ``block`` was read with (or the
        block's first row and column as ints).
        """
        row0 = _clip(rows, self.shape[0])[0] if isinstance(rows, slice) else int(rows)
        col0 = _clip(cols, self.shape[1])[0] if isinstance(cols, slice) else int(cols)
        check_finite(block, self.label, row0, col0)

    def close(self):
        """Close the file; further reads raise."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"MatrixSource({self.label!r}, shape={self.shape}, dtype={self.dtype})"


def _clip(index, n):
    """Turn a step-1 slice into clipped ``(start, stop)`` like numpy does."""
    if not isinstance(index, slice):
        raise TypeError(f"expected a slice, got {type(index).__name__}")
    start, stop, step = index.indices(n)
    if step != 1:
        raise ValueError("only slices with step 1 can be read")
    return start, max(start, stop)


def _identity(path):
    """What changes when a file is rewritten or replaced (None if it is gone)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _open_input(path, label, chunk_cache_bytes=CHUNK_CACHE_BYTES):
    """Open ``path`` read-only, turning each failure into a one-line InputError."""
    if not os.path.exists(path):
        raise InputError(f"{label}: file {path} does not exist")
    if os.path.isdir(path):
        raise InputError(f"{label}: {path} is a directory, not an HDF5 file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{label}: cannot read {path}: permission denied")
    try:
        return open_h5(path, "r", rdcc_nbytes=chunk_cache_bytes, rdcc_nslots=10007)
    except PermissionError as err:
        raise InputError(f"{label}: cannot read {path}: permission denied") from err
    except OSError as err:
        if "signature" in str(err):
            raise InputError(f"{label}: {path} is not an HDF5 file") from err
        raise InputError(f"{label}: cannot open {path} (corrupt or unreadable: {one_line(err)})") from err


def check_chain(a, b):
    """Check that ``a @ b`` is defined.

    Parameters
    ----------
    a, b : MatrixSource
        The left and right operands.

    Raises
    ------
    InputError
        When A's column count differs from B's row count; names both labels
        and shapes.
    """
    (m, k), (k2, n) = a.shape, b.shape
    if k != k2:
        raise InputError(
            f"cannot multiply {a.label} ({m}x{k}) by {b.label} ({k2}x{n}): "
            f"A has {k} columns but B has {k2} rows"
        )
