"""The preparation pass over the operands, serially (parallel_prep.py's arithmetic, no MPI):
shares, one read per share, and bit-identical sums, blocks and errors whichever way the
blocks are read (per block, or B's k-panels as one hyperslab over a share's columns)."""

import h5py
import numpy as np
import pytest

from mpilayer.core.components import ComponentSplit
from mpilayer.errors import InputError
from mpilayer.io.h5io import MatrixSource
from mpilayer.io.operand_readers import LRUCache, OperandReader
from mpilayer.mpi.parallel_prep import shares

SPLIT = ComponentSplit(8, (3, 5))


class CountingSource(MatrixSource):
    """A MatrixSource that counts its reads."""

    reads = 0

    def read(self, rows, cols):
        self.reads += 1
        return super().read(rows, cols)


def make_reader(path, side, cache_bytes, major=7, k_panel=16, scale="tensor"):
    source = CountingSource(f"{path}:/{side}")
    return OperandReader(source, side, SPLIT, scale, major, k_panel, LRUCache(cache_bytes))


def write(tmp_path, data, side):
    path = tmp_path / f"{side.lower()}.h5"
    with h5py.File(path, "w") as f:
        f[side] = data
    return path


@pytest.mark.parametrize("n_majors, n_able", [(8, 2), (7, 3), (2, 5), (1, 1), (13, 4)])
def test_shares_are_consecutive_and_cover_every_block_once(n_majors, n_able):
    problems = [{}] + [{} for _ in range(n_able)]  # rank 0 and n_able workers that opened both inputs
    runs = [shares(n_majors, problems, "B", rank) for rank in range(n_able + 1)]
    assert runs[0] == []  # rank 0 is the control plane
    assert sorted(mi for run in runs for mi in run) == list(range(n_majors))
    for run in runs:
        assert run == list(range(run[0], run[0] + len(run))) if run else True
    sizes = [len(run) for run in runs[1:]]
    assert max(sizes) - min(sizes) <= 1


def test_rank_0_reads_when_no_worker_can():
    problems = [{}, {"A": "cannot open"}, {"A": "cannot open"}]
    assert shares(5, problems, "A", 0) == [0, 1, 2, 3, 4]
    assert shares(5, problems, "A", 1) == [] and shares(5, problems, "B", 1) == [0, 1]


@pytest.mark.parametrize("side", ["A", "B"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_shares_read_once_give_the_serial_sums_and_blocks(tmp_path, side, dtype):
    """Shares of 3 workers with the raw blocks kept (B: one hyperslab per k-panel), combined, give
    bit for bit the sums of a serial pass that reads block by block, and the same blocks q - z;
    each share is read from the file once."""
    rng = np.random.default_rng(3)
    shape = (33, 40) if side == "A" else (40, 33)  # k = 40: three k-panels of 16, 16, 8
    path = write(tmp_path, (rng.standard_normal(shape) * rng.random(shape[1]) * 5).astype(dtype), side)
    serial = make_reader(path, side, 0)
    want = serial.first_pass_sums()
    assert serial.source.reads == 5 * 3  # no cache: every block read alone
    problems = [{}, {}, {}, {}]
    total, lo, hi = np.zeros(33), np.full(33, np.inf), np.full(33, -np.inf)
    readers = []
    for rank in (1, 2, 3):
        reader = make_reader(path, side, 2**24)
        mine = shares(len(reader.majors), problems, side, rank)
        t, a, b = reader.first_pass_sums(mine)
        owned = np.zeros(33, dtype=bool)
        for mi in mine:
            owned[reader.majors[mi]] = True
        np.testing.assert_array_equal(t[~owned], 0)
        total += t
        lo, hi = np.minimum(lo, a), np.maximum(hi, b)
        assert reader.source.reads == (3 if side == "B" else 3 * len(mine))  # B: one read per k-panel
        readers.append((reader, mine))
    for got, ref in zip((total, lo, hi), want):
        np.testing.assert_array_equal(got, ref)
    serial.finish_first_pass(*want, 8)
    for reader, mine in readers:
        reader.finish_first_pass(total, lo, hi, 8)
        np.testing.assert_array_equal(reader.zero, serial.zero)
        assert np.array_equal(reader.scale, serial.scale)
        before = reader.source.reads
        for mi in mine:
            for pi in range(len(reader.panels)):
                q = reader.block(mi, pi)  # from the kept raw block: no read
                assert q.flags.c_contiguous
                np.testing.assert_array_equal(q, serial.block(mi, pi))
        assert reader.source.reads == before


@pytest.mark.parametrize("side", ["A", "B"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("cache_bytes", [0, 2**24])
def test_nan_or_inf_is_reported_at_its_first_position(tmp_path, side, bad, cache_bytes):
    """The first pass looks at each block's extremes only; a bad block is then searched for its
    first bad value: the same one-line message and block as a full check, kept raw or not."""
    rng = np.random.default_rng(4)
    shape = (33, 40) if side == "A" else (40, 33)
    data = rng.standard_normal(shape).astype(np.float32)
    data[21, 30] = bad  # A: block (3, 1), the first in block order (mi, pi); B: block (4, 1)
    data[30 if side == "A" else 35, 2] = bad  # A: block (4, 0); B: block (0, 2), the first
    path = write(tmp_path, data, side)
    reader = make_reader(path, side, cache_bytes)
    with pytest.raises(InputError) as err:
        reader.first_pass_sums()
    message = str(err.value)
    assert "\n" not in message and "NaN or Inf" in message
    if side == "A":
        assert err.value.block == (3, 1) and "row 21, column 30" in message
    else:
        assert err.value.block == (0, 2) and "row 35, column 2" in message


PREPARE = r"""
import sys
import numpy as np
from mpi4py import MPI
from mpilayer.core.components import ComponentSplit
from mpilayer.io.h5io import MatrixSource
from mpilayer.io.operand_readers import LRUCache, OperandReader
from mpilayer.mpi.parallel_prep import prepare

a_path, b_path, scale, cache = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
comm = MPI.COMM_WORLD
rank = comm.Get_rank()
split = ComponentSplit(8, (3, 5))

def readers(cache_bytes):
    return {side: OperandReader(MatrixSource(f"{path}:/{side}"), side, split, scale, 7, 16, LRUCache(cache_bytes))
            for side, path in (("A", a_path), ("B", b_path))}

problems = [{}, {}, {}, {"B": "cannot open it"}]  # rank 3 reads A only: B's shares go to ranks 1 and 2
mine = readers(cache)
nbytes, _ = prepare(comm, mine, problems, 8)
ok = nbytes > 0
for side, serial in readers(0).items():
    serial.prepare(8)  # one rank, every block
    got = mine[side]
    ok &= np.array_equal(got.scale, serial.scale) and np.array_equal(got.zero, serial.zero)
    for name, value in vars(serial.stats).items():
        if isinstance(value, np.ndarray):
            ok &= np.array_equal(getattr(got.stats, name), value)
ok = comm.allreduce(ok, op=MPI.LAND)
if rank == 0:
    print("ok" if ok else "FAILED")
"""


@pytest.mark.mpi
@pytest.mark.parametrize("scale, cache_bytes", [("tensor", 2**24), ("axis", 0)])
def test_collective_preparation_is_bit_identical_to_one_rank(tmp_path, scale, cache_bytes):
    """prepare() on 4 ranks (one that cannot open B), with raw blocks kept or read twice: every
    rank ends with the scales, zero points and statistics of one rank's pass, bit for bit."""
    import subprocess
    import sys

    from mpirun import mpi_env, mpiexec_path

    rng = np.random.default_rng(6)
    a = write(tmp_path, (rng.standard_normal((33, 40)) * rng.random((33, 1)) * 9 + 2).astype(np.float32), "A")
    b = write(tmp_path, (rng.standard_normal((40, 33)) * 0.01 - 0.004).astype(np.float64), "B")
    script = tmp_path / "prepare.py"
    script.write_text(PREPARE)
    proc = subprocess.run([mpiexec_path(), "-n", "4", sys.executable, str(script), str(a), str(b), scale,
                           str(cache_bytes)], capture_output=True, text=True, env=mpi_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok", proc.stdout + proc.stderr
