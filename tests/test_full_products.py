"""Jobs that compute the whole product T_A(r) T_B(r) (master.Master._full_products) give the same
integers as the increments' terms: every resolution bit for bit against the single-process
product, with the choice forced off and on, float32 (fused quantise-and-encode, lazy statistics)
and int16 (compiled sums of 16-bit operands), k-panels and ranks."""
import numpy as np
import pytest

import mpilayer

from mpirun import mpi_env, run_mpilayer
from test_mpi_matmul import make_inputs, read

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("full", ["0", "1"])
@pytest.mark.parametrize("dtype, bits, comp, k_panel, ranks", [
    ("float32", 8, "7,1", None, 3), ("float32", 8, "1,1,2,4", 40, 2), ("float32", 12, "4,8", None, 3),
    ("int16", 16, "8,8", 50, 3),
])
def test_full_products_match_single_process(tmp_path, full, dtype, bits, comp, k_panel, ranks):
    a, b, A, B = make_inputs(tmp_path, (61, 131, 45), dtype)
    extra = ["--k-panel", k_panel] if k_panel else []
    proc = run_mpilayer(ranks, "matmul", a, b, "-o", tmp_path / "c.h5", "--bits", bits, "--component-bits", comp,
                        "--tile", "32,20", "--keep", "all", *extra, env=mpi_env(MPILAYER_FULL_PRODUCTS=full))
    assert proc.returncode == 0, proc.stderr
    widths = tuple(map(int, comp.split(",")))
    expected = list(mpilayer.layered_matmul(A, B, bits=bits, component_bits=widths))
    got = read(tmp_path / "c.h5")
    assert got["attrs"]["exact"]
    for res in expected:
        np.testing.assert_array_equal(got["resolutions"][res.index], res.estimate)
    np.testing.assert_array_equal(got["C"], expected[-1].estimate)
