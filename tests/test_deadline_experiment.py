"""mpilayer deadline-experiment: a Poisson stream of jobs, layered vs one-shot, under a real mpiexec.
Service times are sleeps, so 6 ranks on 2 cores are fine. The policy's tests run it on the
scheduling engine's local mode (no MPI): the same policy, engine and worker code as a run."""
import argparse
import csv

import numpy as np
import pytest

from mpilayer.core.service_time import parse_service_time
from mpilayer.jobs import deadline_experiment as de
from mpilayer.mpi.engine import Engine, WorkerView

from mpirun import mpi_env, run_mpilayer


def _args(m=2, shape=(37, 50, 23), seed=5, order="layer", redundancy=0.0, service="exp:0.1"):
    return argparse.Namespace(components=m, shape=shape, seed=seed, order=order, redundancy=redundancy,
                              service_time=parse_service_time(service))


class _Recording(de.ExperimentPolicy):
    """The policy, recording every result tile and the order mini-jobs were handed out."""

    def __init__(self, *a, corrupt=None, **k):
        super().__init__(*a, **k)
        self.tiles_in, self.order, self.corrupt = [], [], corrupt

    def next_job(self, view):
        mj = super().next_job(view)
        if mj is not None:
            self.order.append(mj)
        return mj

    def result(self, view, mj, info, tile, sent):
        tile = tile.astype(np.int64)
        if mj.id == self.corrupt:
            tile[0, 0] += 1
        self.tiles_in.append((mj, tile.copy()))
        super().result(view, mj, info, tile, sent)


def _run_local(mode, args, jobs=2, tiles=1, **k):
    """One mode on the engine's local mode (rank 0 computes through the worker code, no sleeps),
    every job arrived at once."""
    policy = _Recording(mode, args, np.zeros(jobs), de.row_tiles(args.shape[0], tiles), **k)
    engine = Engine(None, policy, {"master_nice": 0, "queue_max": 1}, de.ENGINE_MEMORY, log=lambda *a: None)
    engine.run()
    return policy, engine


@pytest.mark.parametrize("m,tiles", [(2, 1), (3, 2), (1, 3), (8, 1)])
def test_layers_sum_to_exact_product(m, tiles):
    args = _args(m)
    for mode in de.MODES:
        policy, engine = _run_local(mode, args, jobs=3, tiles=tiles)
        assert engine.stopped_by == "complete" and policy.finished()
        layers = 2 * m - 1 if mode == "layered" else 1
        assert {mj.layer for mj, _ in policy.tiles_in} == set(range(layers))
        for job in range(3):
            A, B = de.make_operands(args.seed, args.shape, job)
            total = np.zeros((args.shape[0], args.shape[2]), dtype=np.int64)
            share = 0.0
            for mj, tile in policy.tiles_in:
                if mj.job == job:
                    total[mj.rows[0]:mj.rows[1]] += tile
                    share += mj.share
            np.testing.assert_array_equal(total, A.astype(np.int64) @ B.astype(np.int64))
            assert share == pytest.approx(1.0)
        d = policy.delays()
        assert np.all(np.isfinite(d)) and np.all(np.diff(d, axis=1) >= 0)  # layer l done after l - 1
        assert all(("B", t) not in policy.views[0].held for t in range(3))  # every B_t evicted


def test_a_wrong_product_is_a_failure():
    with pytest.raises(RuntimeError, match="layered job 1: the sum of its mini-jobs differs from A @ B_t"):
        _run_local("layered", _args(), jobs=2, corrupt=de.mini_jobs(1, "layered", 2, [(0, 37)], 37)[2].id)


def test_layer_pairs_balanced():
    assert de.layer_pairs(2) == [[(0, 0)], [(0, 1), (1, 0)], [(1, 1)]]
    assert de.component_widths(2) == (4, 4)
    assert de.component_widths(3) == (3, 3, 2)
    shares = {}
    for mj in de.mini_jobs(0, "layered", 2, [(0, 10)], 10):
        shares[mj.layer] = shares.get(mj.layer, 0) + mj.share
    assert shares == {0: 0.25, 1: 0.5, 2: 0.25}


@pytest.mark.parametrize("order,key", [("layer", lambda mj: (mj.layer, mj.job)),
                                       ("job", lambda mj: (mj.job, mj.layer))])
def test_order(order, key):
    policy, _ = _run_local("layered", _args(order=order), jobs=3)
    got = [key(mj) for mj in policy.order]
    assert len(got) == 12 and got == sorted(got)


def test_redundancy_is_a_budget_on_copies_when_nothing_is_ready():
    policy = de.ExperimentPolicy("layered", _args(redundancy=0.25), np.zeros(2), [(0, 37)])
    view = policy.new_view(1)
    policy.started()
    policy.tick()
    first = policy.next_job(view)
    policy.sent(view, first)
    assert policy.reissue_order(view)(first.id) is None          # other mini-jobs are ready
    while policy.ready:
        policy.sent(view, policy.next_job(view))
    assert policy.issued == 8
    order = policy.reissue_order(view)
    assert order(first.id) == (first.layer, first.job)          # nothing ready, within 0.25 x 8
    policy.sent(policy.new_view(2), first)
    policy.sent(policy.new_view(3), policy.jobs[first.id + 1])
    assert policy.copies == 2 and policy.reissue_order(view)(first.id + 2) is None   # budget spent


def test_engine_queue_limit():
    policy = de.ExperimentPolicy("layered", _args(), np.zeros(1), [(0, 37)])
    view = WorkerView(1, queue={0: 0.0})
    assert not Engine(None, policy, {"queue_max": 1}, de.ENGINE_MEMORY)._wants_work(view)
    assert Engine(None, policy, {}, de.ENGINE_MEMORY)._wants_work(view)


def test_layer_errors_against_truncated_operands():
    """Layer 0 of two 4-bit components is the product of the operands truncated to their top 4
    bits (toward -inf); the last layer is the exact product."""
    seed, shape = 5, (24, 40, 16)
    err = de.layer_errors(seed, shape, 3, 2)
    for t in range(3):
        A, B = (x.astype(np.int64) for x in (de.make_operands(seed, shape, 0)[0], de.make_operands(seed, shape, t)[1]))
        exact = A @ B
        first = ((A >> 4) << 4) @ ((B >> 4) << 4)
        assert err[t, 0] == pytest.approx(np.linalg.norm(first - exact) / np.linalg.norm(exact), rel=1e-12)
        assert err[t, 2] == 0


def test_service_share_scales_the_draw():
    model = parse_service_time("exp:0.4+straggler:1:3")
    whole, quarter = model.for_rank(1, 7), model.for_rank(1, 7)
    for _ in range(5):
        assert quarter.extra(0.01, 0.25) == pytest.approx(0.25 * (whole.extra(0.01) - 0.02) + 0.02)


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
    per, errors = {}, {}
    for r in delays:
        per.setdefault((r["mode"], int(r["job"])), {})[int(r["layer"])] = float(r["delay_s"])
        errors.setdefault((r["mode"], int(r["layer"])), []).append(float(r["relative_error"]))
        assert float(r["delay_s"]) > 0
        last = r["mode"] == "one-shot" or int(r["layer"]) == layers - 1  # the exact product
        assert (float(r["relative_error"]) == 0) if last else (0 < float(r["relative_error"]) < 1)
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
        assert float(r["mean_relative_error"]) == pytest.approx(np.mean(errors[r["mode"], int(r["layer"])]),
                                                                abs=1e-6)  # summary.csv: 6 decimals
    return per, summary


@pytest.mark.mpi
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


@pytest.mark.mpi
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


@pytest.mark.mpi
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


@pytest.mark.mpi
@pytest.mark.parametrize("args,message", [
    (["--deadline", "1"], "--deadline is not an option of deadline-experiment; use --threshold"),
    ([], "required: -o/--output"),
])
def test_usage_errors(args, message):
    proc = run_mpilayer(1, "deadline-experiment", "--jobs", 2, *args, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.mpi
@pytest.mark.parametrize("n", [1, 3])
def test_worker_error_stops_every_rank(tmp_path, n):
    out = tmp_path / "f"
    proc = run_mpilayer(n, "deadline-experiment", "-o", out, "--jobs", 3, "--rate", 40, "-q",
                        env=mpi_env(MPILAYER_FAULT="worker-raise"), timeout=60)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "injected fault" in lines[0], proc.stderr
    assert not (out / "summary.csv").exists()
