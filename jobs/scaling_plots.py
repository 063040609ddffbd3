"""The PNGs of ``mpilayer scaling`` (matplotlib, Agg backend), drawn from the report dict.

* ``time_to_resolution.png``: time from the first job to each resolution, one curve per rank
  count (the legend gives each run's start-up time), one panel per mode;
* ``speedup.png``: speedup and parallel efficiency (per rank) vs ranks, at the first and at the
  final resolution, with the ideal lines by ranks and by workers;
* ``bound_vs_time.png``: certified error bound vs time per rank count (log y; the exact
  result, bound 0, is drawn on the "exact" line at the bottom);
* ``breakdown.png``: compute / comm / idle / io / other seconds of every rank of every selected
  run, as stacked bars (runs with more than ``MAX_WORKER_BARS`` workers show the workers' mean).

Only the selected run of each (mode, ranks) is drawn (see :mod:`mpilayer.jobs.scaling`);
oversubscribed rank counts get hollow markers and a shaded band.
"""
from __future__ import annotations

import os

MAX_WORKER_BARS = 8
MODE_COLORS = {"strong": "tab:blue", "weak": "tab:orange"}
PART_COLORS = {"compute_s": "tab:green", "comm_s": "tab:blue", "idle_s": "lightgray", "io_s": "tab:red",
               "other_s": "tab:purple"}
PART_LABELS = {"compute_s": "compute", "comm_s": "comm", "idle_s": "idle", "io_s": "I/O",
               "other_s": "other (unaccounted)"}


def plot_all(report: dict, out: str) -> list:
    """Write the four PNGs into ``out``; returns their paths."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    chosen = [r for r in report["runs"] if r["selected"]]
    paths = []
    for name, draw in (("time_to_resolution.png", _time_to_resolution), ("speedup.png", _speedup),
                       ("bound_vs_time.png", _bound_vs_time), ("breakdown.png", _breakdown)):
        fig = draw(plt, report, chosen)
        path = os.path.join(out, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------- helpers

def _modes(chosen) -> list:
    return [m for m in ("strong", "weak") if any(r["mode"] == m for r in chosen)] or ["strong"]


def _title(fig, report, what: str) -> None:
    from mpilayer.jobs.scaling import _problem_text
    machines = report["machines"]
    host = "; ".join(f"{m['hostname']}: {m['cpu_model']}, {m['cpus_available']} CPUs, {m['launcher']}"
                     for m in machines[:3]) + (f"; +{len(machines) - 3} more" if len(machines) > 3 else "")
    date = machines[0]["date"][:16].replace("T", " ") if machines else ""
    fig.suptitle(f"mpilayer {what}\n{_problem_text(report['problem'], report.get('modes', ('strong',)))}\n"
                 f"{host}; {date}; {report['pick']} of the quiet runs per point", fontsize=9)


def _work(t):
    return t["work_s"] if t.get("work_s") is not None else t["elapsed_s"]


def _label(r) -> str:
    w = r["workers"]
    return (f"{r['ranks']} rank{'s' if r['ranks'] > 1 else ''} ({w} worker{'s' if w > 1 else ''})"
            + (", oversubscribed" if r["oversubscribed"] else ""))


def _colors(plt, n):
    cmap = plt.get_cmap("viridis")
    return [cmap(0.85 * i / max(1, n - 1)) for i in range(n)]


def _cpus(report) -> int:
    return min(m["cpus_available"] for m in report["machines"]) if report["machines"] else 0


def _figure(plt, ncols, height=4.6):
    fig, axes = plt.subplots(1, ncols, figsize=(6.2 * ncols, height), squeeze=False)
    return fig, list(axes[0])


# ---------------------------------------------------------------------------- the plots

def _time_to_resolution(plt, report, chosen):
    modes = _modes(chosen)
    fig, axes = _figure(plt, len(modes))
    for ax, mode in zip(axes, modes):
        runs = sorted((r for r in chosen if r["mode"] == mode), key=lambda r: r["ranks"])
        n_res = max((r["resolutions_total"] for r in runs), default=1)
        for r, color in zip(runs, _colors(plt, len(runs))):
            x = [t["resolution"] for t in r["timeline"]]
            marker = dict(marker="o", markerfacecolor="white" if r["oversubscribed"] else color)
            label = _label(r) + (f"; start-up {r['start_s']:.2f} s" if r["start_s"] is not None else "")
            ax.plot(x, [_work(t) for t in r["timeline"]], "-", color=color, label=label, **marker)
            t = r["timeline"][-1]
            ax.annotate(f"{_work(t):.2f} s", (x[-1], _work(t)), textcoords="offset points", xytext=(6, 0),
                        fontsize=7, color=color, va="center")
        ax.set_xticks(range(n_res))
        ax.set_xticklabels([f"{i}" + ("\ncoarse" if i == 0 else "\nexact" if i == n_res - 1 else "")
                            for i in range(n_res)])
        ax.set_xlim(-0.3, n_res - 0.5)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("resolution")
        ax.set_ylabel("seconds from the first job")
        shape = runs[0]["shape"] if runs else report["problem"]["shape"]
        ax.set_title(f"{mode} scaling" + (f" (M = {report['problem']['shape'][0]} x workers)" if mode == "weak"
                                          else f" ({shape[0]}x{shape[1]}x{shape[2]})"), fontsize=10)
        ax.grid(alpha=0.3)
        if runs:
            ax.legend(fontsize=8, loc="upper left")
    _title(fig, report, "time to resolution")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.62 / fig.get_size_inches()[1]))
    return fig


def _speedup(plt, report, chosen):
    summary = report["summary"]
    fig, (ax_s, ax_e) = _figure(plt, 2)
    cpus = _cpus(report)
    ranks_all = sorted({s["ranks"] for s in summary}) or [1]
    for mode in ("strong", "weak"):
        rows = sorted((s for s in summary if s["mode"] == mode), key=lambda s: s["ranks"])
        if not rows:
            continue
        color = MODE_COLORS[mode]
        for which, style in (("final", "-"), ("first", "--")):
            pts = [(s["ranks"], s[f"speedup_{which}"], s[f"efficiency_{which}"], s["oversubscribed"])
                   for s in rows if s[f"speedup_{which}"] is not None]
            if not pts:
                continue
            name = f"{mode}{' (scaled)' if mode == 'weak' else ''}, {'exact' if which == 'final' else 'first'} resolution"
            xs = [p[0] for p in pts]
            for ax, idx in ((ax_s, 1), (ax_e, 2)):
                ax.plot(xs, [p[idx] for p in pts], style, color=color, label=name)
                for p in pts:
                    ax.plot(p[0], p[idx], "o" if which == "final" else "s", color=color,
                            markerfacecolor="white" if p[3] else color, markersize=6)
    ref = min(ranks_all)
    ref_workers = 1 if ref == 1 else ref - 1
    grid = list(range(min(ranks_all), max(ranks_all) + 1))
    ax_s.plot(grid, [r / ref for r in grid], color="gray", ls=":", label="ideal by ranks")
    ax_s.plot(grid, [(1 if r == 1 else r - 1) / ref_workers for r in grid], color="black", ls="-.", lw=0.8,
              label="ideal by workers (rank 0 coordinates)")
    ax_e.axhline(1.0, color="gray", ls=":", label="ideal")
    for ax in (ax_s, ax_e):
        if cpus and max(ranks_all) > cpus:
            ax.axvspan(cpus + 0.5, max(ranks_all) + 0.5, color="red", alpha=0.07)
            ax.text(max(ranks_all) + 0.45, 0.5, f"oversubscribed\n(> {cpus} CPUs)", ha="right",
                    transform=ax.get_xaxis_transform(), fontsize=7, color="darkred", va="center")
        ax.set_xticks(ranks_all)
        ax.set_xlim(min(ranks_all) - 0.3, max(ranks_all) + 0.5)
        ax.set_xlabel("MPI ranks (1 = single process; R > 1 = 1 master + R-1 workers)")
        ax.grid(alpha=0.3)
    ax_s.set_ylim(bottom=0)
    ax_e.set_ylim(0, max(1.15, ax_e.get_ylim()[1]))
    ax_s.set_ylabel(f"speedup vs {ref} rank{'s' if ref > 1 else ''} (time from first job)")
    ax_e.set_ylabel("efficiency = speedup / (ranks / ref. ranks)")
    ax_s.set_title("speedup (hollow markers: oversubscribed)", fontsize=10)
    ax_e.set_title("efficiency per rank", fontsize=10)
    ax_s.legend(fontsize=7, loc="upper left")
    ax_e.legend(fontsize=7, loc="upper right")
    _title(fig, report, "speedup")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.62 / fig.get_size_inches()[1]))
    return fig


def _bound_vs_time(plt, report, chosen):
    modes = _modes(chosen)
    fig, axes = _figure(plt, len(modes))
    positive = [t["error_bound"] for r in chosen for t in r["timeline"] if t["error_bound"]]
    floor = min(positive) / 30 if positive else 1.0
    for ax, mode in zip(axes, modes):
        runs = sorted((r for r in chosen if r["mode"] == mode), key=lambda r: r["ranks"])
        for r, color in zip(runs, _colors(plt, len(runs))):
            xs = [_work(t) for t in r["timeline"]]
            ys = [t["error_bound"] if t["error_bound"] else floor for t in r["timeline"]]
            ax.plot(xs, ys, "-", drawstyle="steps-post", color=color, label=_label(r))
            ax.plot(xs, ys, "o", color=color, markerfacecolor="white" if r["oversubscribed"] else color)
        ax.set_yscale("log")
        ax.axhline(floor, color="gray", lw=0.8, ls="--")
        ax.text(0.01, floor, " exact (bound 0)", transform=ax.get_yaxis_transform(), ha="left", va="bottom",
                fontsize=7, color="gray")
        ax.set_xlim(left=0)
        ax.set_ylim(floor / 3, (max(positive) * 5) if positive else 10)
        ax.set_xlabel("seconds from first job")
        ax.set_ylabel("certified bound on max |C - exact| (log)")
        ax.set_title(f"{mode} scaling: error bound vs time", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        if runs:
            ax.legend(fontsize=8, loc="upper right")
    _title(fig, report, "error bound vs time")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.62 / fig.get_size_inches()[1]))
    return fig


def _breakdown(plt, report, chosen):
    modes = _modes(chosen)
    groups = {mode: [] for mode in modes}
    for mode in modes:
        for r in sorted((r for r in chosen if r["mode"] == mode), key=lambda r: r["ranks"]):
            stats = sorted(r.get("rank_stats") or [], key=lambda s: s.get("rank", 0))
            bars = []
            master = [s for s in stats if s.get("rank") == 0]
            workers = [s for s in stats if s.get("rank") != 0]
            for s in master:
                bars.append(("r0\n" + ("all" if s.get("role") == "master+worker" else "master"), s))
            if len(workers) > MAX_WORKER_BARS:
                mean = {k: sum(float(w.get(k) or 0) for w in workers) / len(workers) for k in PART_COLORS}
                bars.append((f"{len(workers)} wkrs\n(mean)", mean))
            else:
                bars += [(f"r{s['rank']}", s) for s in workers]
            groups[mode].append((r, bars))
    widest = max((sum(len(b) + 1 for _, b in g) for g in groups.values()), default=4)
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(9.0, 0.55 * widest + 2), 3.6 * len(modes) + 1.2),
                             squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        x, ticks, labels, centers = 0.0, [], [], []
        for r, bars in groups[mode]:
            start = x
            for label, s in bars:
                bottom = 0.0
                for part, color in PART_COLORS.items():
                    value = float(s.get(part) or 0.0)
                    ax.bar(x, value, bottom=bottom, color=color, width=0.8, edgecolor="white", linewidth=0.3)
                    bottom += value
                ticks.append(x)
                labels.append(label)
                x += 1
            centers.append(((start + x - 1) / 2, r))
            x += 0.8
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels, fontsize=7)
        top = max([sum(float(s.get(p) or 0.0) for p in PART_COLORS) for _, bars in groups[mode] for _, s in bars]
                  + [1e-3])
        for cx, r in centers:
            m, k, n = r["shape"]
            ax.text(cx, top * 1.04, f"{r['ranks']} rank{'s' if r['ranks'] > 1 else ''}"
                    f"{' (oversub.)' if r['oversubscribed'] else ''}\n{m}x{k}x{n}",
                    ha="center", va="bottom", fontsize=7)
        ax.set_ylim(0, top * 1.3)
        ax.set_ylabel("seconds (wall of each rank)")
        ax.set_title(f"{mode} scaling: where each rank's time went", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in PART_COLORS.values()]
    fig.legend(handles, [PART_LABELS[p] for p in PART_COLORS], fontsize=8, ncol=5, loc="lower center",
               frameon=False)
    _title(fig, report, "time breakdown per rank")
    height = fig.get_size_inches()[1]
    fig.tight_layout(rect=(0, 0.35 / height, 1, 1 - 0.62 / height))
    return fig
