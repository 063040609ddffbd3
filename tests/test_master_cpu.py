"""Rank 0's CPU (issue 15): the automatic tile of distributed results, the layout it is planned
for, and the preparation's collectives that rank 0 sleep-waits on (a real mpiexec)."""
import math
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mpirun import mpi_env, mpiexec_path, run_mpilayer

from mpilayer.core.partition import (DISTRIBUTED_TILE, TILE_ALIGN, TILE_MEMORY, TILES_PER_WORKER, default_tile,
                                     distributed_tile_side)
from mpilayer.io.distributed_store import AUTO_MIN_BYTES, planned_layout
from mpilayer.io.example_data import write_example
from mpilayer.io.result_store import _attr_value, write_attrs


def _tiles(m, n, side):
    return -(-m // side) * -(-n // side)


@pytest.mark.parametrize("m, n, workers, side", [(4096, 4096, 2, 1024), (3072, 3072, 2, 768),
                                                 (4096, 4096, 4, 768), (65536, 65536, 1024, 704),
                                                 (65536, 65536, 2, 2048), (1000, 1000, 2, 512)])
def test_distributed_tile_examples(m, n, workers, side):
    assert distributed_tile_side(m, n, workers) == side


@given(m=st.integers(1, 300_000), n=st.integers(1, 300_000), workers=st.integers(1, 5000))
def test_distributed_tile_gives_every_worker_its_tiles(m, n, workers):
    """Aligned, within the bounds, TILES_PER_WORKER tiles per worker unless the lower bound
    (many workers, small C) decided, and within one alignment step of the ideal square side."""
    side = distributed_tile_side(m, n, workers)
    assert DISTRIBUTED_TILE[0] <= side <= DISTRIBUTED_TILE[1] and side % TILE_ALIGN == 0
    if DISTRIBUTED_TILE[0] < side:
        assert _tiles(m, n, side) >= TILES_PER_WORKER * workers
    if DISTRIBUTED_TILE[0] < side < DISTRIBUTED_TILE[1]:
        ideal = (m * n / (TILES_PER_WORKER * workers)) ** 0.5
        assert ideal - TILE_ALIGN < side < ideal + TILE_ALIGN


@given(m=st.integers(1, 10**6), n=st.integers(1, 10**6), k=st.integers(1, 10**7),
       itemsize=st.sampled_from([1, 2]), memory=st.integers(32 * 2**20, 2**35), workers=st.integers(0, 4096))
def test_default_tile_with_workers_fits_the_budget(m, n, k, itemsize, memory, workers):
    tr, tc, kp = default_tile(m, n, k, itemsize, memory, workers)
    side = distributed_tile_side(m, n, workers) if workers else 512
    if side > 512:  # a larger tile's C fits in 1/8 of the budget (32 bytes an element), else 512 as before
        side = max(min(side, math.isqrt(memory // TILE_MEMORY) // TILE_ALIGN * TILE_ALIGN), 512)
        assert side == 512 or 32 * side * side <= memory // 8
    assert (tr, tc) == (min(side, m), min(side, n)) and 1 <= kp <= k
    if kp < k:
        assert 4 * itemsize * (tr + tc) * kp <= memory // 16 or kp == 64


def test_planned_layout_is_what_choose_layout_picks_when_workers_read():
    big, small = AUTO_MIN_BYTES, AUTO_MIN_BYTES - 1
    assert planned_layout("auto", 2, False, big) == "distributed"
    assert planned_layout("auto", 2, False, small) == "single"
    assert planned_layout("auto", 2, True, big) == "single"        # --code
    assert planned_layout("distributed", 0, False, big) == "single"  # refused later, with its error
    assert planned_layout("distributed", 2, False, small) == "distributed"
    assert planned_layout("single", 2, False, big) == "single"


def test_write_attrs_stores_what_h5py_stores(tmp_path):
    """The low-level attribute writes read back as h5py's own: values, types, HDF5 types, shapes."""
    items = {"text": "none", "count": 3, "seconds": 2.5, "flag": True, "np_flag": np.bool_(False),
             "widths": np.array([7, 1], dtype=np.int64), "shape": (512, 512), "empty": np.zeros(0),
             "names": ["a", "bc"], "table": {"x": 1}, "missing": None, "i32": np.int32(-4),
             "f32s": np.array([1.5, 2], dtype=np.float32)}
    with h5py.File(tmp_path / "slow.h5", "w") as f, h5py.File(tmp_path / "fast.h5", "w") as g:
        slow, fast = f.create_dataset("C", shape=(1,), dtype="f8"), g.create_dataset("C", shape=(1,), dtype="f8")
        for key, value in items.items():
            slow.attrs[key] = _attr_value(value)
        write_attrs(fast, items)
    with h5py.File(tmp_path / "slow.h5") as f, h5py.File(tmp_path / "fast.h5") as g:
        slow, fast = f["C"].attrs, g["C"].attrs
        assert sorted(slow) == sorted(fast) == sorted(items)
        for key in items:
            a, b = slow[key], fast[key]
            assert type(a) is type(b) and np.array_equal(np.asarray(a), np.asarray(b)), key
            assert slow.get_id(key).dtype == fast.get_id(key).dtype, key
            assert slow.get_id(key).shape == fast.get_id(key).shape, key


@pytest.mark.mpi
def test_sleep_allgather_is_allgather():
    """Three ranks gather objects of different sizes (one empty dict) in rank order, as
    ``comm.allgather`` does, and then a non-blocking reduction."""
    script = textwrap.dedent("""
        import numpy as np
        from mpi4py import MPI
        from mpilayer.mpi.parallel_prep import sleep_allgather, sleep_wait
        comm = MPI.COMM_WORLD
        rank = comm.Get_rank()
        mine = {} if rank == 0 else {"rank": rank, "text": "x" * (1000 * rank)}
        assert sleep_allgather(comm, mine) == comm.allgather(mine)
        total = np.array([rank + 0.5])
        sleep_wait(comm, [comm.Iallreduce(MPI.IN_PLACE, total, op=MPI.SUM)])
        assert total[0] == 4.5
        done = comm.gather(rank, root=0)
        if rank == 0:
            print("ok", done)
    """)
    proc = subprocess.run([mpiexec_path(), "-n", "3", sys.executable, "-c", script], capture_output=True,
                          text=True, timeout=60, env=mpi_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ok [0, 1, 2]\n"


@pytest.mark.mpi
def test_distributed_default_tile_is_bit_identical_to_512(tmp_path):
    """Without --tile a distributed result on 2 workers takes distributed_tile_side's tile
    (576 here: 16 tiles, not 25), and C is bit for bit the one of 512 x 512 tiles."""
    m, k, n = 2176, 200, 2176
    write_example(tmp_path / "a.h5", tmp_path / "b.h5", (m, k, n), "float32", 3)
    a, b = f"{tmp_path}/a.h5:/A", f"{tmp_path}/b.h5:/B"
    outs = {}
    for name, extra in (("auto", ()), ("t512", ("--tile", "512"))):
        outs[name] = tmp_path / f"{name}.h5"
        proc = run_mpilayer(3, "matmul", a, b, "-o", outs[name], "--layout", "distributed", "-q", *extra,
                            timeout=180)
        assert proc.returncode == 0, proc.stderr
    with h5py.File(outs["auto"]) as f, h5py.File(outs["t512"]) as g:
        side = distributed_tile_side(m, n, 2)
        assert side == 576 and list(f["C"].attrs["tile_shape"]) == [side, side]
        assert list(g["C"].attrs["tile_shape"]) == [512, 512]
        assert np.array_equal(f["C"][()].view(np.uint64), g["C"][()].view(np.uint64))
        for key in ("error_bound", "error_estimate", "resolution", "exact"):
            assert f["C"].attrs[key] == g["C"].attrs[key], key
