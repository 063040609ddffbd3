"""``mpilayer adaptive`` under real mpiexec: same decisions as one process, equal to exact."""
import h5py
import numpy as np
import pytest
from mpirun import run_mpilayer

from mpilayer.apps.adaptive import adaptive_matmul, threshold, top1
from mpilayer.core.layered import layered_matmul

pytestmark = pytest.mark.mpi


def write(tmp_path, A, B):
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["A"] = A
    with h5py.File(tmp_path / "b.h5", "w") as f:
        f["B"] = B
    return f"{tmp_path}/a.h5:/A", f"{tmp_path}/b.h5:/B"


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("rule", ["top1", "threshold:0"])
def test_decisions_match_single_process_and_exact(tmp_path, n, rule):
    rng = np.random.default_rng(3)
    A = rng.integers(-128, 128, (97, 64)).astype(np.int8)
    B = rng.integers(-128, 128, (64, 6)).astype(np.int8)
    A[:20] = 0
    A[:20, 0] = 127  # clear winners: settle early
    a, b = write(tmp_path, A, B)
    proc = run_mpilayer(n, "adaptive", a, b, "-o", tmp_path / "d.h5", "--rule", rule, "--component-bits", "1")
    assert proc.returncode == 0, proc.stderr
    assert "decisions equal to the rule on the exact product: yes" in proc.stdout
    ref = adaptive_matmul(A, B, top1() if rule == "top1" else threshold(0.0), component_bits=1)
    with h5py.File(tmp_path / "d.h5") as f:
        np.testing.assert_array_equal(f["decisions"][...], ref.decisions)
        np.testing.assert_array_equal(f["resolution"][...], ref.resolution)
        assert f["resolution"][...].min() < 7  # some rows settled before the exact end
        exact = A.astype(np.int64) @ B.astype(np.int64)
        expected = np.argmax(exact, axis=1) if rule == "top1" else exact >= 0
        np.testing.assert_array_equal(f["decisions"][...], expected)
        rel = f["per_resolution"]["relative_error"]  # every resolution's estimate, all rows
        assert rel[-1] == 0 and np.all(rel[:-1] > 0) and rel[0] < 1
        if n == 1:
            res = list(layered_matmul(A, B, component_bits=1, scale="axis"))
            np.testing.assert_allclose(rel, [r.relative_error(res[-1].estimate) for r in res], rtol=1e-12)


@pytest.mark.parametrize("args, needle", [
    (["--rule", "median"], "--rule"),
    (["--bits", "30"], "bits"),
])
def test_bad_options_one_line(tmp_path, args, needle):
    a, b = write(tmp_path, np.ones((4, 3), np.int8), np.ones((3, 2), np.int8))
    proc = run_mpilayer(2, "adaptive", a, b, "-o", tmp_path / "d.h5", *args)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr


def test_missing_dataset_one_line(tmp_path):
    a, b = write(tmp_path, np.ones((4, 3), np.int8), np.ones((3, 2), np.int8))
    proc = run_mpilayer(2, "adaptive", a.replace(":/A", ":/nope"), b, "-o", tmp_path / "d.h5")
    assert proc.returncode == 2 and "nope" in proc.stderr and "Traceback" not in proc.stderr
