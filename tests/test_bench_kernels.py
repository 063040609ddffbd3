"""``mpilayer bench kernels``: each schedule's ratios are to a float64 product timed in turn with
that schedule's runs (side by side), and the JSON report records it."""
import json
import re
import subprocess
import sys


def test_schedules_are_timed_in_turn_with_their_float64_product(tmp_path):
    out = tmp_path / "k.json"
    proc = subprocess.run([sys.executable, "-m", "mpilayer", "bench", "kernels", "--shape", "96", "--repeat", "1",
                           "--schedules", "auto;1", "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    printed = re.findall(r"float64 product timed in turn with it: ([\d.]+) ms[\s\S]*?first resolution ([\d.]+)x",
                         proc.stdout)
    assert len(report["schedules"]) == len(printed) == 2, proc.stdout
    for schedule, (ms, ratio) in zip(report["schedules"], printed):
        assert schedule["float64_s"] > 0 and abs(schedule["float64_s"] * 1e3 - float(ms)) < 0.06
        first = schedule["rows"][0]["cumulative_s"] / schedule["float64_s"]
        assert abs(first - float(ratio)) < 6e-4, (first, ratio)
