"""``mpilayer bench mpi``: its report of the master's share and of the bytes through rank 0 and
read from the inputs (issue 15's measures)."""
import re
import subprocess
import sys

import pytest
from mpirun import mpi_env

from mpilayer.jobs.bench_mpi import rank0_bytes


def test_rank0_bytes_per_resolution():
    result = {"ranks": [{"bytes_in": 300, "bytes_out": 900}], "timeline": [{}, {}, {}]}
    assert rank0_bytes(result, 4000) == (400.0, 0.1)


@pytest.mark.mpi
def test_bench_mpi_reports_the_master_share_and_the_bytes():
    proc = subprocess.run([sys.executable, "-m", "mpilayer", "bench", "mpi", "--shape", "256", "--repeat", "1"],
                          capture_output=True, text=True, env=mpi_env(), timeout=180)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert re.search(r"n = 256 int8, components \[.*\], tiles 256x256 vs 256x256, best of 1", out), out
    assert re.search(r"% of the workers' compute \(\d+\.\d+ s; target <= 5%\)", out), out
    assert re.search(r"bytes through rank 0 \(single result\): [\d,]+ per resolution .* = [\d.]+% of operand", out), out
    # int8 inputs: each block read once per node (the preparation keeps it for its second pass
    # and the jobs find it in the node's window)
    assert re.search(r"per node: \S+ 131,072 bytes = 1\.00x the inputs", out), out
