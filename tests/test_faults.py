"""Fault injection under a real mpiexec (issue 12): signals, a full disk, --force, two runs on one
output, an output that is an input, an input rewritten mid-run, stale scratch, the memory budget.

Each probe checks: one line and a documented exit status, the output holds either every tile
at its best resolution or the previous good output, no scratch file is left, nothing wrong is
labelled exact, no input is modified. Runs are slowed with --service-time so timing is
deterministic on a loaded 2-core machine.
"""
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np
import pytest
from mpirun import mpi_env, mpilayer_cmd, run_mpilayer
from reference import exact_int_product

import mpilayer
from mpilayer.io.example_data import write_example

pytestmark = pytest.mark.mpi
SLOW = ("--component-bits", "1", "--tile", "128,128", "--service-time", "exp:0.04", "-q")


def make_inputs(tmp_path, shape=(384, 1000, 384), dtype="int8", seed=0):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    write_example(a, b, shape, dtype, seed)
    with h5py.File(a) as fa, h5py.File(b) as fb:
        return a, b, fa["A"][...], fb["B"][...]


def leftovers(directory, name="c.h5"):
    """Scratch files and locks of ``name`` left in ``directory``."""
    return sorted(f for f in os.listdir(directory) if f.startswith(f".{name}.") or f == f"{name}.lock")


def md5(path):
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def start(n, *args, cwd=None):
    """A run in its own process group (so a signal can go to every rank, as from a terminal or Slurm)."""
    return subprocess.Popen(mpilayer_cmd(n, *args), env=mpi_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, cwd=cwd)


def finish(proc, timeout=30):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"run did not end within {timeout} s: {err}")
    return proc.returncode, out, err


def wait_for(path, timeout=30):
    until = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < until, f"{path} never appeared"
        time.sleep(0.02)


def error_lines(err):
    return [ln for ln in err.splitlines() if ln.strip()]


def check_tiles_at_best_resolution(path, A, B):
    """Every tile equals the layered product at that tile's own resolution; returns the attrs."""
    expected = {r.index: r.estimate for r in mpilayer.layered_matmul(A, B, component_bits=1)}
    with h5py.File(path) as f:
        c, res, attrs = f["C"][...], f["tile_resolution"][...], dict(f["C"].attrs)
    for ti in range(res.shape[0]):
        for tj in range(res.shape[1]):
            rows, cols = slice(ti * 128, (ti + 1) * 128), slice(tj * 128, (tj + 1) * 128)
            if res[ti, tj] >= 0:
                np.testing.assert_array_equal(c[rows, cols], expected[int(res[ti, tj])][rows, cols])
    assert attrs["resolution"] == res.min()
    assert bool(attrs["exact"]) == (res.min() == len(expected) - 1)
    return attrs


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_every_rank_publishes_best_tiles(tmp_path, sig):
    """Fault 1: a signal to the process group (mpiexec forwards it too) stops the run in
    bounded time, with every tile at its best resolution, stopped_by=signal, status 128+N."""
    a, b, A, B = make_inputs(tmp_path)
    out = tmp_path / "c.h5"
    proc = start(3, "matmul", f"{a}:/A", f"{b}:/B", "-o", out, *SLOW)
    wait_for(out)
    time.sleep(0.3)
    t0 = time.monotonic()
    os.killpg(proc.pid, sig)
    status, _, err = finish(proc)
    stop_s = time.monotonic() - t0
    assert status == 128 + sig, err
    assert stop_s < 8, stop_s
    assert "Traceback" not in err and f"stopped by {signal.Signals(sig).name}" in err, err
    attrs = check_tiles_at_best_resolution(out, A, B)
    assert attrs["stopped_by"] == "signal" and not attrs["exact"]
    assert leftovers(tmp_path) == []


@pytest.fixture
def small_tmpfs():
    """A 20 MB tmpfs (needs root); unmounted afterwards."""
    directory = tempfile.mkdtemp(prefix="mpilayer-full-")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", directory], capture_output=True, text=True)
    if proc.returncode != 0:
        os.rmdir(directory)
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", directory])
        os.rmdir(directory)


def test_full_disk_one_line_previous_output_kept(tmp_path, small_tmpfs):
    """Faults 2 and 3: C (2000 x 2000 int64, 30 MiB) spills past a 20 MB disk: one line, exit 2,
    no scratch left, and the previous output (--force) is still there."""
    a, b, A, B = make_inputs(tmp_path, (2000, 64, 2000))
    out = os.path.join(small_tmpfs, "c.h5")
    with open(out, "wb") as f:
        f.write(b"previous good output")
    proc = run_mpilayer(3, "matmul", f"{a}:/A", f"{b}:/B", "-o", out, "--force", "--memory", "32M", "-q", timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "No space left on device" in lines[0] and small_tmpfs in lines[0], proc.stderr
    assert open(out, "rb").read() == b"previous good output"
    assert leftovers(small_tmpfs) == []


def test_second_run_on_same_output_is_refused(tmp_path):
    """Fault 4: the second run fails with one line before touching anything; the first is exact."""
    a, b, A, B = make_inputs(tmp_path)
    out = tmp_path / "c.h5"
    # ~5 s of emulated work: the second run's start-up, slow on a loaded machine, must end inside it
    slower = tuple("exp:0.15" if arg == "exp:0.04" else arg for arg in SLOW)
    first = start(3, "matmul", f"{a}:/A", f"{b}:/B", "-o", out, *slower)
    wait_for(out)
    second = run_mpilayer(2, "matmul", f"{a}:/A", f"{b}:/B", "-o", out, "--force", "-q", timeout=30)
    assert second.returncode == 2
    lines = error_lines(second.stderr)
    assert len(lines) == 1 and "being written by another run" in lines[0] and "pid" in lines[0], second.stderr
    status, _, err = finish(first)
    assert status == 0, err
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["C"][...], exact_int_product(A, B))
        assert f["C"].attrs["exact"]
    assert leftovers(tmp_path) == []


def test_output_that_is_an_input_is_refused(tmp_path):
    """Fault 5: the input itself, a symlink to it, a hard link to it."""
    a, b, A, B = make_inputs(tmp_path, (40, 30, 20))
    before = md5(a)
    os.symlink(a, tmp_path / "sym.h5")
    os.link(a, tmp_path / "hard.h5")
    for out in (a, tmp_path / "sym.h5", tmp_path / "hard.h5"):
        proc = run_mpilayer(1, "matmul", f"{a}:/A", f"{b}:/B", "-o", out, "--force", timeout=30)
        assert proc.returncode == 2, (out, proc.stderr)
        assert len(error_lines(proc.stderr)) == 1 and "is the input file" in proc.stderr, proc.stderr
        assert md5(a) == before
        assert leftovers(tmp_path, os.path.basename(out)) == []


def test_input_rewritten_during_the_run(tmp_path):
    """Fault 6: `cp` over an input mid-run: one line, non-zero exit, nothing labelled exact."""
    a, b, A, B = make_inputs(tmp_path)
    other = tmp_path / "a2.h5"
    with h5py.File(other, "w") as f:
        f["A"] = A // 2
    out = tmp_path / "c.h5"
    proc = start(3, "matmul", f"{a}:/A", f"{b}:/B", "-o", out, *SLOW)
    wait_for(out)
    shutil.copyfile(other, a)
    status, _, err = finish(proc)
    assert status == 2, err
    lines = error_lines(err)
    assert len(lines) == 1 and "changed during the run" in lines[0] and str(a) in lines[0], err
    with h5py.File(out) as f:
        assert not f["C"].attrs["exact"]
    assert leftovers(tmp_path) == []


def test_stale_scratch_of_a_killed_run_is_removed(tmp_path):
    """Fault 8: SIGKILL leaves scratch and the lock; `mpilayer cleanup` (or the next run) removes them."""
    a, b, A, B = make_inputs(tmp_path)
    out = tmp_path / "c.h5"
    proc = start(2, "matmul", f"{a}:/A", f"{b}:/B", "-o", out, *SLOW)
    wait_for(out)
    os.killpg(proc.pid, signal.SIGKILL)
    finish(proc)
    assert ".c.h5.work.h5" in leftovers(tmp_path) and "c.h5.lock" in leftovers(tmp_path)
    cleaned = subprocess.run([sys.executable, "-m", "mpilayer", "cleanup", str(out)], env=mpi_env(),
                             capture_output=True, text=True, timeout=30)
    assert cleaned.returncode == 0 and "removed" in cleaned.stdout, cleaned.stderr
    assert leftovers(tmp_path) == []
    proc = run_mpilayer(2, "matmul", f"{a}:/A", f"{b}:/B", "-o", out, "--force", "-q", timeout=60)
    assert proc.returncode == 0 and leftovers(tmp_path) == []


def test_every_rank_within_memory_budget(tmp_path):
    """Fault 7: 32M budget, int16 2400x2400x2400 inputs (C 44 MiB spills): every rank's peak
    resident memory above its start-up baseline within the budget (+10%)."""
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    rng = np.random.default_rng(3)
    with h5py.File(a, "w") as f:
        f["A"] = rng.integers(-2**15, 2**15, (2400, 2400), dtype=np.int16)
    with h5py.File(b, "w") as f:
        f["B"] = rng.integers(-2**15, 2**15, (2400, 2400), dtype=np.int16)
    proc = run_mpilayer(3, "matmul", f"{a}:/A", f"{b}:/B", "-o", tmp_path / "c.h5", "--memory", "32M",
                        "--bits", "16", "--component-bits", "8,8", "-q", timeout=120)
    assert proc.returncode == 0, proc.stderr
    from mpilayer.io.result_store import read_result
    result = read_result(tmp_path / "c.h5", max_c_bytes=0)
    assert result["attrs"]["exact"]
    grown = {row["rank"]: (row["peak_rss_bytes"] - row["baseline_rss_bytes"]) / 2**20 for row in result["ranks"]}
    print("peak RSS above baseline, MiB:", grown)
    assert all(g <= 32 * 1.1 for g in grown.values()), grown
