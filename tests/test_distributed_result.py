"""Distributed results (mpilayer.io.distributed_store) under a real mpiexec: workers write the tiles
they compute, the output is an index of HDF5 virtual datasets. Exact at every resolution, at
-n 8, 12 and 16 (oversubscribed: emulated service times are sleeps), with stragglers, hung
workers and deadlines behaving as with a single-file result."""
import os
import shutil
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest
from mpirun import mpi_env, mpilayer_cmd, run_mpilayer
from result_checks import assert_exact_run, example_problem, read_result_file

from mpilayer.errors import InputError
from mpilayer.io.example_data import write_example
from mpilayer.io.result_store import read_result

pytestmark = pytest.mark.mpi
SHAPE, TILE, COMP = (96, 70, 80), (16, 16), "1,1,2,4"   # 6 x 5 = 30 tiles, 4 resolutions
TILES = 30


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    return example_problem(tmp_path_factory.mktemp("distributed"), SHAPE, 11, (1, 1, 2, 4))


def _matmul(n, problem, name, *extra, layout="distributed", timeout=90):
    d, a, b, _ = problem
    out = d / name
    proc = run_mpilayer(n, "matmul", a, b, "-o", out, "--tile", ",".join(map(str, TILE)), "--component-bits", COMP,
                        "--keep", "all", "--force", "--layout", layout, *extra, timeout=timeout)
    return proc, out


def _layout(out):
    with h5py.File(out) as f:
        return f["C"].attrs.get("layout", "single"), f["C"].is_virtual


@pytest.mark.parametrize("dtype, components, scale", [("int8", "2,2,4", "tensor"), ("float32", "2,2,4", "axis"),
                                                       ("int8", "7,1", "tensor"), ("float32", "7,1", "tensor"),
                                                       ("float32", "1,7", "axis")])
def test_distributed_result_is_the_single_file_result(tmp_path, dtype, components, scale):
    """Every resolution and the bounds are those of the single file (with 7+1 and 1+7, the
    workers' kernels, int8 and binary-plane, write the first resolution's estimate in their pass
    over the product: worker.WorkerState.published); read_result, ``mpilayer info`` and
    ``--gather`` read it; nothing but descriptors and summaries goes through rank 0."""
    write_example(tmp_path / "a.h5", tmp_path / "b.h5", (70, 90, 64), dtype, 2)
    a, b = f"{tmp_path}/a.h5:/A", f"{tmp_path}/b.h5:/B"
    args = ("--tile", "24,16", "--component-bits", components, "--keep", "all", "--scale", scale)
    outs = {}
    for layout in ("single", "distributed"):
        outs[layout] = tmp_path / f"{layout}.h5"
        proc = run_mpilayer(4, "matmul", a, b, "-o", outs[layout], "--layout", layout, *args, timeout=60)
        assert proc.returncode == 0, proc.stderr
    assert _layout(outs["distributed"]) == ("distributed", True) and _layout(outs["single"])[1] is False
    single, dist = read_result_file(outs["single"]), read_result_file(outs["distributed"])
    for r in single[2]:
        np.testing.assert_array_equal(dist[2][r], single[2][r])
    np.testing.assert_array_equal(dist[1], single[1])
    rs, rd = read_result(outs["single"]), read_result(outs["distributed"])
    np.testing.assert_array_equal(rd["C"], rs["C"])
    np.testing.assert_array_equal(rd["tile_error_bound"], rs["tile_error_bound"])
    # (earlier rows are taken while tiles move on: their bounds depend on timing)
    assert rd["timeline"]["quantization_error_estimate"][-1] == rs["timeline"]["quantization_error_estimate"][-1]
    jobs = sum(int(row["jobs"]) for row in rd["ranks"][1:])
    assert rd["ranks"][0]["bytes_in"] <= 150 * jobs and rd["timeline"]["bytes_received"].sum() == 0
    gathered = tmp_path / "gathered.h5"
    proc = run_mpilayer(1, "info", outs["distributed"], "--gather", gathered, timeout=60)
    assert proc.returncode == 0 and "distributed" in proc.stdout, proc.stderr
    assert _layout(gathered) == ("single", False)
    np.testing.assert_array_equal(read_result_file(gathered)[1], single[1])
    shutil.rmtree(tmp_path / "distributed.h5.parts")  # the gathered copy stands alone
    np.testing.assert_array_equal(read_result_file(gathered)[1], single[1])
    with pytest.raises(InputError, match="part file"):
        read_result(outs["distributed"])


def test_a_new_run_keeps_the_published_parts(problem):
    """A run on an existing distributed output leaves the parts the output refers to (it stays
    readable until the new run publishes); the run after removes them."""
    runs = []
    for _ in range(3):
        proc, out = _matmul(3, problem, "again.h5")
        assert proc.returncode == 0, proc.stderr
        with h5py.File(out) as f:
            runs.append(os.path.basename(f["C"].attrs["parts"]))
    assert len(set(runs)) == 3 and sorted(os.listdir(f"{out}.parts")) == sorted(runs[1:])
    assert_exact_run(out, problem[3])


def test_distributed_refuses_code_and_unshared_inputs(problem):
    for extra, env, needle in ((("--code", "parity:2"), {}, "--code"),
                               ((), {"MPILAYER_FAULT": "no-input:2"}, "both inputs")):
        d, a, b, _ = problem
        proc = run_mpilayer(4, "matmul", a, b, "-o", d / "refused.h5", "--layout", "distributed", *extra,
                            env=mpi_env(**env), timeout=60)
        assert proc.returncode == 2, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if "error" in ln]
        assert len(lines) == 1 and "--layout distributed" in lines[0] and needle in lines[0], proc.stderr


def test_several_k_panels_are_summed_on_the_worker(problem):
    """k in 3 panels: each job reads and sums them on its worker (whole-k jobs); exact."""
    proc, out = _matmul(5, problem, "panels.h5", "--k-panel", "32", "--service-time", "exp:0.002")
    assert proc.returncode == 0, proc.stderr
    attrs = assert_exact_run(out, problem[3])
    assert _layout(out)[0] == "distributed" and attrs["tiles_per_resolution"][0] == TILES


@pytest.mark.parametrize("n, layout", [(8, "distributed"), (12, "distributed"), (16, "distributed"), (12, "single")])
def test_many_ranks_oversubscribed_are_exact(problem, n, layout):
    """Up to 16 ranks on 2 cores: emulated service times (sleeps) with a straggler; exact."""
    proc, out = _matmul(n, problem, f"many{n}{layout}.h5", "--service-time", "exp:0.004+straggler:1:20", "--seed", "3",
                        layout=layout, timeout=120)
    assert proc.returncode == 0, proc.stderr
    attrs = assert_exact_run(out, problem[3])
    assert _layout(out)[0] == layout and attrs["lost_ranks"] == "none"


def test_hung_worker_tiles_are_recomputed_elsewhere(problem):
    """Rank 2 hangs after 3 jobs: its tiles are computed (and written) by the others; exact."""
    proc, out = _matmul(8, problem, "hang.h5", "--service-time", "exp:0.003+hang:2:3", "--worker-timeout", "1.5")
    assert proc.returncode == 0, proc.stderr
    attrs = assert_exact_run(out, problem[3])
    assert attrs["reissued"] + attrs["requeued"] > 0 and _layout(out)[0] == "distributed"


def test_deadline_publishes_best_tiles(problem):
    """Stopped by its deadline: every tile of /C at the best resolution it reached, as written
    by its worker; the resolutions completed are exact."""
    # 30 tiles x 4 resolutions at ~0.55 s each on 7 workers: ~9.4 s of work against a 7 s deadline, resolution 0
    # after ~3.1 s (measured), so a slow start-up (a loaded machine, parallel tests: 2.5 s seen) leaves time for it
    proc, out = _matmul(8, problem, "deadline.h5", "--service-time", "shifted-exp:0.5,0.05", "--deadline", "7")
    assert proc.returncode in (0, 3), proc.stderr
    attrs, C, resolutions = read_result_file(out)
    if proc.returncode == 3:
        pytest.skip("no resolution within the deadline on this loaded machine")
    assert attrs["stopped_by"] == "deadline" and not attrs["exact"]
    for r, estimate in resolutions.items():
        if r <= attrs["resolution"]:
            np.testing.assert_array_equal(estimate, problem[3][r])
    with h5py.File(out) as f:
        tile_res = f["tile_resolution"][...]
    for (ti, tj), tr in np.ndenumerate(tile_res):
        rows, cols = slice(ti * TILE[0], (ti + 1) * TILE[0]), slice(tj * TILE[1], (tj + 1) * TILE[1])
        np.testing.assert_array_equal(C[rows, cols], problem[3][tr][rows, cols] if tr >= 0 else 0)


def test_signal_publishes_best_tiles(problem):
    """SIGTERM to every rank: the index is published with every tile at its best resolution
    (parts written before the stop), stopped_by=signal, exit status 143."""
    d, a, b, expected = problem
    out = d / "signal.h5"
    cmd = mpilayer_cmd(4, "matmul", a, b, "-o", out, "--tile", "16,16", "--component-bits", COMP, "--force",
                       "--layout", "distributed", "--service-time", "exp:0.05", "-q")
    proc = subprocess.Popen(cmd, env=mpi_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    until = time.monotonic() + 30
    while not out.exists():  # the first resolution's index
        assert time.monotonic() < until and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and "Traceback" not in err, err
    with h5py.File(out) as f:
        C, tile_res, attrs = f["C"][...], f["tile_resolution"][...], dict(f["C"].attrs)
    assert attrs["stopped_by"] == "signal" and attrs["layout"] == "distributed" and tile_res.min() >= 0
    for (ti, tj), tr in np.ndenumerate(tile_res):
        rows, cols = slice(ti * TILE[0], (ti + 1) * TILE[0]), slice(tj * TILE[1], (tj + 1) * TILE[1])
        np.testing.assert_array_equal(C[rows, cols], expected[tr][rows, cols])


def test_full_disk_for_the_parts_one_line(tmp_path):
    """A worker's part write fails (20 MB tmpfs, C of 2000 x 2000 int64 = 30 MiB): one line
    naming the device error, exit status 2, the previous output kept, no parts left."""
    import tempfile

    directory = tempfile.mkdtemp(prefix="mpilayer-full-")
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", directory],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        os.rmdir(directory)
        pytest.skip(f"cannot mount a small tmpfs here: {mount.stderr.strip()}")
    try:
        write_example(tmp_path / "a.h5", tmp_path / "b.h5", (2000, 64, 2000), "int8", 0)
        out = os.path.join(directory, "c.h5")
        with open(out, "wb") as f:
            f.write(b"previous good output")
        proc = run_mpilayer(3, "matmul", f"{tmp_path}/a.h5:/A", f"{tmp_path}/b.h5:/B", "-o", out, "--force",
                            "--layout", "distributed", "-q", timeout=60)
        assert proc.returncode == 2, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "No space left on device" in lines[0] and directory in lines[0], proc.stderr
        assert open(out, "rb").read() == b"previous good output"
        assert sorted(os.listdir(directory)) == ["c.h5"]
    finally:
        subprocess.run(["umount", "-l", directory])
        os.rmdir(directory)


def test_final_part_not_on_disk_fails_the_run(problem):
    """The workers fsync their final parts in the background (distributed_store.PartSync) and
    wait for them before acknowledging the stop: one that fails (injected EIO) fails the run
    with one line naming the part, and the output keeps the last resolution every tile reached
    before, not labelled exact."""
    d, a, b, expected = problem
    out = d / "unsynced.h5"
    proc = run_mpilayer(3, "matmul", a, b, "-o", out, "--tile", ",".join(map(str, TILE)), "--component-bits", COMP,
                        "--keep", "all", "--force", "--layout", "distributed",
                        env=mpi_env(MPILAYER_FAULT="part-sync"), timeout=90)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "cannot write result part" in lines[0] and "Input/output error" in lines[0], lines
    assert f"r{len(expected) - 1}" in lines[0] and "Traceback" not in proc.stderr
    attrs, _, resolutions = read_result_file(out)  # (tiles may be further than the run: /C mixes them)
    last = len(expected) - 2
    assert not attrs["exact"] and attrs["resolution"] == last
    for r in range(last + 1):
        np.testing.assert_array_equal(resolutions[r], expected[r])


def test_bytes_through_rank_0_stay_below_5_percent(tmp_path):
    """With shared inputs and a distributed result, rank 0 only hands out descriptors, receives
    summaries and takes part in the preparation's reductions: per resolution at most 5% of the
    operand plus result bytes (issue 15's target; measured as ``mpilayer bench mpi`` reports it)."""
    from mpilayer.jobs.bench_mpi import rank0_bytes

    m, k, n = 512, 384, 448
    write_example(tmp_path / "a.h5", tmp_path / "b.h5", (m, k, n), "float32", 0)
    out = tmp_path / "c.h5"
    proc = run_mpilayer(3, "matmul", f"{tmp_path}/a.h5:/A", f"{tmp_path}/b.h5:/B", "-o", out, "--layout", "distributed",
                        "--tile", "128", "--component-bits", "2,2,4", "-q", timeout=60)
    assert proc.returncode == 0, proc.stderr
    result = read_result(out, max_c_bytes=0)
    assert len(result["timeline"]) == 3
    through, share = rank0_bytes(result, 4 * (m * k + k * n) + 8 * m * n)
    assert 0 < through and share <= 0.05, (through, share)
    master = result["ranks"][0]
    assert int(master["bytes_out"]) > int(master["bytes_in"]) > 0  # descriptors out, summaries in


@pytest.mark.parametrize("memory", ["2G", "32M"])
def test_workers_add_increments_to_the_sums_they_kept(tmp_path, memory):
    """16-bit operands, 8+8: the exact resolution's increment (three int8 passes) is added to
    the tile sum the worker kept from resolution 0 instead of the whole product (four), where
    the worker's share of --memory holds the sum (2G); with 32M (an 8 MiB share, a tile of 12
    MiB) it keeps none and computes the whole product. Bit for bit the single file either way."""
    write_example(tmp_path / "a.h5", tmp_path / "b.h5", (1536, 2048, 1024), "int16", 5)
    a, b = f"{tmp_path}/a.h5:/A", f"{tmp_path}/b.h5:/B"
    args = ("--bits", "16", "--component-bits", "8,8", "--tile", "1536,1024", "--keep", "all", "--memory", memory)
    outs = {}
    for layout in ("single", "distributed"):
        outs[layout] = tmp_path / f"{layout}.h5"
        proc = run_mpilayer(3, "matmul", a, b, "-o", outs[layout], "--layout", layout, *args, timeout=90)
        assert proc.returncode == 0, proc.stderr
    single, dist = read_result_file(outs["single"]), read_result_file(outs["distributed"])
    for r in (0, 1):
        np.testing.assert_array_equal(dist[2][r], single[2][r])
    tiles = 1
    # resolution 0: one term per tile; resolution 1: the increment's two terms, or the whole product's one
    assert dist[0]["kernels"] == f"int8:{tiles + (2 if memory == '2G' else 1) * tiles}", dist[0]["kernels"]
