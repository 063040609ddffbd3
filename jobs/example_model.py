"""``mpilayer example-model``: train a small ReLU MLP on a dataset bundled with scikit-learn.

Writes the model (``/layer0``, ``/layer1``, ... each with ``W`` (inputs x outputs), ``b``,
attributes ``activation`` (``relu``/``linear``) and the activation calibration
``input_min``/``input_max`` measured on the training split) and the data file (``/X``: the
test split, samples x features; ``/y``: its labels). No download: the datasets ship with
scikit-learn.

Features: ``digits`` (8x8 images, 10 classes) as pixel / 16, in [0, 1]; ``wine`` (3 classes) and
``breast_cancer`` (2 classes) standardised with the training mean and deviation. A binary
classifier's single logistic output z becomes two logits (0, z), so argmax (ties to class 0)
matches scikit-learn's ``p > 0.5``.
"""
from __future__ import annotations

import warnings

import numpy as np

from mpilayer.errors import InputError

DATASETS = ("digits", "wine", "breast_cancer")


def load(name: str):
    from sklearn import datasets

    if name not in DATASETS:
        raise InputError(f"--dataset {name!r}: expected one of {', '.join(DATASETS)}")
    data = getattr(datasets, f"load_{name}")()
    return np.asarray(data.data, dtype=np.float64), np.asarray(data.target, dtype=np.int64)


def train(name: str = "digits", hidden=(64, 32), seed: int = 0, test_size: float = 0.3, max_iter: int = 500):
    """Train; returns ``(layers, X_test, y_test, info)`` with calibrated layers."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    from mpilayer.apps.inference import Layer, calibrate, float_forward

    X, y = load(name)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=test_size, random_state=seed, stratify=y)
    if name == "digits":
        X_train, X_test = X_train / 16.0, X_test / 16.0
    else:
        mu, sd = X_train.mean(axis=0), X_train.std(axis=0)
        sd = np.where(sd > 0, sd, 1.0)
        X_train, X_test = (X_train - mu) / sd, (X_test - mu) / sd
    clf = MLPClassifier(hidden_layer_sizes=tuple(hidden), activation="relu", max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X_train, y_train)
    layers = []
    for i, (W, b) in enumerate(zip(clf.coefs_, clf.intercepts_)):
        last = i == len(clf.coefs_) - 1
        W, b = np.asarray(W, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if last and W.shape[1] == 1:  # binary: logits (0, z)
            W = np.hstack([np.zeros_like(W), W])
            b = np.concatenate([[0.0], b])
        layers.append(Layer(W, b, "linear" if last else "relu"))
    layers = calibrate(layers, X_train)
    classes = np.asarray(clf.classes_)
    pred = classes[np.argmax(float_forward(layers, X_test), axis=1)]
    info = {"dataset": name, "seed": seed, "hidden": np.asarray(hidden, dtype=np.int64),
            "train_samples": len(X_train), "test_samples": len(X_test),
            "float_test_accuracy": float(np.mean(pred == y_test)),
            "sklearn_test_accuracy": float(clf.score(X_test, y_test))}
    if not np.array_equal(classes, np.arange(len(classes))):
        raise AssertionError("classes are expected to be 0..C-1")
    return layers, X_test, y_test, info


def write(model_path, data_path, name="digits", hidden=(64, 32), seed=0, force=False):
    from mpilayer.apps.inference import write_model
    from mpilayer.io.h5io import check_output_path, open_h5

    for path in (model_path, data_path):
        check_output_path(path, force)
    layers, X_test, y_test, info = train(name, hidden, seed)
    write_model(model_path, layers, info)
    with open_h5(data_path, "w") as f:
        f.create_dataset("X", data=X_test)
        f.create_dataset("y", data=y_test)
        f.attrs["dataset"] = name
        f.attrs["split"] = "test"
    return info


def run(args) -> int:
    hidden = tuple(args.hidden)
    model, data = args.output
    info = write(model, data, args.dataset, hidden, args.seed, force=args.force)
    if not args.quiet:
        print(f"wrote {model} (MLP {args.dataset}: hidden {','.join(map(str, hidden))}, float test accuracy "
              f"{info['float_test_accuracy']:.4f}) and {data} (/X: {info['test_samples']} test samples, /y)")
    return 0
