import io
import os
import pty
import subprocess
import sys

from mpilayer.io.example_data import write_example
from mpilayer.mpi.progress import ProgressBar


def test_bar_draws_and_clears():
    out = io.StringIO()
    bar = ProgressBar(10, 3, stream=out, enabled=True)
    bar.update(1, 4, 2.5, force=True)
    assert "resolution 1 of 0..2: 4/10 tiles" in out.getvalue() and "############" in out.getvalue()
    bar.clear()
    assert out.getvalue().endswith("\r")


def test_no_bar_without_terminal():
    out = io.StringIO()
    bar = ProgressBar(10, 3, stream=out)
    bar.update(0, 1, 0.1, force=True)
    assert out.getvalue() == ""  # and no line in the first interval


def test_log_lines_without_terminal():
    """A log file gets plain lines, each at most every interval; -q (enabled=False) none."""
    out = io.StringIO()
    bar = ProgressBar(10, 3, stream=out, line_interval_s=0)
    bar.update(1, 4, 2.5)
    bar.update(1, 5, 2.6)
    assert out.getvalue().splitlines() == ["resolution 1 of 0..2: 4/10 tiles (40%) at 2.5 s",
                                           "resolution 1 of 0..2: 5/10 tiles (50%) at 2.6 s"]
    slow = ProgressBar(10, 3, stream=io.StringIO(), line_interval_s=3600)
    slow.update(1, 4, 2.5)
    assert slow.stream.getvalue() == ""
    quiet = ProgressBar(10, 3, stream=io.StringIO(), enabled=False, line_interval_s=0)
    quiet.update(1, 4, 2.5)
    assert quiet.stream.getvalue() == ""


def test_bar_shows_on_a_terminal(tmp_path):
    """A run whose stdout is a pseudo-terminal draws the bar; the same run piped does not."""
    write_example(tmp_path / "a.h5", tmp_path / "b.h5", (200, 100, 200), "int8", 0)
    cmd = [sys.executable, "-m", "mpilayer", "matmul", f"{tmp_path}/a.h5:/A", f"{tmp_path}/b.h5:/B",
           "-o", str(tmp_path / "c.h5"), "--tile", "25,25", "--component-bits", "1", "--force"]
    leader, follower = pty.openpty()
    proc = subprocess.run(cmd, stdout=follower, stderr=subprocess.PIPE, timeout=120)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert proc.returncode == 0, proc.stderr
    assert b"tiles" in seen and b"\r[" in seen
    piped = subprocess.run(cmd, capture_output=True, timeout=120)
    assert piped.returncode == 0 and b"\r[" not in piped.stdout and b"tiles (" not in piped.stdout
    logged = subprocess.run(cmd + ["--progress-every", "0"], capture_output=True, timeout=120, text=True)
    lines = [ln for ln in logged.stdout.splitlines() if "tiles (" in ln]
    assert logged.returncode == 0 and lines and "\r" not in logged.stdout, logged.stdout
    assert all(ln.startswith("resolution ") and ln.endswith(" s") for ln in lines), lines
