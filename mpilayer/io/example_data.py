"""Example input matrices for demos and tests.

Matrices are generated and written one row block at a time, so any size can be
produced in bounded memory. Integer matrices cover the dtype's full range (the
extremes are where quantisers break); float matrices are scaled standard
normals. The same arguments always give the same bytes.
"""

import os

import numpy as np

from mpilayer.errors import InputError
from mpilayer.io.h5io import SUPPORTED_DTYPES, atomic_h5_file, check_output_path

__all__ = ["write_example", "BLOCK_BYTES"]

#: Upper bound on the size of one generated row block.
BLOCK_BYTES = 64 * 2**20
#: Target chunk size of the written datasets.
CHUNK_BYTES = 2**20


def write_example(
    a_path,
    b_path,
    shape=(1000, 1000, 1000),
    dtype="int8",
    seed=0,
    a_dataset="/A",
    b_dataset="/B",
    force=False,
    scale=1.0,
):
    """Write random A (M x K) and B (K x N) to HDF5.

    Parameters
    ----------
    a_path, b_path : str or os.PathLike
        Output files; when equal, both datasets go into that one file.
    shape : (int, int, int)
        ``(M, K, N)``.
    dtype : str or numpy dtype
        One of :data:`mpilayer.io.h5io.SUPPORTED_DTYPES`.
    seed : int
        Same seed, same matrices.
    a_dataset, b_dataset : str
        Dataset paths.
    force : bool
        Overwrite existing files (the whole file is replaced).
    scale : float
        Standard deviation of float entries (ignored for integers).

    Returns
    -------
    (str, str)
        ``"a.h5:/A"``, ``"b.h5:/B"`` specs for :class:`~mpilayer.io.h5io.MatrixSource`.

    Raises
    ------
    InputError
        For a bad shape, dtype or dataset names.
    OutputError
        If a file exists without ``force`` or cannot be written.
    """
    m, k, n = _shape(shape)
    dtype = _dtype(dtype)
    a_path, b_path = os.fspath(a_path), os.fspath(b_path)
    a_dataset, b_dataset = _absolute(a_dataset), _absolute(b_dataset)
    same_file = os.path.abspath(a_path) == os.path.abspath(b_path)
    if same_file and a_dataset == b_dataset:
        raise InputError(f"{a_path}: A and B would both be written to dataset {a_dataset}")
    for path in dict.fromkeys([a_path, b_path]):  # A first, once if shared
        check_output_path(path, force)

    seed_a, seed_b = np.random.SeedSequence(seed).spawn(2)
    matrices = [(a_path, a_dataset, (m, k), seed_a), (b_path, b_dataset, (k, n), seed_b)]
    if same_file:
        _write_file(a_path, matrices, dtype, scale)
    else:
        for matrix in matrices:
            _write_file(matrix[0], [matrix], dtype, scale)
    return f"{a_path}:{a_dataset}", f"{b_path}:{b_dataset}"


def _shape(shape):
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise InputError(f"example shape must be three positive integers M, K, N; got {shape!r}")
    return dims


def _dtype(dtype):
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt not in SUPPORTED_DTYPES:
        names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise InputError(f"example dtype {dtype!r} is not supported (choose from {names})")
    return dt


def _absolute(dataset):
    dataset = str(dataset)
    return dataset if dataset.startswith("/") else "/" + dataset


def _write_file(path, matrices, dtype, scale):
    """Write into a temp file, then rename: no half-written inputs on Ctrl-C."""
    with atomic_h5_file(path) as f:
        for _, dataset, shape, seed in matrices:
            _write_matrix(f, dataset, shape, dtype, seed, scale)


def _write_matrix(f, dataset, shape, dtype, seed, scale):
    rows, cols = shape
    ds = f.create_dataset(dataset, shape=shape, dtype=dtype, chunks=_chunks(shape, dtype))
    ds.attrs["generator"] = "mpilayer.io.example_data"
    ds.attrs["seed_entropy"] = str(seed.entropy)
    block_rows = max(1, min(rows, BLOCK_BYTES // (cols * dtype.itemsize)))
    rng = np.random.Generator(np.random.PCG64(seed))
    for r0 in range(0, rows, block_rows):
        r1 = min(rows, r0 + block_rows)
        ds[r0:r1, :] = _random_block(rng, (r1 - r0, cols), dtype, scale)


def _chunks(shape, dtype):
    """Square power-of-two chunks of about CHUNK_BYTES, clipped to the matrix."""
    side = 1
    while (2 * side) ** 2 * dtype.itemsize <= CHUNK_BYTES:
        side *= 2
    return tuple(min(side, n) for n in shape)


def _random_block(rng, shape, dtype, scale):
    if dtype.kind == "f":
        block = rng.standard_normal(shape, dtype=dtype)
        block *= dtype.type(scale)
        return block
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
