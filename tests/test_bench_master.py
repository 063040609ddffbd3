"""``mpilayer bench master``: the null-worker runs and the projection."""
import subprocess
import sys

import pytest

from mpilayer.jobs import bench_master

from mpirun import mpi_env


def test_projection_model():
    rows = [{"path": "distributed", "jobs": 512, "work_cpu_s": 0.06, "bytes_per_job": 2500, "job_s": 1e-4},
            {"path": "distributed", "jobs": 128, "work_cpu_s": 0.02, "bytes_per_job": 8600, "job_s": 1.6e-4}]
    c0, c1 = bench_master.fit(rows)
    assert c0 == pytest.approx(0.04 / 384) and c1 == 0.0
    proj = bench_master.project("distributed", c0, c1, 200.0, 250e9, 12.5e9)
    assert proj[65536, 1024] == 1024  # every worker busy
    assert all(proj[n, p] <= p for n, p in proj)
    sent = bench_master.project("master-sent", 5e-4, 5e-9, 0.0, 250e9, 12.5e9)
    assert sent[65536, 1024] < 10  # results and operands through rank 0 cap it at a few workers


@pytest.mark.mpi
def test_bench_master_runs_null_workers(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    proc = subprocess.run([sys.executable, "-m", "mpilayer", "bench", "master", "--n", "256", "--tiles", "64,128",
                           "--repeat", "1", "--paths", "master-sent,distributed", "-o", str(tmp_path / "p.png"),
                           "--tmpdir", str(scratch)],
                          capture_output=True, text=True, env=mpi_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "master-sent" in out and "distributed" in out and "assumptions:" in out and "p=4096" in out
    assert (tmp_path / "p.png").stat().st_size > 0
    assert list(scratch.iterdir()) == []  # the generated inputs and outputs are removed
