"""``mpilayer infer``: adaptive layered inference of an MLP with certified predictions, under MPI.

Rank 0 reads and checks the model and the data, then sends every rank (itself included) a
contiguous block of samples with the model; each rank runs the adaptive layered inference
(mpilayer.apps.inference) and the exact one-shot quantised inference on its block and sends back
predictions, resolutions and per-resolution statistics; rank 0 writes the output and prints
the table. Every computation is per sample and exact in integers, so the results do not
depend on the number of ranks.

``--rule certified`` (default) settles a sample only when its prediction is proved equal to
the one-shot one; ``--rule gap[:T]`` is the paper's heuristic (NOT certified) and the job
reports how many of its predictions differ from the one-shot ones (exit status 0 for it; 1
when a certified prediction differs, which would be a bug). The accuracy per resolution of
the estimate (every sample's estimate at every resolution) is a diagnostic computed after the
timed runs and not counted in their work.

With one rank everything is local. Ranks that wait do so by sleep-polling (MPICH's blocking
receives spin a core). Input errors are found on rank 0 before any work and sent to the other
ranks, so every rank exits with status 2 after a one-line message. The options are declared in
mpilayer/cli/infer.py.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from mpilayer.errors import InputError, MpilayerError
from mpilayer.mpi.protocol import TAG_INFER_RESULT, TAG_INFER_SETUP

EXIT_INPUT = 2


def _component_bits(args, bits: int):
    """``--component-bits``, or the default of infer (mpilayer.apps.inference.default_infer_split)."""
    from mpilayer.apps.inference import default_infer_split

    return args.component_bits if args.component_bits is not None else default_infer_split(bits)


def run(args) -> int:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.Get_rank() != 0:
        return _worker(comm)
    return _root(comm, args)


def _recv(comm, source: int, tag: int):
    from mpilayer.mpi.protocol import recv_when_ready

    return recv_when_ready(comm, source, tag)


def _worker(comm) -> int:
    setup = _recv(comm, 0, TAG_INFER_SETUP)
    if "error" in setup:
        return setup["status"]
    comm.send(compute(setup), dest=0, tag=TAG_INFER_RESULT)
    return 0


# --------------------------------------------------------------------------- set-up (rank 0)

def set_up(args) -> dict:
    """Read and check everything; raises MpilayerError with a one-line message."""
    from mpilayer.apps.inference import QuantizedMLP, calibrate, parse_rule, read_inputs, read_labels, read_model
    from mpilayer.io.h5io import check_output_path

    check_output_path(args.output, args.force)
    layers = read_model(args.model)
    X, x_label = read_inputs(args.data)
    k = layers[0].W.shape[0]
    if X.shape[1] != k:
        raise InputError(f"{x_label}: has {X.shape[1]} features per sample but {args.model}:/layer0/W expects {k}")
    y = read_labels(args.y, X.shape[0]) if args.y else None
    calibrated_on = "model"
    if any(layer.input_max is None for layer in layers):
        layers = calibrate(layers, X)
        calibrated_on = "data"
    try:
        rule = parse_rule(getattr(args, "rule", "certified"))
    except ValueError as err:
        raise InputError(f"--rule: {err}") from None
    try:
        model = QuantizedMLP(layers, args.bits, _component_bits(args, args.bits))
    except (TypeError, ValueError) as err:
        raise InputError(f"--bits/--component-bits: {err}") from None
    check_from = getattr(args, "check_from", None)
    if check_from is not None and not 0 <= check_from < model.split.n_resolutions:
        raise InputError(f"--check-from {check_from}: expected 0..{model.split.n_resolutions - 1}")
    return {"layers": layers, "bits": model.bits, "component_bits": model.split.widths, "X": X, "y": y,
            "x_label": x_label, "calibrated_on": calibrated_on, "split": model.split, "rule": str(rule),
            "check_from": check_from}


def compute(setup: dict) -> dict:
    """One rank's work on its block: one-shot and layered inference, each timed best of ``repeat``;
    then (untimed) every sample's estimate at every resolution, for the accuracy per resolution."""
    from mpilayer.apps.inference import (QuantizedMLP, check_pass_cost, estimate_predictions, first_check,
                                         layered_inference)

    model = QuantizedMLP(setup["layers"], setup["bits"], setup["component_bits"])
    X, repeat = setup["X"], max(1, setup["repeat"])
    one_shot_s, res_best = np.inf, None
    for _ in range(repeat):
        t = time.perf_counter()
        pred1, _, _, one_shot_work = model.one_shot(X)
        one_shot_s = min(one_shot_s, time.perf_counter() - t)
    for _ in range(repeat):
        res = layered_inference(model, X, adaptive=not setup["full"], rule=setup["rule"],
                                check_from=setup["check_from"])
        if res_best is None or res.elapsed_s[-1] < res_best.elapsed_s[-1]:
            res_best = res
    res = res_best
    return {"predictions": res.predictions, "resolution": res.resolution, "predictions_at": res.predictions_at,
            "estimates_at": estimate_predictions(model, X),
            "one_shot": pred1, "one_shot_s": one_shot_s, "one_shot_work_s": one_shot_work,
            "work_s": np.array(res.work_s), "elapsed_s": np.array(res.elapsed_s), "active": np.array(res.active),
            "check_pass_s": check_pass_cost(model, len(X), first_check(model, setup["rule"], setup["check_from"]))}


# --------------------------------------------------------------------------- rank 0

def _root(comm, args) -> int:
    size = comm.Get_size()
    try:
        setup = set_up(args)
    except MpilayerError as err:
        for rank in range(1, size):
            comm.send({"error": str(err), "status": EXIT_INPUT}, dest=rank, tag=TAG_INFER_SETUP)
        print(f"mpilayer: error: {err}", file=sys.stderr)
        return EXIT_INPUT
    X = setup["X"]
    blocks = np.array_split(np.arange(X.shape[0]), size)
    common = {"layers": setup["layers"], "bits": setup["bits"], "component_bits": setup["component_bits"],
              "full": args.full, "repeat": args.repeat, "rule": setup["rule"], "check_from": setup["check_from"]}
    for rank in range(1, size):
        comm.send(dict(common, X=X[blocks[rank]]), dest=rank, tag=TAG_INFER_SETUP)
    parts = [compute(dict(common, X=X[blocks[0]]))]
    parts += [_recv(comm, rank, TAG_INFER_RESULT) for rank in range(1, size)]
    summary = combine(parts, setup, args, size)
    write_output(args.output, summary, setup, args, size)
    report = format_report(summary, setup, args, size)
    print(report.splitlines()[-1] if getattr(args, "quiet", False) else report, flush=True)  # -q: the last line
    return 0 if summary["agree"] or not summary["certified"] else 1


def combine(parts: list, setup: dict, args, size: int) -> dict:
    cat = lambda key: np.concatenate([p[key] for p in parts])  # noqa: E731
    R = setup["split"].n_resolutions
    predictions, resolution, one_shot = cat("predictions"), cat("resolution"), cat("one_shot")
    predictions_at = np.concatenate([p["predictions_at"] for p in parts], axis=1)
    estimates_at = np.concatenate([p["estimates_at"] for p in parts], axis=1)
    m = len(predictions)
    counts = np.bincount(resolution, minlength=R)
    y = setup["y"]
    rows = []
    one_shot_work = sum(p["one_shot_work_s"] for p in parts)
    one_shot_s = max(p["one_shot_s"] for p in parts)
    for r in range(R):
        rows.append({
            "resolution": r,
            "bits": sum(setup["split"].widths[: r + 1]),
            "active": int(sum(p["active"][r] for p in parts)),
            "settled": int(counts[r]),
            "settled_cumulative": float(counts[: r + 1].sum() / m) if m else 1.0,
            "accuracy": float(np.mean(predictions_at[r] == y)) if y is not None else np.nan,
            "estimate_accuracy": float(np.mean(estimates_at[r] == y)) if y is not None else np.nan,
            "estimate_agrees": float(np.mean(estimates_at[r] == one_shot)) if m else 1.0,
            "differ": int(np.sum((resolution == r) & (predictions != one_shot))),
            "work": float(sum(p["work_s"][: r + 1].sum() for p in parts) / one_shot_work) if one_shot_work else np.nan,
            "time": float(max(p["elapsed_s"][r] for p in parts) / one_shot_s) if one_shot_s else np.nan,
        })
    return {"predictions": predictions, "resolution": resolution, "one_shot": one_shot, "rows": rows,
            "agree": bool(np.array_equal(predictions, one_shot)), "mismatches": int(np.sum(predictions != one_shot)),
            "certified": setup["rule"] == "certified",
            "final_fraction": float(counts[-1] / m) if m else 0.0, "m": m, "R": R,
            "one_shot_s": one_shot_s, "one_shot_work_s": one_shot_work,
            "check_pass": float(sum(p["check_pass_s"] for p in parts) / one_shot_work) if one_shot_work else np.nan,
            "one_shot_accuracy": float(np.mean(one_shot == y)) if y is not None else None,
            "float_accuracy": _float_accuracy(setup) if y is not None else None}


def _float_accuracy(setup) -> float:
    from mpilayer.apps.inference import float_forward

    return float(np.mean(np.argmax(float_forward(setup["layers"], setup["X"]), axis=1) == setup["y"]))


def write_output(path: str, summary: dict, setup: dict, args, size: int) -> None:
    """Write atomically (h5io.atomic_h5_file): readers never see a half-written file."""
    from mpilayer.io.h5io import atomic_h5_file

    with atomic_h5_file(path) as f:
        f.create_dataset("predictions", data=summary["predictions"])
        d = f.create_dataset("resolution", data=summary["resolution"])
        d.attrs["resolutions_total"] = summary["R"]
        f.create_dataset("predictions_one_shot", data=summary["one_shot"])
        keys = ("resolution", "bits", "active", "settled", "settled_cumulative", "accuracy", "estimate_accuracy",
                "estimate_agrees", "differ", "work", "time")
        ints = ("resolution", "bits", "active", "settled", "differ")
        table = np.zeros(len(summary["rows"]), dtype=[(k, "i8" if k in ints else "f8") for k in keys])
        for i, row in enumerate(summary["rows"]):
            table[i] = tuple(row[k] for k in keys)
        f.create_dataset("per_resolution", data=table)
        f.attrs.update({"model": str(args.model), "data": setup["x_label"], "bits": setup["bits"],
                        "component_bits": np.array(setup["component_bits"], dtype=np.int64),
                        "full": bool(args.full), "ranks": size, "calibration": setup["calibrated_on"],
                        "agrees_with_one_shot": summary["agree"], "rule": setup["rule"],
                        "differ_from_one_shot": summary["mismatches"]})


def format_report(summary: dict, setup: dict, args, size: int) -> str:
    split = setup["split"]
    rule = setup["rule"] if summary["certified"] else f"{setup['rule']} (NOT certified)"
    lines = [f"mpilayer infer: {setup['x_label']} ({summary['m']} samples) through {args.model} "
             f"({' -> '.join(str(l.W.shape[0]) for l in setup['layers'])} -> {setup['layers'][-1].W.shape[1]}) "
             f"on {size} rank(s); {split.bits}-bit, components {'+'.join(map(str, split.widths))}; rule {rule}; "
             f"{'full (every sample to the final resolution)' if args.full else 'adaptive'}; "
             f"activation calibration from the {setup['calibrated_on']}"]
    head = (f"{'res':>3} {'bits':>4} {'computed':>8} {'settled':>7} {'cum.settled':>11} {'differ':>6} {'est.acc':>7} "
            f"{'est=1shot':>9} {'cum.work/1shot':>14} {'cum.time/1shot':>14}")
    lines.append(head)
    for row in summary["rows"]:
        acc = f"{row['estimate_accuracy']:.4f}" if not np.isnan(row["estimate_accuracy"]) else "-"
        lines.append(f"{row['resolution']:>3} {row['bits']:>4} {row['active']:>8} {row['settled']:>7} "
                     f"{100 * row['settled_cumulative']:>10.1f}% {row['differ']:>6} {acc:>7} "
                     f"{100 * row['estimate_agrees']:>8.1f}% {row['work']:>14.3f} {row['time']:>14.2f}")
    lines.append("differ: settled at this resolution with a prediction other than one-shot; est.acc, est=1shot: "
                 "every sample's estimate at this resolution (diagnostic, not timed)")
    lines.append(f"one-shot quantised inference: {1e3 * summary['one_shot_s']:.2f} ms, model work "
                 f"{1e6 * summary['one_shot_work_s']:.1f} us"
                 + (f", accuracy {summary['one_shot_accuracy']:.4f} (float64 model {summary['float_accuracy']:.4f})"
                    if summary["one_shot_accuracy"] is not None else ""))
    if summary["certified"]:
        first = next(row for row in summary["rows"] if row["active"])["bits"] if summary["m"] else split.bits
        lines.append(f"first certificate pass ({first} bits) on every sample: {summary['check_pass']:.3f}x one-shot "
                     "work on this CPU's kernels: the certified rule's cum. work cannot go below it")
    final = summary["rows"][-1]["settled"]
    lines.append(f"samples needing the final resolution: {final}/{summary['m']} ({100 * summary['final_fraction']:.1f}%)")
    if summary["agree"]:
        lines.append(f"settled predictions equal the one-shot quantised predictions: yes ({summary['m']}/{summary['m']}) "
                     f"-> {args.output}")
    elif summary["certified"]:
        lines.append(f"settled predictions equal the one-shot quantised predictions: NO, {summary['mismatches']} differ "
                     f"-> {args.output}")
    else:
        lines.append(f"settled predictions equal the one-shot quantised predictions: no, {summary['mismatches']}/"
                     f"{summary['m']} differ (rule {setup['rule']} is not certified) -> {args.output}")
    return "\n".join(lines)

