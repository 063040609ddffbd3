"""``mpilayer info RESULT --plot IMAGE``: a matmul result's /timeline as a picture (matplotlib, Agg).

Left, the run's statistical estimate of each resolution's relative error (|C_r - P|_F / |P|_F,
P the exact product of the quantised operands) and, for real inputs, of the quantisation's
(|A B - P|_F / |P|_F); right, the certified bound on max |C_r - P|. Both against seconds from
rank 0's start; the exact resolution (error 0, not drawable on a log axis) is a dashed line.
"""
from __future__ import annotations

import os

import numpy as np

from mpilayer.errors import InputError, OutputError, one_line


def plot_timeline(path, image) -> None:
    """Draw ``path``'s /timeline into ``image`` (PNG, SVG or PDF, by its extension)."""
    from mpilayer.io.result_store import read_result

    result = read_result(path, max_c_bytes=0)
    timeline, attrs = result.get("timeline"), result["attrs"]
    if timeline is None or len(timeline) == 0:
        raise InputError(f"{path}: no resolution in /timeline yet: nothing to plot")
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    t, res = timeline["elapsed_s"], timeline["resolution"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    _log_curve(left, t, res, timeline["error_estimate"], "resolution's estimated relative error", "tab:blue")
    quant = timeline["quantization_error_estimate"]
    if np.any(quant > 0):
        left.axhline(float(quant[-1]), color="tab:gray", linestyle=":",
                     label=f"quantisation's estimated relative error ({quant[-1]:.2g})")
    left.set_ylabel("relative Frobenius error (estimated)")
    _log_curve(right, t, res, timeline["error_bound"], "certified bound on max |C_r - P|", "tab:red")
    right.set_ylabel("max |C_r - P| (certified bound)")
    for ax in (left, right):
        ax.set_xlabel("seconds from rank 0's start")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    shape = "x".join(str(d) for d in result["shape"])
    fig.suptitle(f"{os.path.basename(str(path))}: C {shape}, {attrs.get('bits')}-bit, components "
                 f"{'+'.join(str(w) for w in attrs.get('component_bits', ()))}, {attrs.get('ranks')} rank(s), "
                 f"stopped by {attrs.get('stopped_by')}", fontsize=10)
    try:
        fig.savefig(image, dpi=110)
    except (OSError, ValueError) as err:
        raise OutputError(f"cannot write {image}: {one_line(err)}") from None
    finally:
        plt.close(fig)


def _log_curve(ax, t, res, values, label: str, color: str) -> None:
    """``values`` per resolution on a log axis, each point labelled with its resolution; a zero
    value (the exact product) as a dashed vertical line at its time."""
    values = np.asarray(values, dtype=np.float64)
    positive = values > 0
    if positive.any():
        ax.plot(t[positive], values[positive], "o-", color=color, label=label)
        for x, y, r in zip(t[positive], values[positive], res[positive]):
            ax.annotate(str(int(r)), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_yscale("log")
    for x, r in zip(t[~positive], res[~positive]):
        ax.axvline(x, color="tab:green", linestyle="--", label=f"resolution {int(r)}: exact ({x:.3g} s)")
