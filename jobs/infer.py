"""``mpilayer infer``: adaptive layered inference of an MLP with certified predictions, under MPI.

Rank 0 reads and checks the model and the data, then sends every rank (itself included) a
contiguous block of samples with the model; each rank runs the adaptive layered inference
(mpilayer.inference) and the exact one-shot quantised inference on its block and sends back
predictions, resolutions and per-resolution statistics; rank 0 writes the output and prints
the table. Every computation is per sample and exact in integers, so the results do not
depend on the number of ranks. With one rank everything is local. Ranks that wait do so by
sleep-polling (MPICH's blocking receives spin a core). Input errors are found on rank 0
before any work and sent to the other ranks, so every rank exits with status 2 after a
one-line message.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from mpilayer.errors import InputError, MpilayerError, OutputError

TAG_SETUP, TAG_RESULT = 41, 42
EXIT_INPUT = 2


def run(args) -> int:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.Get_rank() != 0:
        return _worker(comm)
    return _root(comm, args)


def _recv(comm, source: int, tag: int):
    from mpilayer.protocol import recv_when_ready

    return recv_when_ready(comm, source, tag)


def _worker(comm) -> int:
    setup = _recv(comm, 0, TAG_SETUP)
    if "error" in setup:
        return setup["status"]
    comm.send(compute(setup), dest=0, tag=TAG_RESULT)
    return 0


# --------------------------------------------------------------------------- set-up (rank 0)

def set_up(args) -> dict:
    """Read and check everything; raises MpilayerError with a one-line message."""
    from mpilayer.inference import QuantizedMLP, calibrate, read_inputs, read_labels, read_model

    out = os.path.abspath(args.output)
    if os.path.isdir(out):
        raise OutputError(f"{args.output} is a directory")
    if not os.path.isdir(os.path.dirname(out)):
        raise OutputError(f"{args.output}: directory {os.path.dirname(out)} does not exist")
    if os.path.exists(out) and not args.force:
        raise OutputError(f"{args.output} exists; pass --force to overwrite it")
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
        model = QuantizedMLP(layers, args.bits, args.component_bits)
    except (TypeError, ValueError) as err:
        raise InputError(f"--bits/--component-bits: {err}") from None
    return {"layers": layers, "bits": model.bits, "component_bits": model.split.widths, "X": X, "y": y,
            "x_label": x_label, "calibrated_on": calibrated_on, "split": model.split}


def compute(setup: dict) -> dict:
    """One rank's work on its block: one-shot and layered inference, each timed best of ``repeat``."""
    from mpilayer.inference import QuantizedMLP, layered_inference

    model = QuantizedMLP(setup["layers"], setup["bits"], setup["component_bits"])
    X, repeat = setup["X"], max(1, setup["repeat"])
    one_shot_s, res_best = np.inf, None
    for _ in range(repeat):
        t = time.perf_counter()
        pred1, _, _, one_shot_work = model.one_shot(X)
        one_shot_s = min(one_shot_s, time.perf_counter() - t)
    for _ in range(repeat):
        res = layered_inference(model, X, adaptive=not setup["full"])
        if res_best is None or res.elapsed_s[-1] < res_best.elapsed_s[-1]:
            res_best = res
    res = res_best
    return {"predictions": res.predictions, "resolution": res.resolution, "predictions_at": res.predictions_at,
            "one_shot": pred1, "one_shot_s": one_shot_s, "one_shot_work_s": one_shot_work,
            "work_s": np.array(res.work_s), "elapsed_s": np.array(res.elapsed_s), "active": np.array(res.active)}


# --------------------------------------------------------------------------- rank 0

def _root(comm, args) -> int:
    size = comm.Get_size()
    try:
        setup = set_up(args)
    except MpilayerError as err:
        for rank in range(1, size):
            comm.send({"error": str(err), "status": EXIT_INPUT}, dest=rank, tag=TAG_SETUP)
        print(f"mpilayer: error: {err}", file=sys.stderr)
        return EXIT_INPUT
    X = setup["X"]
    blocks = np.array_split(np.arange(X.shape[0]), size)
    common = {"layers": setup["layers"], "bits": setup["bits"], "component_bits": setup["component_bits"],
              "full": args.full, "repeat": args.repeat}
    for rank in range(1, size):
        comm.send(dict(common, X=X[blocks[rank]]), dest=rank, tag=TAG_SETUP)
    parts = [compute(dict(common, X=X[blocks[0]]))]
    parts += [_recv(comm, rank, TAG_RESULT) for rank in range(1, size)]
    summary = combine(parts, setup, args, size)
    write_output(args.output, summary, setup, args, size)
    print(format_report(summary, setup, args, size), flush=True)
    return 0 if summary["agree"] else 1


def combine(parts: list, setup: dict, args, size: int) -> dict:
    cat = lambda key: np.concatenate([p[key] for p in parts])  # noqa: E731
    R = setup["split"].n_resolutions
    predictions, resolution, one_shot = cat("predictions"), cat("resolution"), cat("one_shot")
    predictions_at = np.concatenate([p["predictions_at"] for p in parts], axis=1)
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
            "work": float(sum(p["work_s"][: r + 1].sum() for p in parts) / one_shot_work) if one_shot_work else np.nan,
            "time": float(max(p["elapsed_s"][r] for p in parts) / one_shot_s) if one_shot_s else np.nan,
        })
    return {"predictions": predictions, "resolution": resolution, "one_shot": one_shot, "rows": rows,
            "agree": bool(np.array_equal(predictions, one_shot)), "mismatches": int(np.sum(predictions != one_shot)),
            "final_fraction": float(counts[-1] / m) if m else 0.0, "m": m, "R": R,
            "one_shot_s": one_shot_s, "one_shot_work_s": one_shot_work,
            "one_shot_accuracy": float(np.mean(one_shot == y)) if y is not None else None,
            "float_accuracy": _float_accuracy(setup) if y is not None else None}


def _float_accuracy(setup) -> float:
    from mpilayer.inference import float_forward

    return float(np.mean(np.argmax(float_forward(setup["layers"], setup["X"]), axis=1) == setup["y"]))


def write_output(path: str, summary: dict, setup: dict, args, size: int) -> None:
    """Write atomically: a temporary file next to the output, then ``os.replace``."""
    from mpilayer.h5io import open_h5

    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp")
    try:
        with open_h5(tmp, "w") as f:
            f.create_dataset("predictions", data=summary["predictions"])
            d = f.create_dataset("resolution", data=summary["resolution"])
            d.attrs["resolutions_total"] = summary["R"]
            f.create_dataset("predictions_one_shot", data=summary["one_shot"])
            keys = ("resolution", "bits", "active", "settled", "settled_cumulative", "accuracy", "work", "time")
            table = np.zeros(len(summary["rows"]), dtype=[(k, "i8" if k in ("resolution", "bits", "active", "settled") else "f8") for k in keys])
            for i, row in enumerate(summary["rows"]):
                table[i] = tuple(row[k] for k in keys)
            f.create_dataset("per_resolution", data=table)
            f.attrs.update({"model": str(args.model), "data": setup["x_label"], "bits": setup["bits"],
                            "component_bits": np.array(setup["component_bits"], dtype=np.int64),
                            "full": bool(args.full), "ranks": size, "calibration": setup["calibrated_on"],
                            "agrees_with_one_shot": summary["agree"]})
        os.replace(tmp, path)
    except OSError as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OutputError(f"{path}: cannot write ({err})") from None


def format_report(summary: dict, setup: dict, args, size: int) -> str:
    split = setup["split"]
    lines = [f"mpilayer infer: {setup['x_label']} ({summary['m']} samples) through {args.model} "
             f"({' -> '.join(str(l.W.shape[0]) for l in setup['layers'])} -> {setup['layers'][-1].W.shape[1]}) "
             f"on {size} rank(s); {split.bits}-bit, components {'+'.join(map(str, split.widths))}; "
             f"{'full (every sample to the final resolution)' if args.full else 'adaptive'}; "
             f"activation calibration from the {setup['calibrated_on']}"]
    head = f"{'res':>3} {'bits':>4} {'computed':>8} {'settled':>7} {'cum.settled':>11} {'accuracy':>8} {'cum.work/1shot':>14} {'cum.time/1shot':>14}"
    lines.append(head)
    for row in summary["rows"]:
        acc = f"{row['accuracy']:.4f}" if not np.isnan(row["accuracy"]) else "-"
        lines.append(f"{row['resolution']:>3} {row['bits']:>4} {row['active']:>8} {row['settled']:>7} "
                     f"{100 * row['settled_cumulative']:>10.1f}% {acc:>8} {row['work']:>14.3f} {row['time']:>14.2f}")
    lines.append(f"one-shot quantised inference: {1e3 * summary['one_shot_s']:.2f} ms, model work "
                 f"{1e6 * summary['one_shot_work_s']:.1f} us"
                 + (f", accuracy {summary['one_shot_accuracy']:.4f} (float64 model {summary['float_accuracy']:.4f})"
                    if summary["one_shot_accuracy"] is not None else ""))
    final = summary["rows"][-1]["settled"]
    lines.append(f"samples needing the final resolution: {final}/{summary['m']} ({100 * summary['final_fraction']:.1f}%)")
    if summary["agree"]:
        lines.append(f"settled predictions equal the one-shot quantised predictions: yes ({summary['m']}/{summary['m']}) "
                     f"-> {args.output}")
    else:
        lines.append(f"settled predictions equal the one-shot quantised predictions: NO, {summary['mismatches']} differ "
                     f"-> {args.output}")
    return "\n".join(lines)
