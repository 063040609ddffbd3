"""``mpilayer example-stream``: random test data for ``mpilayer stream``.

A (M x K) in A_FILE:/A and the stream X (T x K x B, or T x K with ``--shape M,K``) in
X_FILE:/X, chunked one item per chunk. Integers cover their dtype's full range; floats are
standard normals. The same arguments always give the same bytes.
"""
from __future__ import annotations

import os

import numpy as np

from mpilayer.errors import InputError
from mpilayer.io.h5io import atomic_h5_file, check_output_path


def write_example_stream(a_path, x_path, shape, items: int, dtype="int8", seed: int = 0, force: bool = False):
    """Write A and X; returns the ``FILE:/DATASET`` specs."""
    if len(shape) not in (2, 3) or min(shape) < 1 or items < 1:
        raise InputError(f"example-stream: --shape must be M,K or M,K,B and --items >= 1; got {shape}, {items}")
    dt = np.dtype(dtype)
    if os.path.abspath(a_path) == os.path.abspath(x_path):
        raise InputError(f"{a_path}: A and X must go to different files")
    for path in (a_path, x_path):
        check_output_path(path, force)
    m, k = shape[0], shape[1]
    x_shape = (items, k) if len(shape) == 2 else (items, k, shape[2])
    rng_a, rng_x = (np.random.Generator(np.random.PCG64(s)) for s in np.random.SeedSequence(seed).spawn(2))
    _write(a_path, "/A", (m, k), dt, lambda ds: _fill(ds, rng_a, dt))
    _write(x_path, "/X", x_shape, dt, lambda ds: _fill(ds, rng_x, dt))
    return f"{a_path}:/A", f"{x_path}:/X"


def _fill(ds, rng, dt) -> None:
    for i in range(ds.shape[0]):
        ds[i] = _random(rng, ds.shape[1:], dt)


def _random(rng, shape, dt):
    if dt.kind == "f":
        return rng.standard_normal(shape).astype(dt)
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)


def _write(path, name, shape, dt, fill) -> None:
    with atomic_h5_file(path) as f:
        chunks = (1,) + tuple(shape[1:]) if len(shape) > 2 or name == "/X" else None
        ds = f.create_dataset(name, shape=shape, dtype=dt, chunks=chunks)
        ds.attrs["generator"] = "mpilayer.jobs.example_stream"
        fill(ds)

def run(args) -> int:
    a, x = write_example_stream(*args.output, args.shape, args.items, args.dtype, args.seed, force=args.force)
    if not args.quiet:
        print(f"wrote {a} and {x}")
    return 0
