"""Exact coded redundancy (``--code``) under a real mpiexec: results bit-identical to the
one-process product, exact decoding when up to N-K workers never answer, and clear errors.
Workers that "never answer" are emulated hangs (sleeps), so 6 ranks on 2 cores are fine."""
import time

import h5py
import pytest
from mpirun import run_mpilayer
from result_checks import assert_exact_run

import mpilayer
from mpilayer.io.example_data import write_example

pytestmark = pytest.mark.mpi
# 7 row blocks of 16 (the last one 4 rows) x 4 column blocks: code groups of 3 leave the last
# group with one real block, so padded and missing members are exercised; 2 k-panels.
SHAPE, TILE, COMP, PANEL = (100, 90, 60), (16, 16), "1,3,4", 64


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    d = tmp_path_factory.mktemp("coded")
    write_example(d / "a.h5", d / "b.h5", SHAPE, "int8", 23)
    with h5py.File(d / "a.h5") as fa, h5py.File(d / "b.h5") as fb:
        A, B = fa["A"][...], fb["B"][...]
    A[0, :5] = -128  # extremes in the first code group
    A[1, :5] = 127
    with h5py.File(d / "a.h5", "r+") as fa:
        fa["A"][...] = A
    expected = [r.estimate for r in mpilayer.layered_matmul(A, B, component_bits=(1, 3, 4))]
    return d, f"{d}/a.h5:/A", f"{d}/b.h5:/B", expected


def _matmul(n, problem, name, *extra):
    d, a, b, _ = problem
    out = d / name
    proc = run_mpilayer(n, "matmul", a, b, "-o", out, "--tile", ",".join(map(str, TILE)), "--component-bits", COMP,
                        "--k-panel", str(PANEL), "--keep", "all", "--force", *extra, timeout=120)
    return proc, out


def _assert_exact(problem, out) -> dict:
    return assert_exact_run(out, problem[3])


@pytest.mark.parametrize("code, n", [("parity", 4), ("mds:5,3", 6)])
def test_coded_run_is_bit_identical(problem, code, n):
    """With every worker answering, a coded run gives the same bits at every resolution, whether
    its groups finish from the ordinary rows or by decoding parity results (many workers on two
    cores often answer a parity row first)."""
    proc, out = _matmul(n, problem, f"coded-{code}.h5", "--code", code,
                        "--service-time", "exp:0.002", "--seed", "3", "--reissue", "off")
    assert proc.returncode == 0, proc.stderr
    attrs = _assert_exact(problem, out)
    assert attrs["code"] == ("parity:%d" % (n - 2) if code == "parity" else code)
    assert attrs["parity_jobs"] > 0 and attrs["requeued"] == 0


@pytest.mark.parametrize("hangs", ["hang:1:0+hang:4:0", "hang:2:5+hang:5:9"])
def test_decoding_survives_n_minus_k_silent_workers(problem, hangs):
    """mds:5,3 on 5 workers, two of which never answer (from the start, or after a few jobs),
    re-issue off and a worker timeout far beyond the run: only decoding can finish the groups
    whose rows the silent workers hold. The result is exact, nothing was re-queued, and the
    stop gives up on the silent ranks after a bounded wait (MPI_Abort, status 0)."""
    t0 = time.monotonic()
    proc, out = _matmul(6, problem, "silent.h5", "--code", "mds:5,3", "--service-time", hangs,
                        "--reissue", "off", "--worker-timeout", "60")
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 < 40
    attrs = _assert_exact(problem, out)
    assert attrs["decoded"] > 0 and attrs["requeued"] == 0 and attrs["reissued"] == 0, attrs
    assert attrs["lost_ranks"] == "none"
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("mpilayer")]
    silent = sorted(int(clause.split(":")[1]) for clause in hangs.split("+"))
    assert len(lines) == 1 and f"rank(s) {', '.join(map(str, silent))} did not answer" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_code_errors_are_one_line(problem):
    """Too few workers for N, or a malformed code: exit 2, one line naming --code, no output."""
    for n, code, needle in [(3, "mds:5,3", "needs at least 5 worker ranks"), (1, "parity:2", "needs at least 3"),
                            (3, "mds:4", "expected none, parity"), (1, "parity", "must be >= 2"),
                            (4, "mds:2,2", "1 <= K < N")]:
        proc, out = _matmul(n, problem, "bad.h5", "--code", code)
        lines = [ln for ln in proc.stderr.strip().splitlines() if "error" in ln.lower()]
        assert proc.returncode == 2 and len(lines) == 1, (code, proc.stderr)
        assert "--code" in lines[0] and needle in lines[0], (code, lines)
        assert "Traceback" not in proc.stderr and not out.exists()


def test_more_silent_workers_than_the_code_covers(problem):
    """Three of five workers silent under mds:5,3 (one more than N-K): the code alone cannot
    finish every group, so once the silent ranks are treated as lost their rows are re-queued,
    and rows double up on the two live workers. The run still ends exact."""
    proc, out = _matmul(6, problem, "too-silent.h5", "--code", "mds:5,3", "--service-time",
                        "hang:1:0+hang:2:0+hang:3:0", "--reissue", "off", "--worker-timeout", "1.5")
    assert proc.returncode == 0, proc.stderr
    attrs = _assert_exact(problem, out)
    assert attrs["lost_ranks"] == "1,2,3", attrs
    assert "Traceback" not in proc.stderr


def test_bench_stragglers_runs_and_checks_bits(tmp_path):
    """The benchmark's six configurations on a tiny problem: it checks every result against the
    first run's bits itself and prints the comparison line."""
    import os
    import subprocess
    import sys

    from mpirun import mpi_env, mpiexec_path

    env = mpi_env(MPIEXEC=mpiexec_path(), TMPDIR=str(tmp_path))  # its scratch folder goes there
    proc = subprocess.run([sys.executable, "-m", "mpilayer", "bench", "stragglers", "--shape", "96", "--tile", "32",
                           "--ranks", "4", "--repeat", "1", "--service-time", "exp:0.002"],
                          capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "parity:2" in proc.stdout and "every result bit-identical" in proc.stdout, proc.stdout
    rel = proc.stdout.split("relative error per resolution")[1].splitlines()[0].split(": ", 1)[1]
    errors = [float(part.split(": ")[1]) for part in rel.split(", ")]
    assert len(errors) == 4 and 0 < errors[0] < 1 and errors[-1] == 0, proc.stdout  # components 1,1,2,4
    assert os.listdir(tmp_path) == []  # and is removed
