"""Stragglers and failures under a real mpiexec: emulated service times, speculative re-issue,
hung workers. Service times are sleeps, so 3-4 ranks on 2 cores are fine."""
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from mpirun import mpi_env, run_mpilayer
from result_checks import assert_exact_run, example_problem, read_result_file

from mpilayer.core.service_time import ALL, parse_service_time

pytestmark = pytest.mark.mpi
SHAPE, TILE, COMP = (96, 70, 80), (16, 16), "1,1,2,4"   # 6 x 5 = 30 tiles, 4 resolutions: 120 mini-jobs
TILES = 30


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    return example_problem(tmp_path_factory.mktemp("stragglers"), SHAPE, 11, (1, 1, 2, 4))


def _matmul(n, problem, name, *extra, timeout=60):
    d, a, b, _ = problem
    out = d / name
    proc = run_mpilayer(n, "matmul", a, b, "-o", out, "--tile", ",".join(map(str, TILE)), "--component-bits", COMP,
                        "--keep", "all", "--force", *extra, timeout=timeout)
    return proc, out


def _read(out):
    return read_result_file(out)


def _assert_exact(problem, out):
    return assert_exact_run(out, problem[3])


def test_service_times_and_reissue_keep_results_bit_identical(problem):
    proc, out = _matmul(3, problem, "plain.h5", "--reissue", "off")
    assert proc.returncode == 0, proc.stderr
    attrs = _assert_exact(problem, out)
    assert attrs["reissued"] == 0 and attrs["service_time"] == "none"

    proc, out = _matmul(4, problem, "exp.h5", "--service-time", "shifted-exp:0.001,0.003", "--seed", "5")
    assert proc.returncode == 0, proc.stderr
    _assert_exact(problem, out)

    # rank 1 is 25x slower: its jobs are copied to the others, the first result wins
    proc, out = _matmul(4, problem, "straggler.h5", "--service-time", "exp:0.004+straggler:1:25")
    assert proc.returncode == 0, proc.stderr
    attrs = _assert_exact(problem, out)
    assert attrs["reissued"] > 0, attrs
    assert attrs["cancelled"] + attrs["duplicates_ignored"] > 0, attrs
    assert attrs["lost_ranks"] == "none"

    proc, out = _matmul(4, problem, "straggler_off.h5", "--service-time", "exp:0.004+straggler:1:25",
                        "--reissue", "off")
    assert proc.returncode == 0, proc.stderr
    assert _assert_exact(problem, out)["reissued"] == 0


def test_hung_worker_is_survived(problem):
    """Rank 2 stops answering after 3 jobs: its work is re-issued, the run completes exactly,
    and the stop does not wait for it forever (MPI_Abort with status 0 after publishing)."""
    t0 = time.monotonic()
    proc, out = _matmul(4, problem, "hang.h5", "--service-time", "exp:0.003+hang:2:3", "--worker-timeout", "1.5")
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 < 30
    attrs = _assert_exact(problem, out)
    assert attrs["reissued"] + attrs["requeued"] > 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("mpilayer")]
    assert len(lines) == 1 and "warning" in lines[0] and "rank(s) 2" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("n", [3, 1])
def test_every_worker_hung_saves_best_resolution_and_fails(problem, n):
    """Every worker answers one resolution's worth of jobs, then hangs: the best completed
    resolution is published, one line explains, exit status 4."""
    spec = f"hang:all:{TILES}" if n > 1 else f"hang:0:{TILES}"
    proc, out = _matmul(n, problem, f"allhang{n}.h5", "--service-time", spec, "--worker-timeout", "1")
    assert proc.returncode == 4, (proc.returncode, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("mpilayer")]
    assert len(lines) == 1 and "no worker left" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    attrs, C, resolutions = _read(out)
    assert attrs["stopped_by"] == "workers-lost" and not attrs["exact"]
    r = attrs["resolution"]
    assert 0 <= r < len(problem[3]) - 1
    assert f"resolution {r} of 0..{len(problem[3]) - 1}" in lines[0]
    np.testing.assert_array_equal(resolutions[r], problem[3][r])
    with h5py.File(out) as f:  # every tile of /C at the best resolution it reached
        tile_res = f["tile_resolution"][...]
    assert tile_res.min() == r
    for (ti, tj), tr in np.ndenumerate(tile_res):
        rows, cols = slice(ti * TILE[0], (ti + 1) * TILE[0]), slice(tj * TILE[1], (tj + 1) * TILE[1])
        np.testing.assert_array_equal(C[rows, cols], problem[3][tr][rows, cols])


BAD = ["exp", "exp:-1", "exp:abc", "exp:1,2", "shifted-exp:1", "straggler:1", "straggler:x:2",
       "straggler:1:0.5", "hang:1:-2", "hang:1:1.5", "bogus:1", "exp:0.1+exp:0.2", "straggler:1:2+straggler:1:3"]


def test_bad_service_time_strings_give_one_line(problem):
    _, a, b, _ = problem
    for spec in BAD:
        proc = subprocess.run([sys.executable, "-m", "mpilayer", "matmul", a, b, "-o", "/nonexistent/c.h5",
                               "--service-time", spec], capture_output=True, text=True, env=mpi_env(), timeout=60)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (spec, proc.stderr)
        assert "--service-time" in lines[0] and "Traceback" not in proc.stderr, (spec, lines)
    for spec, needle in [("straggler:5:2", "no worker rank 5"), ("hang:0:1", "rank 0 is the master")]:
        proc, out = _matmul(3, problem, "bad.h5", "--service-time", spec)
        lines = [ln for ln in proc.stderr.strip().splitlines() if "error" in ln.lower()]
        assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], (spec, proc.stderr)
        assert not out.exists()
    proc, _ = _matmul(1, problem, "bad.h5", "--worker-timeout", "0")
    assert proc.returncode == 2 and "--worker-timeout" in proc.stderr


def test_parse_service_time():
    m = parse_service_time("shifted-exp:0.5,2+straggler:3:4+hang:all:7")
    assert (m.shift, m.mean, m.stragglers, m.hangs) == (0.5, 2.0, {3: 4.0}, {ALL: 7})
    assert not parse_service_time("none").active
    slow = m.for_rank(3, seed=1)
    assert slow.hangs_now(7) and not slow.hangs_now(6)
    # FACTOR x (compute + the base draw): the sleep adds (FACTOR - 1) x compute + FACTOR x base
    draws = [slow.extra(0.1) for _ in range(2000)]
    assert min(draws) >= 4 * 0.5 + 3 * 0.1 - 1e-12
    assert abs(np.mean(draws) - (4 * (0.5 + 2.0) + 0.3)) < 0.6
    assert parse_service_time("straggler:2:3").for_rank(1, 0) is None
