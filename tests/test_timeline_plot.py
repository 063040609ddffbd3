"""``mpilayer info RESULT --plot IMAGE``: the picture holds the result's /timeline; bad files and
unwritable images are one-line errors."""
import subprocess
import sys

import matplotlib.figure
import numpy as np
import pytest

from mpilayer.errors import InputError, OutputError
from mpilayer.io.example_data import write_example
from mpilayer.io.result_store import read_result
from mpilayer.io.timeline_plot import plot_timeline


def _mpilayer(*args):
    return subprocess.run([sys.executable, "-m", "mpilayer", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    d = tmp_path_factory.mktemp("plot")
    write_example(d / "a.h5", d / "b.h5", (120, 90, 80), "float32", 0)
    proc = _mpilayer("matmul", f"{d}/a.h5:/A", f"{d}/b.h5:/B", "-o", d / "c.h5", "--bits", "6",
                     "--component-bits", "1", "--tile", "40", "-q")
    assert proc.returncode == 0, proc.stderr
    return d / "c.h5"


def test_the_plot_draws_the_timeline(result, tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: drawn.append(fig))
    plot_timeline(result, tmp_path / "t.png")
    timeline = read_result(result, max_c_bytes=0)["timeline"]
    left, right = drawn[0].axes
    (est,), (bound,) = left.get_lines()[:1], right.get_lines()[:1]
    last = len(timeline) - 1  # the exact resolution: error 0, a vertical line instead of a point
    assert timeline["error_bound"][last] == 0 and np.all(timeline["error_bound"][:last] > 0)
    np.testing.assert_array_equal(est.get_ydata(), timeline["error_estimate"][:last])
    np.testing.assert_array_equal(bound.get_ydata(), timeline["error_bound"][:last])
    np.testing.assert_array_equal(bound.get_xdata(), timeline["elapsed_s"][:last])
    assert left.get_yscale() == right.get_yscale() == "log"
    assert any("exact" in text.get_text() for text in right.get_legend().get_texts())
    assert any("quantisation" in text.get_text() for text in left.get_legend().get_texts())  # real inputs


def test_info_writes_the_image(result, tmp_path):
    proc = _mpilayer("info", result, "--plot", tmp_path / "t.png")
    assert proc.returncode == 0 and "timeline plot ->" in proc.stdout, proc.stderr
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_inputs_and_outputs_are_one_line(result, tmp_path):
    with pytest.raises(OutputError, match="cannot write"):
        plot_timeline(result, tmp_path / "missing-dir" / "t.png")
    with pytest.raises(InputError):
        plot_timeline(tmp_path / "none.h5", tmp_path / "t.png")
    proc = _mpilayer("info", result, "--plot", tmp_path / "missing-dir" / "t.png")
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(errors) == 1 and "cannot write" in errors[0], proc.stderr
