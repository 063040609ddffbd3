"""The MPI run under a real mpiexec: exactness, deadlines, crash safety, errors."""
import os
import random
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest
from mpirun import mpi_env, mpilayer_cmd, run_mpilayer
from reference import exact_int_product

import mpilayer
from mpilayer.io.example_data import write_example

pytestmark = pytest.mark.mpi
RANKS = [1, 2, 4]


def make_inputs(tmp_path, shape, dtype="int8", seed=0):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    write_example(a, b, shape, dtype, seed)
    with h5py.File(a) as fa, h5py.File(b) as fb:
        return f"{a}:/A", f"{b}:/B", fa["A"][...], fb["B"][...]


def read(path):
    with h5py.File(path) as f:
        out = {"C": f["C"][...], "attrs": dict(f["C"].attrs),
               "tile_resolution": f["tile_resolution"][...], "tile_error_bound": f["tile_error_bound"][...]}
        if "resolutions" in f:
            out["resolutions"] = {int(k): v[...] for k, v in f["resolutions"].items()}
        if "timeline" in f:
            out["timeline"] = f["timeline"][...]
        return out


def tile_slices(shape, tile):
    (m, n), (tr, tc) = shape, tile
    return [[(slice(i, min(i + tr, m)), slice(j, min(j + tc, n))) for j in range(0, n, tc)]
            for i in range(0, m, tr)]


@pytest.mark.parametrize("n", RANKS)
@pytest.mark.parametrize("dtype, comp", [("int8", "1,1,2,4"), ("float32", "1"), ("int16", "1,3")])
def test_every_resolution_matches_single_process(tmp_path, n, dtype, comp):
    shape = (70, 131, 45) if dtype != "int16" else (33, 70, 29)
    a, b, A, B = make_inputs(tmp_path, shape, dtype)
    bits = 4 if dtype == "int16" else 8
    if dtype == "int16":  # int16 example data spans the full range: fit it into 4 bits
        A = (A.astype(np.int64) >> 12).astype(np.int16)
        B = (B.astype(np.int64) >> 12).astype(np.int16)
        with h5py.File(tmp_path / "a.h5", "r+") as f:
            f["A"][...] = A
        with h5py.File(tmp_path / "b.h5", "r+") as f:
            f["B"][...] = B
    out = tmp_path / "c.h5"
    proc = run_mpilayer(n, "matmul", a, b, "-o", out, "--bits", bits, "--component-bits", comp,
                        "--tile", "32,20", "--keep", "all")
    assert proc.returncode == 0, proc.stderr
    expected = list(mpilayer.layered_matmul(A, B, bits=bits, component_bits=tuple(map(int, comp.split(",")))
                                            if "," in comp else int(comp)))
    got = read(out)
    assert got["attrs"]["exact"] and got["attrs"]["stopped_by"] == "complete"
    assert got["attrs"]["resolution"] == len(expected) - 1 == got["attrs"]["resolutions_total"] - 1
    assert sorted(got["resolutions"]) == list(range(len(expected)))
    for res in expected:
        np.testing.assert_array_equal(got["resolutions"][res.index], res.estimate)  # bit-identical
    np.testing.assert_array_equal(got["C"], expected[-1].estimate)
    if dtype != "float32":
        np.testing.assert_array_equal(got["C"], exact_int_product(A, B))
    assert len(got["timeline"]) == len(expected)
    assert "reached resolution" in proc.stdout


def test_generous_deadline_is_exact_and_tight_one_is_bounded(tmp_path):
    a, b, A, B = make_inputs(tmp_path, (600, 1500, 600), "int8")
    exact = exact_int_product(A, B)
    proc = run_mpilayer(2, "matmul", a, b, "-o", tmp_path / "full.h5", "--deadline", "600",
                        "--component-bits", "1", "--tile", "128,128")
    assert proc.returncode == 0, proc.stderr
    full = read(tmp_path / "full.h5")
    assert full["attrs"]["exact"] and full["attrs"]["stopped_by"] == "complete"
    np.testing.assert_array_equal(full["C"], exact)

    # aim between the first and the last resolution of the full run; move if the machine's
    # speed changed (exit 3: nothing by the deadline; "complete": everything by it)
    # (bisecting between a deadline that was too early and one that was too late)
    times = [float(t) for t in full["timeline"]["elapsed_s"]]
    deadline, early, late = (times[0] + times[-1]) / 2, None, None
    for _ in range(8):
        proc = run_mpilayer(3, "matmul", a, b, "-o", tmp_path / "tight.h5", "--deadline", f"{deadline:.3f}",
                            "--component-bits", "1", "--tile", "128,128", "--force")
        assert proc.returncode in (0, 3), proc.stderr
        tight = read(tmp_path / "tight.h5")
        attrs = tight["attrs"]
        if proc.returncode == 0 and attrs["stopped_by"] == "deadline":
            break
        early, late = (deadline, late) if proc.returncode == 3 else (early, deadline)
        deadline = (early + late) / 2 if early and late else deadline * (1.5 if proc.returncode == 3 else 0.6)
    assert "overshoot" in proc.stdout
    assert attrs["stopped_by"] == "deadline" and not attrs["exact"]
    assert attrs["resolution"] < attrs["resolutions_total"] - 1
    assert attrs["resolution"] == tight["tile_resolution"].min()
    assert attrs["error_bound"] == tight["tile_error_bound"].max()
    err = np.abs(tight["C"] - exact)
    for row in tile_slices(A.shape[:1] + B.shape[1:], (128, 128)):
        for rows, cols in row:
            ti, tj = rows.start // 128, cols.start // 128
            r = tight["tile_resolution"][ti, tj]
            if r < 0:
                assert not tight["C"][rows, cols].any()
            else:
                assert err[rows, cols].max() <= tight["tile_error_bound"][ti, tj]


def _rank_pids(root_pid):
    """``{rank: pid}`` of the python processes launched under ``root_pid``."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children = {}
    for line in out.split("\n"):
        if line.strip():
            pid, ppid = map(int, line.split())
            children.setdefault(ppid, []).append(pid)
    ranks, stack = {}, [root_pid]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if b"mpilayer" in cmd and b"mpiexec" not in cmd:
            for item in env:
                if item.startswith(b"PMI_RANK="):
                    ranks[int(item[9:])] = pid
    return ranks


@pytest.mark.parametrize("victim", ["worker", "master"])
def test_sigkill_leaves_a_readable_correct_file(tmp_path, victim):
    a, b, A, B = make_inputs(tmp_path, (512, 2000, 512), "int8", seed=3)
    expected = {r.index: r.estimate for r in mpilayer.layered_matmul(A, B, component_bits=1)}
    rng = random.Random(7 if victim == "worker" else 8)
    outcomes = []
    for attempt in range(3):
        out = tmp_path / f"c{attempt}.h5"
        # emulated service times stretch the run (128 jobs, ~2 s on 2 workers: the kernels alone
        # finish it in ~0.2 s after a start-up that takes 0.4-2.5 s, depending on the load); the
        # kill comes at a random moment after the first publish, whatever the start-up took
        proc = subprocess.Popen(mpilayer_cmd(3, "matmul", a, b, "-o", out, "--component-bits", "1",
                                             "--tile", "128,128", "--service-time", "exp:0.03", "-q"),
                                env=mpi_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        until = time.monotonic() + 30
        while not out.exists() and proc.poll() is None and time.monotonic() < until:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.5))
        pids = _rank_pids(proc.pid)
        target = pids.get(0 if victim == "master" else 1)
        if target:
            os.kill(target, signal.SIGKILL)
        try:
            proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.2)
        assert not any(os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/stat").read().split()[2] != "Z"
                       for p in pids.values()), "a rank outlived the run"
        if not out.exists():
            outcomes.append("none")  # killed before the first resolution was published
            continue
        got = read(out)
        attrs = got["attrs"]
        assert attrs["resolution"] == got["tile_resolution"].min()
        for rows_cols in tile_slices(A.shape[:1] + B.shape[1:], (128, 128)):
            for rows, cols in rows_cols:
                r = got["tile_resolution"][rows.start // 128, cols.start // 128]
                assert r >= 0
                np.testing.assert_array_equal(got["C"][rows, cols], expected[r][rows, cols])
        outcomes.append(attrs["resolution"])
    assert any(o != "none" for o in outcomes), outcomes


def _bad_inputs(tmp_path):
    a, b, A, B = make_inputs(tmp_path, (8, 9, 7))
    p = tmp_path
    with h5py.File(p / "bad.h5", "w") as f:
        f["vec"] = np.zeros(5)
        f["c128"] = np.zeros((9, 7), np.complex128)
        f["nan"] = np.array([[1.0, np.nan], [0, 1]] + [[0, 0]] * 7)[:9].reshape(9, 2)
        f["wrong"] = np.zeros((5, 7), np.int8)
        f.create_group("grp")
    (p / "corrupt.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(3000))
    out = str(p / "c.h5")
    return [
        ([str(p / "missing.h5") + ":/A", b, "-o", out], "missing.h5"),
        ([str(p / "a.h5") + ":/nope", b, "-o", out], "nope"),
        ([str(p / "bad.h5") + ":/vec", b, "-o", out], "2-D"),
        ([str(p / "bad.h5") + ":/grp", b, "-o", out], "group"),
        ([a, str(p / "bad.h5") + ":/wrong", "-o", out], "cannot multiply"),
        ([a, str(p / "bad.h5") + ":/c128", "-o", out], "complex"),
        ([str(p / "bad.h5") + ":/nan", str(p / "bad.h5") + ":/nan", "-o", out], "NaN"),
        ([str(p / "corrupt.h5") + ":/A", b, "-o", out], "corrupt.h5"),
        ([a, b, "-o", str(p / "no_such_dir" / "c.h5")], "no_such_dir"),
        ([a, b, "-o", out, "--deadline", "-1"], "deadline"),
        ([a, b, "-o", out, "--bits", "40"], "bits"),
    ]


@pytest.mark.parametrize("n", [1, 3])
def test_bad_inputs_give_one_line_and_clean_exit(tmp_path, n):
    for args, needle in _bad_inputs(tmp_path):
        t0 = time.monotonic()
        proc = run_mpilayer(n, "matmul", *args, timeout=60)
        assert proc.returncode != 0, (args, proc.stdout)
        lines = [ln for ln in proc.stderr.strip().splitlines() if "error" in ln.lower()]
        assert len(lines) == 1, (args, proc.stderr)
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
        assert "Traceback" not in proc.stderr
        assert time.monotonic() - t0 < 30
    assert not (tmp_path / "c.h5").exists()


def test_existing_output_needs_force(tmp_path):
    a, b, A, B = make_inputs(tmp_path, (8, 9, 7))
    out = tmp_path / "c.h5"
    assert run_mpilayer(2, "matmul", a, b, "-o", out).returncode == 0
    proc = run_mpilayer(2, "matmul", a, b, "-o", out)
    assert proc.returncode == 2 and "--force" in proc.stderr
    assert run_mpilayer(2, "matmul", a, b, "-o", out, "--force").returncode == 0


@pytest.mark.parametrize("layout", ["single", "distributed"])
def test_worker_exception_ends_every_rank(tmp_path, layout):
    a, b, A, B = make_inputs(tmp_path, (64, 64, 64))
    proc = run_mpilayer(3, "matmul", a, b, "-o", tmp_path / "c.h5", "--tile", "16,16", "--layout", layout,
                        env=mpi_env(MPILAYER_FAULT="worker-raise"), timeout=60)
    assert proc.returncode == 1
    assert "worker rank" in proc.stderr and "injected fault" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_memory_budget_with_operands_larger_than_it(tmp_path):
    """Each operand is 64 MiB, the budget 32 MiB: every rank's peak memory above its start-up
    baseline stays within the budget, and the product is exact."""
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    write_example(a, b, (96, 1 << 19, 80), "int8", 4)  # A: 96 x 524288 = 48 MiB, B: 40 MiB
    proc = run_mpilayer(3, "matmul", f"{a}:/A", f"{b}:/B", "-o", tmp_path / "c.h5", "--memory", "32M",
                        timeout=300)
    assert proc.returncode == 0, proc.stderr
    from mpilayer.io.result_store import read_result
    result = read_result(tmp_path / "c.h5")
    assert result["attrs"]["exact"]
    for row in result["ranks"]:
        grown = row["peak_rss_bytes"] - row["baseline_rss_bytes"]
        assert grown <= 32 * 2**20, (row["rank"], grown / 2**20)
    with h5py.File(a) as fa, h5py.File(b) as fb:
        A, B = fa["A"][...], fb["B"][...]
    np.testing.assert_array_equal(result["C"], exact_int_product(A, B))


def test_accumulators_spill_beyond_budget(tmp_path):
    """C (1200 x 1100 int64, 10 MiB) exceeds the accumulators' share of a 32 MiB budget."""
    a, b, A, B = make_inputs(tmp_path, (1200, 70, 1100), "int8", seed=5)
    proc = run_mpilayer(2, "matmul", a, b, "-o", tmp_path / "c.h5", "--memory", "32M",
                        "--tile", "128,128", "--component-bits", "1,1,6")
    assert proc.returncode == 0, proc.stderr
    got = read(tmp_path / "c.h5")
    assert got["attrs"]["accumulator_spills"] > 0
    np.testing.assert_array_equal(got["C"], exact_int_product(A, B))
    assert not list(tmp_path.glob(".c.h5.*")), "scratch files left behind"


def test_deadline_before_first_resolution_fails_clearly(tmp_path):
    a, b, A, B = make_inputs(tmp_path, (300, 400, 300))
    proc = run_mpilayer(2, "matmul", a, b, "-o", tmp_path / "c.h5", "--deadline", "0")
    assert proc.returncode == 3
    assert "before the first resolution" in proc.stderr and "Traceback" not in proc.stderr
    got = read(tmp_path / "c.h5")
    assert got["attrs"]["resolution"] == -1 and got["attrs"]["stopped_by"] == "deadline"


@pytest.mark.parametrize("n", [1, 3])
def test_axis_scales_match_single_process(tmp_path, n):
    """Real inputs with a scale per row of A and per column of B, over several tiles and
    k-panels: every resolution bit-identical to layered_matmul(scale="axis")."""
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    rng = np.random.default_rng(8)
    A = rng.standard_normal((50, 300)) * rng.uniform(0.01, 100, (50, 1))
    B = rng.standard_normal((300, 40)) * rng.uniform(0.01, 100, (1, 40))
    with h5py.File(a, "w") as f:
        f["A"] = A
    with h5py.File(b, "w") as f:
        f["B"] = B.astype(np.float32)
    proc = run_mpilayer(n, "matmul", f"{a}:/A", f"{b}:/B", "-o", tmp_path / "c.h5", "--scale", "axis",
                        "--component-bits", "1,1,2,4", "--tile", "16,16", "--k-panel", "128", "--keep", "all")
    assert proc.returncode == 0, proc.stderr
    got = read(tmp_path / "c.h5")
    for res in mpilayer.layered_matmul(A, B.astype(np.float32), component_bits=(1, 1, 2, 4), scale="axis"):
        np.testing.assert_array_equal(got["resolutions"][res.index], res.estimate)


@pytest.mark.parametrize("layout", ["single", "distributed"])
def test_quantisation_error_estimate_of_real_inputs(tmp_path, layout):
    """Real inputs: the result says how far the exact quantised product P is from the real A B
    (statistical estimate, in /C's attributes and `info`), within a small factor of the
    measured |A B - P|_F / |P|_F; integer inputs have none."""
    a, b, A, B = make_inputs(tmp_path, (96, 300, 80), dtype="float32", seed=4)
    out = tmp_path / "c.h5"
    proc = run_mpilayer(3, "matmul", a, b, "-o", out, "--layout", layout, "--tile", "32,40", "-q")
    assert proc.returncode == 0, proc.stderr
    with h5py.File(out, "r") as f:
        C, est = f["C"][...], float(f["C"].attrs["quantization_error_estimate"])
    exact = A.astype(np.float64) @ B.astype(np.float64)
    measured = np.linalg.norm(exact - C) / np.linalg.norm(C)
    assert 0.7 * measured <= est <= 1.5 * measured, (est, measured)
    assert "quantisation" in run_mpilayer(1, "info", out).stdout
    (tmp_path / "int").mkdir()
    ai, bi, _, _ = make_inputs(tmp_path / "int", (40, 50, 30))
    proc = run_mpilayer(2, "matmul", ai, bi, "-o", tmp_path / "ci.h5", "-q")
    assert proc.returncode == 0, proc.stderr
    with h5py.File(tmp_path / "ci.h5", "r") as f:
        assert f["C"].attrs["quantization_error_estimate"] == 0
