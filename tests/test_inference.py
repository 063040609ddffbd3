"""Layered inference of an MLP: certified predictions equal the one-shot quantised ones; the
gap rule (not certified) reports its disagreements."""
import argparse

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mpirun import mpi_env, mpiexec_path, run_mpilayer
from reference import exact_int_product

from mpilayer.apps.inference import (Gap, Layer, QuantizedMLP, calibrate, check_pass_cost, estimate_predictions,
                                     first_check, layered_inference, parse_rule, read_model, write_model)
from mpilayer.cli import main

SPLITS = [(8, None), (8, 1), (8, (4, 2, 1, 1)), (10, (6, 1, 1, 1, 1))]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("infer")
    model, data = d / "model.h5", d / "data.h5"
    assert main(["example-model", "-o", str(model), str(data), "--seed", "0"]) == 0
    return model, data


@pytest.fixture(scope="module")
def digits(files):
    model, data = files
    with h5py.File(data) as f:
        return read_model(model), f["X"][...], f["y"][...]


def reference(model: QuantizedMLP, X):
    """The one-shot quantised inference of the module docstring, with numpy int64 products."""
    H, accs = model.quantize_input(X), []
    for l, q in enumerate(model.layers):
        acc = exact_int_product(H, q.Wq)
        accs.append(acc)
        if l < len(model.layers) - 1:
            H = model.next_input(l, acc)
    return np.argmax(model.output(accs[-1]), axis=1), accs


def check(model, X, adaptive=True, **kw):
    """Certified run: predictions equal one-shot, every traced interval holds the exact accumulator,
    points at the last resolution, and a settled sample is never computed again."""
    pred, accs = reference(model, X)
    pred1, _, accs1, _ = model.one_shot(X)
    np.testing.assert_array_equal(pred1, pred)
    for a, b in zip(accs, accs1):
        np.testing.assert_array_equal(a, b)
    trace = []
    res = layered_inference(model, X, adaptive=adaptive, trace=trace, **kw)
    np.testing.assert_array_equal(res.predictions, pred)
    R = model.split.n_resolutions
    assert res.resolution.min() >= 0 and res.resolution.max() <= R - 1
    assert {t["layer"] for t in trace} == set(range(len(model.layers)))
    for t in trace:  # exact one-shot pre-activations inside the propagated intervals
        exact = accs[t["layer"]][t["rows"]]
        assert np.all(t["acc_lo"] <= exact) and np.all(exact <= t["acc_hi"]), (t["resolution"], t["layer"], t["pass"])
        assert np.all(t["acc_lo"] <= t["acc_est"]) and np.all(t["acc_est"] <= t["acc_hi"])
        if t["resolution"] == R - 1:
            np.testing.assert_array_equal(t["acc_lo"], t["acc_hi"])
    if adaptive:  # a settled sample is never computed again
        for t in trace:
            assert np.all(res.resolution[t["rows"]] >= t["resolution"])
    return res


def test_example_model_layout(files):
    model, data = files
    with h5py.File(model) as f:
        names = sorted(k for k in f if k.startswith("layer"))
        assert names == ["layer0", "layer1", "layer2"]
        shapes = [f[n]["W"].shape for n in names]
        assert shapes == [(64, 64), (64, 32), (32, 10)]
        assert [f[n]["b"].shape for n in names] == [(64,), (32,), (10,)]
        assert [f[n].attrs["activation"] for n in names] == ["relu", "relu", "linear"]
        assert all(f[n].attrs["input_max"] > 0 for n in names)
        assert f.attrs["float_test_accuracy"] > 0.9
    with h5py.File(data) as f:
        assert f["X"].shape == (540, 64) and f["y"].shape == (540,)
        assert f["X"].dtype == np.float64 and f["y"].dtype.kind == "i"


@pytest.mark.parametrize("bits, split", SPLITS)
def test_whole_test_set(digits, bits, split):
    layers, X, y = digits
    model = QuantizedMLP(layers, bits, split)
    res = check(model, X)
    pred, _ = reference(model, X)
    assert np.mean(pred == y) > 0.9
    full = check(model, X, adaptive=False)  # --full: same predictions, same certification points
    np.testing.assert_array_equal(full.resolution, res.resolution)
    if split in (1, (6, 1, 1, 1, 1)):  # the targets: at most 12% need the final resolution
        assert np.mean(res.resolution == model.split.n_resolutions - 1) <= 0.12


def test_every_resolution_checked(digits):
    """Certificates tried from the first resolution on (check_from=0): still sound; with the
    tight pass too."""
    layers, X, y = digits
    model = QuantizedMLP(layers, 8, 1)
    res = check(model, X[::3], check_from=0)
    assert res.checked == [True] * 8
    tight = check(model, X[::3], check_from=0, tight=True)
    assert np.all(tight.resolution <= res.resolution)  # the tight pass only ever settles more


def test_input_interval_extremes():
    """Layer 0's interval (knapsack and Cauchy-Schwarz) on inputs built to reach its ends: every
    dropped bit set, none set, one pixel, saturated rows, and weights of one sign."""
    rng = np.random.default_rng(5)
    k = 24
    W = np.hstack([rng.normal(size=(k, 4)), np.abs(rng.normal(size=(k, 2))), -np.abs(rng.normal(size=(k, 2)))])
    W[:, 0] = 0.0
    layers = [Layer(W, rng.normal(size=8), "linear", 0.0, 1.0)]
    model = QuantizedMLP(layers, 8, 1)
    U = 255
    H = np.vstack([np.full(k, U), np.zeros(k), np.eye(k)[3] * U, np.full(k, 1), np.full(k, 127), np.full(k, 128),
                   rng.integers(0, U + 1, (20, k)), (rng.integers(0, 128, (20, k)) * 2 + 1)]).astype(np.int64)
    exact = H @ model.layers[0].Wq.astype(np.int64)
    for r in range(model.split.n_resolutions):
        s = model.split.shift(r)
        acc = ((H >> s) << s) @ model.layers[0].Wq.astype(np.int64)
        lo, hi, est = model.input_interval(r, H, acc)
        assert np.all(lo <= exact) and np.all(exact <= hi), r
        assert np.all(lo <= est) and np.all(est <= hi), r
    # and through the whole inference: data whose quantised values are these rows
    check(model, H / U, check_from=0)


def test_knapsack_is_the_exact_extreme():
    """The knapsack bounds are the true min and max over every d in [0, delta]^k with the given sum
    (brute force on small cases): they hold and cannot be tightened."""
    import itertools

    from mpilayer.apps.inference import _knapsack, _knapsack_tables

    rng = np.random.default_rng(3)
    for k, delta in ((4, 1), (4, 3), (5, 2)):
        v = rng.integers(-9, 10, (3, k))
        grid = np.array(list(itertools.product(range(delta + 1), repeat=k)))
        sums = grid.sum(axis=1)
        budgets = np.arange(k * delta + 1)
        lo, hi = _knapsack(_knapsack_tables(v), budgets, delta)
        values = grid @ v.T  # (combinations, rows)
        for j, b in enumerate(budgets):
            exact = values[sums == b]
            np.testing.assert_array_equal(lo[:, j], exact.min(axis=0))
            np.testing.assert_array_equal(hi[:, j], exact.max(axis=0))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_hypothesis_certified_equals_one_shot(data):
    """Random small models, inputs (partly beyond the calibration), bits and splits: a certified
    prediction always equals the one-shot one, whatever resolution it settles at."""
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    depth = data.draw(st.integers(1, 3))
    sizes = [data.draw(st.integers(1, 12)) for _ in range(depth)] + [data.draw(st.integers(1, 6))]
    acts = [data.draw(st.sampled_from(["relu", "linear"])) for _ in range(depth)]
    layers = [Layer(rng.normal(size=(sizes[i], sizes[i + 1])) * data.draw(st.sampled_from([0.1, 1.0, 10.0])),
                    rng.normal(size=sizes[i + 1]), acts[i]) for i in range(depth)]
    X = rng.normal(size=(data.draw(st.integers(1, 40)), sizes[0]))
    if data.draw(st.booleans()):
        X = np.abs(X)  # a non-negative input: the unsigned encoding
    if data.draw(st.booleans()):  # duplicated output columns: exact ties go to the lowest index
        layers[-1] = Layer(np.hstack([layers[-1].W, layers[-1].W]), np.r_[layers[-1].b, layers[-1].b], acts[-1])
    layers = calibrate(layers, X[: max(1, len(X) // 2)])
    bits = data.draw(st.integers(2, 10))
    split = data.draw(st.sampled_from([1, None, 2]))
    model = QuantizedMLP(layers, bits, split)
    check(model, X, check_from=data.draw(st.sampled_from([0, None])), tight=data.draw(st.booleans()))


def test_adversarial_inputs(digits):
    """Inputs near decision boundaries (bisection between samples of different classes),
    beyond the calibrated range, and noise."""
    layers, X, y = digits
    model = QuantizedMLP(layers, 8, 1)
    pred, _ = reference(model, X)
    rng = np.random.default_rng(0)
    near = []
    for _ in range(40):
        i, j = rng.integers(len(X), size=2)
        if pred[i] == pred[j]:
            continue
        a, b = 0.0, 1.0
        for _ in range(30):  # the one-shot prediction flips between a and b
            mid = (a + b) / 2
            p = reference(model, ((1 - mid) * X[i] + mid * X[j])[None])[0][0]
            a, b = (mid, b) if p == pred[i] else (a, mid)
        near += [(1 - a) * X[i] + a * X[j], (1 - b) * X[i] + b * X[j]]
    near = np.array(near)
    res = check(model, near)
    assert np.all(res.resolution >= model.split.n_resolutions - 2)  # hard cases settle late
    check(model, near, check_from=0, tight=True)  # certificates tried at every resolution
    check(model, np.vstack([X[:50] * 3 - 1, rng.normal(0, 2, (50, 64)), np.zeros((3, 64))]))


def test_exact_ties_and_random_models():
    """Hand-made models: tied logits (duplicated output columns) decide by the lowest index;
    random deeper models with linear hidden layers and negative inputs."""
    rng = np.random.default_rng(1)
    W0 = rng.normal(size=(12, 9))
    W1 = rng.normal(size=(9, 3))
    W1 = np.hstack([W1, W1[:, :1], W1])  # output 3 ties output 0, outputs 4..6 tie 0..2
    layers = [Layer(W0, rng.normal(size=9), "relu"), Layer(W1, np.r_[0.5, 0.1, -0.2, 0.5, 0.5, 0.1, -0.2], "linear")]
    X = rng.normal(size=(300, 12))
    layers = calibrate(layers, X)
    for bits, split in [(8, 1), (6, (2, 2, 2)), (4, None)]:
        model = QuantizedMLP(layers, bits, split)
        res = check(model, X)
        assert np.all(res.predictions < 3)  # ties go to the lowest index
    for seed in range(4):
        rng = np.random.default_rng(seed)
        sizes = rng.integers(2, 20, 4)
        acts = [rng.choice(["relu", "linear"]) for _ in range(2)] + ["linear"]
        layers = [Layer(rng.normal(size=(sizes[i], sizes[i + 1])), rng.normal(size=sizes[i + 1]), acts[i])
                  for i in range(3)]
        X = rng.normal(size=(100, sizes[0]))
        layers = calibrate(layers, X[:60])  # calibrated on part of the data: the rest may clip
        bits = int(rng.integers(3, 10))
        check(QuantizedMLP(layers, bits, 1), X)
        check(QuantizedMLP(layers, bits, 1), X, check_from=0)


def test_check_pass_cost_is_the_floor(digits, monkeypatch):
    """The first certificate pass costs check_pass_cost: exactly the work of the first checked
    resolution when no logit-difference matmuls run (last layer ReLU), a lower bound of the
    cumulative work otherwise. With 8-bit kernel digits it equals the one-shot work (no width is
    cheaper than the exact product); with 7-bit digits the 7-bit input is one digit instead of two."""
    from mpilayer.core import products

    layers, X, y = digits
    relu_last = layers[:-1] + [Layer(layers[-1].W, layers[-1].b, "relu", layers[-1].input_min, layers[-1].input_max)]
    for lay, exact in ((relu_last, True), (layers, False)):
        model = QuantizedMLP(lay, 8, 1)
        first = first_check(model, "certified")
        res = layered_inference(model, X[:200])
        floor = check_pass_cost(model, 200, first)
        assert res.active[first] == 200 and sum(res.work_s[:first]) == 0
        if exact:
            assert res.work_s[first] == pytest.approx(floor, rel=1e-12)
        assert sum(res.work_s) >= floor * (1 - 1e-12)
    model = QuantizedMLP(layers, 8, 1)
    full = model.split.truncated(7)

    def one_shot():  # the one-shot work under the cost model's current globals
        return sum(products.predicted_seconds([(full, full)], 200, q.Wq.shape[1], q.Wq.shape[0]) for q in model.layers)

    assert one_shot() == pytest.approx(model.one_shot(X[:200])[3], rel=1e-12)
    for digit_bits, path in ((8, "avx512vnni"), (7, "avx2")):
        monkeypatch.setattr(products, "DIGIT_BITS", digit_bits)  # costs only: no kernel runs below
        monkeypatch.setattr(products, "INT8_RATES", products.PATH_RATES["int8"][path])
        monkeypatch.setattr(products, "POPCOUNT_RATE", products.PATH_RATES["popcount"][path[:6]])
        floor = check_pass_cost(model, 200, first_check(model, "certified"))
        if digit_bits == 8:
            assert floor == pytest.approx(one_shot(), rel=1e-12)
        else:
            assert floor < 0.9 * one_shot()


def test_rules_parse():
    assert str(parse_rule(None)) == "certified" and str(parse_rule("gap")) == "gap:0.05"
    assert parse_rule("gap:0.2") == Gap(0.2)
    for bad in ("gap:", "gap:x", "gap:-1", "top2"):
        with pytest.raises(ValueError):
            parse_rule(bad)


def test_gap_rule_disagreements_reported(files, digits, tmp_path):
    """The gap rule is not certified: with a zero threshold it stops every sample at its first
    check and some predictions differ from one-shot. The job's summary counts exactly those,
    per resolution, says so, and does not fail for it; a certified run reports none."""
    import jobs.infer as job

    model_path, data_path = files
    layers, X, y = digits
    qm = QuantizedMLP(layers, 8, 1)
    pred1 = qm.one_shot(X)[0]
    res = layered_inference(qm, X, rule="gap:0")
    assert np.all(res.resolution == 1)  # the first resolution keeping 2 bits
    differ = int(np.sum(res.predictions != pred1))
    assert differ > 0
    estimates = estimate_predictions(qm, X)
    np.testing.assert_array_equal(estimates[1], res.predictions)  # it decided on the estimate
    np.testing.assert_array_equal(estimates[-1], pred1)
    for rule, expect in (("gap:0", differ), ("certified", 0)):
        args = argparse.Namespace(model=str(model_path), data=f"{data_path}:/X", y=f"{data_path}:/y", output=str(tmp_path / "p.h5"),
                                  force=True, bits=8, component_bits=1, full=False, repeat=1, rule=rule, check_from=None)
        setup = job.set_up(args)
        common = {k: setup[k] for k in ("layers", "bits", "component_bits", "rule", "check_from")}
        blocks = np.array_split(np.arange(len(X)), 3)  # as three ranks would
        parts = [job.compute(dict(common, X=X[b], full=False, repeat=1)) for b in blocks]
        summary = job.combine(parts, setup, args, 3)
        assert summary["mismatches"] == expect
        assert sum(row["differ"] for row in summary["rows"]) == expect
        report = job.format_report(summary, setup, args, 3)
        if expect:
            assert f"no, {expect}/{len(X)} differ (rule gap:0 is not certified)" in report
            assert "gap:0 (NOT certified)" in report
        else:
            assert "yes (540/540)" in report


def read_pred(path):
    with h5py.File(path) as f:
        return (f["predictions"][...], f["resolution"][...], f["resolution"].attrs["resolutions_total"],
                f["predictions_one_shot"][...], f.attrs["agrees_with_one_shot"])


@pytest.mark.mpi
def test_cli_under_mpiexec_matches_single_process(files, digits, tmp_path):
    model, data = files
    layers, X, y = digits
    qm = QuantizedMLP(layers, 8, 1)
    expected = layered_inference(qm, X)
    pred_ref, _ = reference(qm, X)
    for n in (1, 2, 3):
        out = tmp_path / f"pred{n}.h5"
        proc = run_mpilayer(n, "infer", model, f"{data}:/X", "-o", out, "--component-bits", "1",
                            "--y", f"{data}:/y", "--repeat", "1")
        assert proc.returncode == 0, proc.stderr
        assert "settled predictions equal the one-shot quantised predictions: yes" in proc.stdout
        pred, resolution, total, one_shot, agree = read_pred(out)
        np.testing.assert_array_equal(pred, expected.predictions)
        np.testing.assert_array_equal(resolution, expected.resolution)
        np.testing.assert_array_equal(one_shot, pred_ref)
        assert total == 8 and agree
    out = tmp_path / "full.h5"
    proc = run_mpilayer(2, "infer", model, data, "-o", out, "--full", "--repeat", "1")
    assert proc.returncode == 0, proc.stderr
    pred, resolution, total, one_shot, agree = read_pred(out)
    np.testing.assert_array_equal(pred, pred_ref)
    assert total == 3 and agree and resolution.max() == 2  # the default components 2,5,1


@pytest.mark.mpi
def test_gap_rule_under_mpiexec(files, digits, tmp_path):
    """``mpilayer infer --rule gap`` over 2 ranks: exit 0, the disagreements counted and stored, the same predictions as one process."""
    import subprocess
    import sys

    model, data = files
    layers, X, y = digits
    qm = QuantizedMLP(layers, 8, (2, 5, 1))
    expected = layered_inference(qm, X, rule="gap:0.05")
    differ = int(np.sum(expected.predictions != qm.one_shot(X)[0]))
    out = tmp_path / "gap.h5"
    cmd = [mpiexec_path(), "-n", "2", sys.executable, "-m", "mpilayer", "infer", str(model), f"{data}:/X",
           "-o", str(out), "--y", f"{data}:/y", "--rule", "gap", "--repeat", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=mpi_env())
    assert proc.returncode == 0, proc.stderr
    assert f"{differ}/540 differ (rule gap:0.05 is not certified)" in proc.stdout
    pred, resolution, total, one_shot, agree = read_pred(out)
    np.testing.assert_array_equal(pred, expected.predictions)
    np.testing.assert_array_equal(resolution, expected.resolution)
    with h5py.File(out) as f:
        assert f.attrs["rule"] == "gap:0.05" and f.attrs["differ_from_one_shot"] == differ
        assert f["per_resolution"]["differ"].sum() == differ


@pytest.mark.mpi
def test_bad_inputs_one_line_errors(files, digits, tmp_path):
    model, data = files
    layers, X, y = digits
    bad_x = tmp_path / "bad_x.h5"
    with h5py.File(bad_x, "w") as f:
        f["X63"] = X[:, :63]
        Xn = X.copy()
        Xn[5, 7] = np.nan
        f["Xnan"] = Xn
        f["y_short"] = y[:10]
    gap = tmp_path / "gap.h5"
    write_model(gap, layers)
    with h5py.File(gap, "a") as f:
        f.move("layer2", "layer3")
        del f["layer1"]
    cases = [
        ((model, f"{bad_x}:/X63"), ["bad_x.h5:/X63", "63 features"]),
        ((model, f"{bad_x}:/Xnan"), ["bad_x.h5:/Xnan", "NaN", "row 5"]),
        ((gap, data), ["gap.h5", "missing /layer1"]),
        ((model, data, "--y", f"{bad_x}:/y_short"), ["bad_x.h5:/y_short", "10 labels"]),
        ((model, f"{data}:/nope"), ["data.h5:/nope", "no such dataset"]),
        ((model, data, "--component-bits", "3,3"), ["--component-bits"]),
    ]
    for i, (args, words) in enumerate(cases):
        out = tmp_path / f"o{i}.h5"
        n = 2 if i < 3 else 1
        proc = run_mpilayer(n, "infer", *args, "-o", out, timeout=60)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("mpilayer: error: "), proc.stderr
        for word in words:
            assert word in lines[0], (word, lines[0])
        assert not out.exists()
