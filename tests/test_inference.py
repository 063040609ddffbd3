"""Layered inference of an MLP: certified predictions equal the one-shot quantised ones."""
import h5py
import numpy as np
import pytest

from mpilayer.cli import main
from mpilayer.inference import Layer, QuantizedMLP, calibrate, layered_inference, read_model, write_model

from mpirun import run_mpilayer
from reference import exact_int_product

SPLITS = [(8, None), (8, 1), (8, (4, 2, 1, 1)), (10, (6, 1, 1, 1, 1))]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("infer")
    model, data = d / "model.h5", d / "data.h5"
    assert main(["example-model", str(model), str(data), "--seed", "0"]) == 0
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


def check(model, X, adaptive=True):
    pred, accs = reference(model, X)
    pred1, _, accs1, _ = model.one_shot(X)
    np.testing.assert_array_equal(pred1, pred)
    for a, b in zip(accs, accs1):
        np.testing.assert_array_equal(a, b)
    trace = []
    res = layered_inference(model, X, adaptive=adaptive, trace=trace)
    np.testing.assert_array_equal(res.predictions, pred)
    R = model.split.n_resolutions
    assert res.resolution.min() >= 0 and res.resolution.max() <= R - 1
    assert len(trace) == sum(1 for r in range(R) if res.active[r]) * len(model.layers)
    for t in trace:  # exact one-shot pre-activations inside the propagated intervals
        exact = accs[t["layer"]][t["rows"]]
        assert np.all(t["acc_lo"] <= exact) and np.all(exact <= t["acc_hi"]), (t["resolution"], t["layer"])
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
    if bits == 10:
        assert np.mean(res.resolution == model.split.n_resolutions - 1) < 0.12


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
    assert total == 2 and agree and resolution.max() == 1


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
