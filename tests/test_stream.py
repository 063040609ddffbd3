"""``mpilayer stream`` under a real mpiexec: exact items, bounds at deadlines, A resident once per
worker, missed items, the one-shot comparison, bad inputs, a killed run and a hung worker."""
import os
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest
from mpirun import mpi_env, mpilayer_cmd, run_mpilayer
from reference import exact_int_product

import mpilayer
from mpilayer.core.components import make_split
from mpilayer.core.wire_format import encoded_spec
from mpilayer.jobs.example_stream import write_example_stream

pytestmark = pytest.mark.mpi


def make_stream(tmp_path, shape, items, dtype="int8", seed=0):
    a, x = write_example_stream(tmp_path / "a.h5", tmp_path / "x.h5", shape, items, dtype, seed)
    with h5py.File(tmp_path / "a.h5") as fa, h5py.File(tmp_path / "x.h5") as fx:
        return a, x, fa["A"][...], fx["X"][...]


def read(path, group="/"):
    with h5py.File(path) as f:
        g = f[group]
        out = {name: g[name][...] for name in ("estimates", "items", "tile_resolution", "tile_error_bound")}
        out["attrs"] = dict(g["items"].attrs)
        out["file_attrs"] = dict(f.attrs)
        if "comparison" in f:
            out["comparison"] = f["comparison"][...]
        return out


def tile_slices(m, n, tr, tc):
    return {(i // tr, j // tc): (slice(i, min(i + tr, m)), slice(j, min(j + tc, n)))
            for i in range(0, m, tr) for j in range(0, n, tc)}


def check_bounds(got, A, X, tile):
    """Every tile of every item is within its certified bound of the exact product (zeros and an
    infinite bound where it has no result); item bound = max, met = every tile has a result."""
    m = A.shape[0]
    for t, row in enumerate(got["items"]):
        x = X[t].reshape(A.shape[1], -1)
        exact = exact_int_product(A, x)
        est = got["estimates"][t].reshape(exact.shape)
        res, bnd = got["tile_resolution"][t], got["tile_error_bound"][t]
        for (ti, tj), (rows, cols) in tile_slices(m, exact.shape[1], *tile).items():
            if res[ti, tj] < 0:
                assert not est[rows, cols].any() and np.isinf(bnd[ti, tj])
            else:
                assert np.abs(exact[rows, cols] - est[rows, cols]).max() <= bnd[ti, tj]
        assert row["resolution"] == res.min()
        assert row["error_bound"] == bnd.max()
        assert row["met"] == (res.min() >= 0)
        assert row["state"] in (1, 2)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_generous_deadline_every_item_exact(tmp_path, n):
    a, x, A, X = make_stream(tmp_path, (70, 90, 5), 5)
    proc = run_mpilayer(n, "stream", a, x, "-o", tmp_path / "s.h5", "--component-bits", "1,1,2,4",
                        "--tile", "16,5", "--item-deadline", "120", "--rate", "200")
    assert proc.returncode == 0, proc.stderr
    got = read(tmp_path / "s.h5")
    for t in range(len(X)):
        np.testing.assert_array_equal(got["estimates"][t], exact_int_product(A, X[t]))
    items = got["items"]
    assert items["met"].all() and (items["state"] == 1).all()
    assert (items["resolution"] == 3).all() and (items["resolutions_total"] == 4).all()
    assert (items["error_bound"] == 0).all() and (items["error"] == 0).all()
    assert (items["error_estimate"] == 0).all()  # exact items: no statistical error either
    np.testing.assert_allclose(items["arrival_s"], np.arange(5) / 200)
    np.testing.assert_allclose(items["deadline_s"], np.arange(5) / 200 + 120)
    assert (items["latency_s"] > 0).all() and (items["first_latency_s"] <= items["latency_s"]).all()
    assert (items["finished_s"] >= items["arrival_s"]).all()
    assert "layered" in proc.stdout and "5/5" in proc.stdout


def test_real_vector_items_match_single_process(tmp_path):
    a, x, A, X = make_stream(tmp_path, (40, 64), 3, dtype="float32", seed=2)
    proc = run_mpilayer(2, "stream", a, x, "-o", tmp_path / "s.h5", "--component-bits", "1,3,4", "--tile", "8,1")
    assert proc.returncode == 0, proc.stderr
    got = read(tmp_path / "s.h5")
    assert got["estimates"].shape == (3, 40) and got["estimates"].dtype == np.float64
    for t in range(3):
        *_, last = mpilayer.layered_matmul(A, X[t][:, None], bits=8, component_bits=(1, 3, 4))
        np.testing.assert_array_equal(got["estimates"][t], last.estimate[:, 0])  # bit-identical
    assert "float64 product" in got["file_attrs"]["error_method"]


def test_tight_deadline_bounds_hold(tmp_path):
    a, x, A, X = make_stream(tmp_path, (256, 1500, 24), 8, seed=1)
    deadline = 0.15
    for _ in range(4):
        proc = run_mpilayer(3, "stream", a, x, "-o", tmp_path / "s.h5", "--component-bits", "1",
                            "--tile", "32,24", "--item-deadline", f"{deadline:.3f}", "--force", "-q")
        assert proc.returncode == 0, proc.stderr
        got = read(tmp_path / "s.h5")
        res = got["items"]["resolution"]
        if (res < 7).any() and (res >= 0).any():
            break
        deadline *= 0.4 if (res == 7).all() else 2.5
    check_bounds(got, A, X, (32, 24))
    assert (got["items"]["resolution"] < 7).any()
    assert (got["items"]["state"] == 2).any()


def test_a_sent_once_per_worker(tmp_path):
    a, x, A, X = make_stream(tmp_path, (64, 200, 6), 6)
    proc = run_mpilayer(3, "stream", a, x, "-o", tmp_path / "s.h5", "--tile", "16,6", "-q")
    assert proc.returncode == 0, proc.stderr
    got = read(tmp_path / "s.h5")
    split = make_split(8, tuple(int(w) for w in got["attrs"]["component_bits"]))  # the run's (auto) split
    a_bytes = sum(encoded_spec((16, 200), split.component(c))[0] for c in range(2)) * 4  # 4 tile rows
    x_bytes = sum(encoded_spec((200, 6), split.component(c))[0] for c in range(2))
    np.testing.assert_array_equal(got["attrs"]["a_bytes_per_worker"], [a_bytes, a_bytes])  # 2 workers
    per_item = got["items"]["bytes_sent"]
    # each item's components go at most once to each worker, and A never again
    assert (per_item >= x_bytes).all() and (per_item <= 2 * x_bytes).all()
    assert per_item.max() < a_bytes


@pytest.mark.parametrize("reissue", ["on", "off"])
def test_hung_worker_is_survived(tmp_path, reissue):
    """Rank 2 stops answering after 3 jobs: the engine copies its jobs to other workers (re-issue)
    or, without re-issue, declares it lost and re-queues them; every item still ends exact, and
    the stop does not wait for it forever (MPI_Abort(0) after publishing)."""
    a, x, A, X = make_stream(tmp_path, (70, 90, 5), 8, seed=4)
    t0 = time.monotonic()
    proc = run_mpilayer(4, "stream", a, x, "-o", tmp_path / "s.h5", "--component-bits", "1,1,2,4", "--tile", "16,5",
                        "--service-time", "exp:0.003+hang:2:3", "--worker-timeout", "1.5", "--reissue", reissue,
                        "-q", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 < 30
    got = read(tmp_path / "s.h5")
    for t in range(len(X)):
        np.testing.assert_array_equal(got["estimates"][t], exact_int_product(A, X[t]))
    assert (got["items"]["state"] == 1).all() and (got["items"]["resolution"] == 3).all()
    if reissue == "on":
        assert got["attrs"]["reissued"] > 0
    else:
        assert got["attrs"]["reissued"] == 0 and got["attrs"]["requeued"] > 0 and got["attrs"]["lost_ranks"] == "2"
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("mpilayer")]
    assert len(lines) == 1 and "warning" in lines[0] and "rank(s) 2" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("n", [3, 1])
def test_every_worker_hung_items_missed_exit_4(tmp_path, n):
    """Every worker (rank 0 alone with one rank) answers 5 jobs, then hangs: the items finished
    by then are kept, the others are closed as missed, one error line, exit status 4."""
    a, x, A, X = make_stream(tmp_path, (70, 90, 5), 8, seed=4)
    spec = "hang:all:5" if n > 1 else "hang:0:5"
    proc = run_mpilayer(n, "stream", a, x, "-o", tmp_path / "s.h5", "--component-bits", "1,1,2,4", "--tile", "16,5",
                        "--service-time", spec, "--worker-timeout", "1", "-q", timeout=60)
    assert proc.returncode == 4, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("mpilayer")]
    assert len(lines) == 1 and "no worker left" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    got = read(tmp_path / "s.h5")
    assert (got["items"]["state"] == 2).all() and got["attrs"]["lost_ranks"] == ("1,2" if n > 1 else "0")
    assert (got["items"]["resolution"] < 3).all() and (got["items"]["resolution"] == -1).any()
    check_bounds(got, A, X, (16, 5))


def test_items_past_their_deadline_are_missed(tmp_path):
    a, x, A, X = make_stream(tmp_path, (300, 400, 16), 4)
    proc = run_mpilayer(2, "stream", a, x, "-o", tmp_path / "s.h5", "--item-deadline", "0", "--rate", "100")
    assert proc.returncode == 0, proc.stderr
    got = read(tmp_path / "s.h5")
    items = got["items"]
    assert not items["met"].any() and (items["resolution"] == -1).all() and (items["state"] == 2).all()
    assert np.isinf(items["error_bound"]).all() and not got["estimates"].any()
    assert "MISSED" in proc.stdout


def test_one_shot_comparison_is_consistent(tmp_path):
    a, x, A, X = make_stream(tmp_path, (128, 600, 16), 6, seed=3)
    proc = run_mpilayer(3, "stream", a, x, "-o", tmp_path / "s.h5", "--compare", "one-shot", "--rate", "40",
                        "--item-deadline", "0.02", "--tile", "32,16", "-q")
    assert proc.returncode == 0, proc.stderr
    lay, one = read(tmp_path / "s.h5"), read(tmp_path / "s.h5", "one_shot")
    check_bounds(lay, A, X, (32, 16))
    check_bounds(one, A, X, (32, 16))
    np.testing.assert_array_equal(lay["items"]["arrival_s"], one["items"]["arrival_s"])
    np.testing.assert_array_equal(lay["items"]["deadline_s"], one["items"]["deadline_s"])
    assert (one["items"]["resolutions_total"] == 1).all() and set(one["items"]["resolution"]) <= {-1, 0}
    assert (one["items"]["error"][one["items"]["met"]] == 0).all()
    comp = lay["comparison"]
    assert [m.decode() for m in comp["mode"]] == ["layered", "one-shot"]
    for row, got in zip(comp, (lay, one)):
        items = got["items"]
        assert row["items"] == 6 and row["usable"] == items["met"].sum()
        assert row["usable_fraction"] == pytest.approx(items["met"].mean())
        assert row["exact"] == (items["resolution"] == items["resolutions_total"] - 1).sum()
        assert row["mean_error"] == pytest.approx(items["error"].mean())
        assert row["throughput_items_per_s"] == pytest.approx(row["usable"] / items["finished_s"].max())
        assert row["mean_bytes_per_item"] == pytest.approx(items["bytes_sent"].mean())
        for t in range(6):
            exact = exact_int_product(A, X[t])
            assert items["error"][t] == np.abs(exact - got["estimates"][t]).max()
            # every item with a result carries its statistical relative error; none without
            estimate = items["error_estimate"][t]
            assert (0 <= estimate < 1.5) if items["resolution"][t] >= 0 else np.isnan(estimate)
            assert estimate == 0 or items["resolution"][t] < items["resolutions_total"][t] - 1
    assert "layered" in proc.stdout and "one-shot" in proc.stdout and "usable by deadline" in proc.stdout


def _bad_inputs(tmp_path):
    a, x, A, X = make_stream(tmp_path, (8, 9, 3), 2)
    p = tmp_path
    with h5py.File(p / "bad.h5", "w") as f:
        f["x4"] = np.zeros((2, 9, 3, 1), np.int8)
        f["wrongk"] = np.zeros((2, 7, 3), np.int8)
        f["c128"] = np.zeros((2, 9, 3), np.complex128)
        nan = np.zeros((2, 9, 3))
        nan[1, 4, 2] = np.nan
        f["nan"] = nan
        f["big"] = np.full((2, 9, 3), 1000, np.int16)
        f.create_group("grp")
    (p / "corrupt.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(3000))
    out = str(p / "s.h5")
    return [
        ([str(p / "missing.h5") + ":/A", x, "-o", out], "missing.h5"),
        ([a, str(p / "x.h5") + ":/nope", "-o", out], "nope"),
        ([a, str(p / "bad.h5") + ":/x4", "-o", out], "(T, K, B)"),
        ([a, str(p / "bad.h5") + ":/grp", "-o", out], "group"),
        ([a, str(p / "bad.h5") + ":/wrongk", "-o", out], "cannot multiply"),
        ([a, str(p / "bad.h5") + ":/c128", "-o", out], "complex"),
        ([a, str(p / "bad.h5") + ":/nan", "-o", out], "item 1"),
        ([a, str(p / "bad.h5") + ":/big", "-o", out], "bits"),
        ([a, str(p / "corrupt.h5") + ":/X", "-o", out], "corrupt.h5"),
        ([a, x, "-o", str(p / "no_such_dir" / "s.h5")], "no_such_dir"),
        ([a, x, "-o", out, "--rate", "0"], "rate"),
        ([a, x, "-o", out, "--bits", "40"], "bits"),
    ]


@pytest.mark.parametrize("n", [1, 3])
def test_bad_inputs_give_one_line_and_clean_exit(tmp_path, n):
    cases = _bad_inputs(tmp_path)
    if n == 1:
        cases = cases[::3]  # the same code path; a sample keeps the test short
    for args, needle in cases:
        proc = run_mpilayer(n, "stream", *args, timeout=60)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        lines = [ln for ln in proc.stderr.strip().splitlines() if "error" in ln.lower()]
        assert len(lines) == 1, (args, proc.stderr)
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "s.h5").exists()
    assert not list(tmp_path.glob(".s.h5.*")), "scratch files left behind"


def test_existing_output_needs_force(tmp_path):
    a, x, A, X = make_stream(tmp_path, (8, 9, 3), 2)
    out = tmp_path / "s.h5"
    out.write_bytes(b"old")
    proc = run_mpilayer(2, "stream", a, x, "-o", out)
    assert proc.returncode == 2 and "--force" in proc.stderr
    assert run_mpilayer(2, "stream", a, x, "-o", out, "--force", "-q").returncode == 0


def test_killed_run_leaves_every_finished_item(tmp_path):
    a, x, A, X = make_stream(tmp_path, (64, 100, 4), 40)
    out = tmp_path / "s.h5"
    proc = subprocess.Popen(mpilayer_cmd(2, "stream", a, x, "-o", out, "--rate", "10", "-q"),
                            env=mpi_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not out.exists():
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    got = read(out)
    done = np.nonzero(got["items"]["state"] != 0)[0]
    assert 1 <= len(done) < 40
    for t in done:
        np.testing.assert_array_equal(got["estimates"][t], exact_int_product(A, X[t]))
    assert (got["items"]["resolution"][got["items"]["state"] == 0] == -1).all()
