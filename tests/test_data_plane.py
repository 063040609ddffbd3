"""Workers read their own operand blocks (mpilayer.mpi.data_plane) under a real mpiexec: results
bit-identical to the master-sent path at every resolution, and the fallback when a worker
cannot open an input."""
import h5py
import numpy as np
import pytest
from mpirun import mpi_env, run_mpilayer

from mpilayer.io.example_data import write_example

pytestmark = pytest.mark.mpi


def run(tmp_path, name, ranks, a, b, *extra, **env):
    out = tmp_path / f"{name}.h5"
    proc = run_mpilayer(ranks, "matmul", a, b, "-o", out, "--keep", "all", *extra, env=mpi_env(**env), timeout=60)
    assert proc.returncode == 0, proc.stderr
    with h5py.File(out) as f:
        resolutions = {int(k): v[...] for k, v in f["resolutions"].items()}
        sent = int(f["timeline"]["bytes_sent"].sum())
        assert f["C"].attrs["exact"]
    return resolutions, sent, proc


@pytest.mark.parametrize("dtype, extra", [
    ("float32", ("--scale", "axis", "--component-bits", "2,2,4")),
    ("int8", ("--component-bits", "1,1,2,4", "--k-panel", "32")),
])
def test_worker_read_blocks_are_bit_identical(tmp_path, dtype, extra):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    write_example(a, b, (70, 100, 90), dtype, 3)
    a, b = f"{a}:/A", f"{b}:/B"
    args = (*extra, "--tile", "32,24")
    sent, sent_bytes, _ = run(tmp_path, "sent", 3, a, b, *args, MPILAYER_DATA_PLANE="0")
    read, read_bytes, proc = run(tmp_path, "read", 3, a, b, *args)
    mixed, _, mixed_proc = run(tmp_path, "mixed", 4, a, b, *args, MPILAYER_FAULT="no-input:2")
    assert sorted(sent) == sorted(read) == sorted(mixed) and len(sent) >= 3
    for r in sent:
        np.testing.assert_array_equal(read[r], sent[r])
        np.testing.assert_array_equal(mixed[r], sent[r])
    assert sent_bytes > 0 and read_bytes == 0  # no component through rank 0 when every worker reads
    assert "cannot open" not in proc.stdout + proc.stderr
    fallback = [line for line in mixed_proc.stdout.splitlines() if "cannot open" in line]
    assert len(fallback) == 2 and all(line.startswith("worker rank 2 cannot open ") for line in fallback), \
        mixed_proc.stdout
    assert "the master sends its A blocks" in fallback[0] and str(tmp_path / "a.h5") in fallback[0]


@pytest.mark.parametrize("what", ["nan", "range"])
def test_bad_values_found_by_a_worker_give_the_serial_error(tmp_path, what):
    """The preparation is shared by all ranks (parallel_prep.py): a NaN in A's row block 2, or an
    integer out of --bits range in B's column block 3 (both read by a worker at -n 4), gives the
    same one-line error and exit status 2 as one process."""
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    rng = np.random.default_rng(1)
    A, B = rng.integers(-8, 8, (64, 40)), rng.integers(-8, 8, (40, 64))
    A, B = (A.astype(np.float32), B.astype(np.float32)) if what == "nan" else (A.astype(np.int8), B.astype(np.int8))
    if what == "nan":
        A[40, 7] = np.nan
    else:
        B[5, 50] = 100
    with h5py.File(a, "w") as fa, h5py.File(b, "w") as fb:
        fa["A"], fb["B"] = A, B
    args = ("matmul", f"{a}:/A", f"{b}:/B", "-o", tmp_path / "c.h5", "--tile", "16,16", "--bits", "4")
    lines = []
    for ranks in (1, 4):
        proc = run_mpilayer(ranks, *args, timeout=60)
        assert proc.returncode == 2, proc.stderr
        errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
        assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
        lines.append(errors[0])
    assert lines[0] == lines[1]
    assert ("NaN" in lines[0] and "row 40" in lines[0]) if what == "nan" else "100" in lines[0], lines[0]
    assert not (tmp_path / "c.h5").exists()
