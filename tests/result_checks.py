"""Checks shared by the MPI tests: a result file against the one-process layered product."""
import h5py
import numpy as np


def example_problem(d, shape, seed: int, component_bits: tuple):
    """Inputs ``d/a.h5:/A``, ``d/b.h5:/B`` (int8, mpilayer.io.example_data) and the one-process
    layered product's estimate at every resolution: ``(d, a, b, expected)``."""
    import mpilayer
    from mpilayer.io.example_data import write_example

    write_example(d / "a.h5", d / "b.h5", shape, "int8", seed)
    with h5py.File(d / "a.h5") as fa, h5py.File(d / "b.h5") as fb:
        A, B = fa["A"][...], fb["B"][...]
    expected = [r.estimate for r in mpilayer.layered_matmul(A, B, component_bits=component_bits)]
    return d, f"{d}/a.h5:/A", f"{d}/b.h5:/B", expected


def read_result_file(out):
    """``(attrs of /C, /C, {resolution: /resolutions/<r>})`` of a ``--keep all`` result."""
    with h5py.File(out) as f:
        return dict(f["C"].attrs), f["C"][...], {int(k): v[...] for k, v in f["resolutions"].items()}


def assert_exact_run(out, expected: list) -> dict:
    """The run completed, and every resolution is bit-identical to ``expected`` (the estimates
    of mpilayer.layered_matmul in one process); returns the attributes of /C."""
    attrs, C, resolutions = read_result_file(out)
    assert attrs["exact"] and attrs["stopped_by"] == "complete"
    assert sorted(resolutions) == list(range(len(expected)))
    for r, estimate in enumerate(expected):
        np.testing.assert_array_equal(resolutions[r], estimate)
    np.testing.assert_array_equal(C, expected[-1])
    return attrs
