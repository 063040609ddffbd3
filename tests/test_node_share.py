"""One copy per node (mpilayer.mpi.node_share) under a real mpiexec: the workers of a node read
each operand block from HDF5 once, results stay bit-identical to private and master-sent blocks,
and the claim protocol survives a failed read."""
import subprocess
import sys

import h5py
import numpy as np
import pytest
from mpirun import mpi_env, mpiexec_path, run_mpilayer

from mpilayer.io.example_data import write_example

pytestmark = pytest.mark.mpi


def _run(tmp_path, name, ranks, a, b, extra, **env):
    out = tmp_path / f"{name}.h5"
    proc = run_mpilayer(ranks, "matmul", a, b, "-o", out, "--keep", "all", "--force", *extra,
                        env=mpi_env(**env), timeout=90)
    assert proc.returncode == 0, proc.stderr
    with h5py.File(out) as f:
        assert f["C"].attrs["exact"]
        resolutions = {int(k): v[...] for k, v in f["resolutions"].items()}
        workers = f["ranks"][1:]
    return resolutions, int(workers["bytes_read"].sum()), proc.stdout


@pytest.mark.parametrize("dtype, extra, passes", [
    # the first pass keeps its raw blocks for the second, jobs read the window: one read
    ("float32", ("--scale", "axis", "--component-bits", "2,2,4", "--tile", "32,24"), 1),
    ("int8", ("--component-bits", "1,1,2,4", "--k-panel", "32", "--tile", "32,24"), 1),
    # whole-k jobs (a distributed result over 3 k-panels) read every panel of their tile's blocks
    ("float32", ("--component-bits", "2,2,4", "--k-panel", "40", "--tile", "32,24", "--layout", "distributed"), 1),
])
def test_a_node_reads_each_block_once_and_results_are_bit_identical(tmp_path, dtype, extra, passes):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    write_example(a, b, (70, 100, 90), dtype, 3)
    with h5py.File(a) as fa, h5py.File(b) as fb:
        operand_bytes = fa["A"].nbytes + fb["B"].nbytes
    a, b = f"{a}:/A", f"{b}:/B"
    sent, _, _ = _run(tmp_path, "sent", 3, a, b, [x for x in extra if x not in ("--layout", "distributed")],
                      MPILAYER_DATA_PLANE="0")
    own, own_read, own_log = _run(tmp_path, "own", 4, a, b, extra, MPILAYER_NODE_SHARE="0")
    shared, shared_read, shared_log = _run(tmp_path, "shared", 4, a, b, extra)
    assert sorted(sent) == sorted(own) == sorted(shared) and len(sent) >= 3
    for r in sent:
        np.testing.assert_array_equal(own[r], sent[r])
        np.testing.assert_array_equal(shared[r], sent[r])
    assert shared_read == passes * operand_bytes  # 3 workers on one node, each block read once
    assert own_read > shared_read
    assert [ln for ln in shared_log.splitlines() if "shared memory" in ln] == \
        [ln for ln in shared_log.splitlines() if ln.startswith("worker rank(s) 1,2,3 on ")], shared_log
    assert "A and B blocks in MPI shared memory" in shared_log, shared_log
    assert "each worker reads its own blocks (MPILAYER_NODE_SHARE=0)" in own_log, own_log


PROTOCOL = r"""
import sys, time
import numpy as np
from mpi4py import MPI
from mpilayer.core.components import ComponentSplit
from mpilayer.io.operand_readers import OperandReader
from mpilayer.mpi import node_share
from mpilayer.mpi.data_plane import read_block

class Source:
    # an in-memory input that counts its reads; rank 1's first read of block (0, 0) is slow and fails
    def __init__(self, matrix, fail):
        self.matrix, self.fail, self.reads = matrix, fail, []
        self.shape, self.dtype, self.is_integer, self.label = matrix.shape, matrix.dtype, True, "A"

    def read(self, rows, cols):
        if self.fail and (rows.start, cols.start) == (0, 0):
            self.fail = False
            time.sleep(0.1)  # the node-mates wait for the claim meanwhile
            raise OSError("injected read failure")
        self.reads.append((rows.start, cols.start))
        return np.ascontiguousarray(self.matrix[rows, cols])

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
matrix = np.arange(50 * 33, dtype=np.int16).reshape(50, 33) % 200 - 100
ok = True
if rank > 0:  # the workers; rank 0 (the control plane) takes no part in the share
    source = Source(matrix, fail=rank == 1)
    reader = OperandReader(source, "A", ComponentSplit(8, (4, 4)), "tensor", 8, 10, node_share.WorkerCache(0))
    share, note = node_share.attach(comm, {"A": reader}, {"A"}, 1 << 20)
    ok &= share is not None and (note is not None) == (rank == 1)
    keys = [("A", mi, pi) for mi in range(len(reader.majors)) for pi in range(len(reader.panels))]
    failed = 0
    for key in keys[rank - 1:] + keys[:rank - 1]:  # each worker starts elsewhere, all meet at (0, 0)
        try:
            block = read_block({"A": reader}, key)
        except OSError:
            failed += 1
            block = read_block({"A": reader}, key)  # the claim was given back: read it (or find it) now
        _, mi, pi = key
        ok &= np.array_equal(block, matrix[reader.majors[mi], reader.panels[pi]]) and not block.flags.writeable
    reads = share.node_comm.allgather(source.reads)
    everything = sorted(r for mine in reads for r in mine)
    blocks = sorted((m.start, p.start) for m in reader.majors for p in reader.panels)
    ok &= failed == (rank == 1) and everything == blocks  # every block read once on the node
    node_share.free_all()
ok = comm.allreduce(ok, op=MPI.LAND)
if rank == 0:
    print("ok" if ok else "FAILED")
"""


def test_claims_wait_and_a_failed_read_gives_its_claim_back(tmp_path):
    """Three workers read every block of an operand in different orders: each block is read from
    the input once on the node, every rank sees the right values (read-only views of the window),
    and a read that fails hands the block to whoever needs it next."""
    script = tmp_path / "protocol.py"
    script.write_text(PROTOCOL)
    proc = subprocess.run([mpiexec_path(), "-n", "4", sys.executable, str(script)], capture_output=True, text=True,
                          env=mpi_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok", proc.stdout + proc.stderr
