"""``mpilayer bench vs-dask`` on a tiny problem: the table comes out, and a missing dask is one line."""
import subprocess
import sys

import pytest

from mpirun import mpi_env

pytestmark = pytest.mark.mpi


def test_missing_dask_is_one_line(monkeypatch, capsys):
    from mpilayer.jobs import bench_vs_dask

    monkeypatch.setitem(sys.modules, "dask", None)  # import dask -> ImportError
    monkeypatch.setitem(sys.modules, "dask.array", None)

    class Args:
        n, repeat, dask_chunk, deadline_fraction, seed, tmpdir = 64, 1, None, 0.3, 0, None

    assert bench_vs_dask.run(Args()) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dask[array]" in err[0]


def test_table_on_a_small_problem(tmp_path):
    pytest.importorskip("dask.array")
    proc = subprocess.run([sys.executable, "-m", "mpilayer", "bench", "vs-dask", "--shape", "96", "--repeat", "1",
                           "--deadline-fraction", "5", "--tmpdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=mpi_env())
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    rows = [line for line in lines if line.startswith(("Dask", "mpilayer --"))]
    assert len(rows) == 4, proc.stdout
    dask, b8, b16, deadline = (row.split() for row in rows)  # ... wall, ratio, reached, error, set-up, res. 0
    assert float(dask[-3]) < 1e-5 and dask[-2:] == ["-", "-"]
    assert " ".join(b8[-6:-3]) == "1 of 0..1" and " ".join(b16[-6:-3]) == "1 of 0..1"  # exact, every resolution
    assert float(b8[-3]) < 0.05 and float(b16[-3]) < 1e-3  # quantisation error only
    for row in (b8, b16):  # where the time went: set-up, then resolution 0, within the process's wall time
        wall, setup, first = float(row[-8]), float(row[-2]), float(row[-1])
        assert 0 < setup < first < wall, row
    assert "deadline" in rows[3]
    assert list(tmp_path.iterdir()) == []  # the scratch directory is removed


@pytest.mark.parametrize("bench", ["vs-dask", "master"])
def test_missing_tmpdir_is_one_line(tmp_path, bench):
    missing = tmp_path / "no" / "such"
    proc = subprocess.run([sys.executable, "-m", "mpilayer", "bench", bench, "--tmpdir", str(missing)],
                          capture_output=True, text=True, timeout=60, env=mpi_env())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "--tmpdir" in proc.stderr and str(missing) in proc.stderr
