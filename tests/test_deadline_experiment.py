"""mpilayer deadline-experiment: a Poisson stream of jobs, layered vs one-shot, under a real mpiexec.
Service times are sleeps, so 6 ranks on 2 cores are fine."""
import csv

import numpy as np
import pytest

from mpilayer.jobs import deadline_experiment as de

from mpirun import run_mpilayer

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("m,tiles", [(2, 1), (3, 2), (1, 3), (8, 1)])
def test_layers_sum_to_exact_product(m, tiles):
    shape, seed = (37, 50, 23), 5
    comp = de.Computer(seed, shape, m)
    for job in (0, 3):
        A, B = de.make_operands(seed, shape, job)
        exact = A.astype(np.int64) @ B.astype(np.int64)
        layered = de.mini_jobs(job, "layered", m, de.row_tiles(shape[0], tiles), shape[0])
        assert {mj.layer for mj in layered} == set(range(2 * m - 1))
        total = np.zeros_like(exact)
        for mj in layered:
            total[mj.rows[0]:mj.rows[1]] += comp.compute(mj)
        np.testing.assert_array_equal(total, exact)
        assert sum(mj.share for mj in layered) == pytest.approx(1.0)
        one = de.mini_jobs(job, "one-shot", m, de.row_tiles(shape[0], tiles), shape[0])
        total = np.zeros_like(exact)
        for mj in one:
            total[mj.rows[0]:mj.rows[1]] += comp.compute(mj)
        np.testing.assert_array_equal(total, exact)
        assert sum(mj.share for mj in one) == pytest.approx(1.0)


def test_layer_pairs_balanced():
    assert de.layer_pairs(2) == [[(0, 0)], [(0, 1), (1, 0)], [(1, 1)]]
    assert de.component_widths(2) == (4, 4)
    assert de.component_widths(3) == (3, 3, 2)
    shares = {}
    for mj in de.mini_jobs(0, "layered", 2, [(0, 10)], 10):
        shares[mj.layer] = shares.get(mj.layer, 0) + mj.share
    assert shares == {0: 0.25, 1: 0.5, 2: 0.25}


def _read(out):
    with open(out / "delays.csv") as f:
        delays = list(csv.DictReader(f))
    with open(out / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    return delays, summary


def _check_outputs(out, jobs, layers):
    for name in de.OUTPUT_FILES:
        assert (out / name).stat().st_size > 0, name
    delays, summary = _read(out)
    assert len(delays) == jobs * (layers + 1)
    per = {}
    for r in delays:
        per.setdefault((r["mode"], int(r["job"])), {})[int(r["layer"])] = float(r["delay_s"])
        assert float(r["delay_s"]) > 0
    for (mode, job), d in per.items():
        if mode == "layered":
            vals = [d[l] for l in range(layers)]
            assert vals == sorted(vals), (job, vals)   # a layer is done only after the ones below
        else:
            assert list(d) == [0]
    assert [(r["mode"], int(r["layer"])) for r in summary] == \
        [("layered", l) for l in range(layers)] + [("one-shot", 0)]
    for r in summary:  # the summary agrees with the recorded delays
        d = np.array([v[int(r["layer"])] for (mode, _), v in per.items() if mode == r["mode"]])
        assert float(r["mean_delay_s"]) == pytest.approx(d.mean(), abs=2e-6)
        assert float(r["p_meet_deadline"]) == pytest.approx(np.mean(d <= float(r["deadline_s"])), abs=1e-6)
    return per, summary


def test_one_rank(tmp_path):
    out = tmp_path / "n1"
    args = ("deadline-experiment", "-o", out, "--jobs", 12, "--rate", 40, "--service-time", "exp:0.02",
            "--component-bits", 3, "--shape", "40,64,24")
    proc = run_mpilayer(1, *args, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "3 components (3+3+2 bits) -> 5 layers (0..4)" in proc.stdout
    assert "all 12 products exact" in proc.stdout and "one-shot" in proc.stdout
    _check_outputs(out, 12, 5)
    # an earlier result is not overwritten without --force; -q leaves the table and the files
    proc = run_mpilayer(1, *args, timeout=60)
    assert proc.returncode == 2 and "already holds a deadline-experiment result" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc = run_mpilayer(1, *args, "--force", "-q", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "products exact" not in proc.stdout and "layer 0" in proc.stdout and "wrote" in proc.stdout


@pytest.mark.parametrize("redundancy", ["0", "0.2"])
def test_six_ranks_layer_one_beats_one_shot(tmp_path, redundancy):
    out = tmp_path / "n6"
    # 5 workers, whole-job mean 0.1 s, load about 0.6: layer 0 (a quarter of the work, served
    # first) must finish well before the one-shot job on average.
    proc = run_mpilayer(6, "deadline-experiment", "-o", out, "--jobs", 40, "--rate", 30,
                        "--service-time", "exp:0.1", "--shape", "64,128,64", "--seed", 3, "--redundancy", redundancy,
                        timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert "5 worker(s) on 6 rank(s)" in proc.stdout
    assert proc.stdout.count("all 40 products exact") == 2
    per, summary = _check_outputs(out, 40, 3)
    copies = [int(ln.split(" copies")[0].rsplit(" ", 1)[1]) for ln in proc.stdout.splitlines() if " copies" in ln]
    assert len(copies) == 2 and (sum(copies) > 0) == (redundancy != "0")
    mean = {(r["mode"], int(r["layer"])): float(r["mean_delay_s"]) for r in summary}
    assert mean[("one-shot", 0)] > mean[("layered", 0)]
    assert float(summary[0]["p_meet_deadline"]) >= float(summary[-1]["p_meet_deadline"])


@pytest.mark.parametrize("n,args,message", [
    (1, ["--rate", "0"], "--rate must be > 0"),
    (2, ["--components", "9"], "--components must be 1..8"),
    (2, ["--component-bits", "5"], "splits the 8 bits (almost) equally"),
    (1, ["--component-bits", "4,2,2"], "splits the 8 bits (almost) equally"),
    (1, ["--threshold", "0"], "--threshold must be > 0"),
    (2, ["--service-time", "exp:0.1+hang:1:3"], "hang clauses are not supported"),
    (1, ["--service-time", "exp:-1"], "MEAN must be > 0"),
    (2, ["--service-time", "exp:0.1+straggler:4:2"], "no worker rank 4"),
    (1, ["--row-blocks", "0"], "--row-blocks must be"),
    (2, ["--redundancy", "2"], "--redundancy must be 0..1"),
])
def test_bad_options(tmp_path, n, args, message):
    proc = run_mpilayer(n, "deadline-experiment", "-o", tmp_path / "x", "--jobs", 2, *args, timeout=60)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "is deprecated" not in ln]
    assert len(lines) == 1 and message in lines[0], proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--deadline", "1"], "--deadline is not an option of deadline-experiment; use --threshold"),
    ([], "required: -o/--output"),
])
def test_usage_errors(args, message):
    proc = run_mpilayer(1, "deadline-experiment", "--jobs", 2, *args, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
