"""``mpilayer scaling``: a strong/weak scaling sweep of ``mpilayer matmul``, with CSV, JSON and plots.

Run it on a login node or inside an allocation, *not* under mpiexec/srun: it launches one
``mpilayer matmul`` per configuration itself (``mpiexec -n R`` or ``srun -n R --mpi=pmi2``)
and reads each run's result file (/C attributes, /timeline, /ranks).

* strong: the fixed problem ``--shape M,K,N`` on every rank count;
* weak: the work per worker is fixed: M = M0 x workers, where ``--shape M0,K,N`` is the
  problem of one worker (1 rank = 1 process doing everything, R ranks = 1 master + R-1
  workers, so 1 and 2 ranks get the same problem).

Times. ``elapsed_s`` is what the result file records: seconds since the program started on
rank 0 (interpreter start-up, imports, MPI initialisation and reading the inputs included).
``start_s`` is that start-up phase, the result file's ``setup_s`` attribute, and
``work_s = elapsed_s - start_s`` is the time from the first mini-job to the resolution. The
speedups, efficiencies and plots use ``work_s``; the tables carry both.

Speedup of a run with R ranks against the reference run (1 rank if swept, else the smallest
rank count of the same mode): ``S = (M_R / M_ref) * t_ref / t_R`` -- for strong scaling the
usual ``t_ref / t_R``, for weak scaling the *scaled* speedup. Parallel efficiency per rank is
``S / (R / R_ref)``; per worker ``S / (W / W_ref)`` (rank 0 only coordinates once there are
workers, so on R ranks the ideal speedup over 1 rank is R-1, not R; for weak scaling the
worker efficiency is the classic ``t_ref / t_R``).

``--warmup`` untimed runs of the first configuration come first (default 1: the first launch
after writing the inputs pays for cold caches, and it would be the reference of the speedups).
Each run records ``background_load``: the CPU time other processes on this host used while it ran,
over wall x CPUs (mpiexec on one host only), so that a measurement disturbed by a neighbour shows.
Runs with a background load above ``--max-background`` (default 0.1) are not chosen for the
summary unless all runs of their configuration are.
With ``--repeat N`` every configuration runs N times (repeats interleaved, so a slow phase of
the machine does not hit one configuration only); the *median* run by time to the exact
result (``--pick median``, the lower median for even N) or the fastest (``--pick best``) is
the one used for the summary and the plots. All runs stay in the CSVs and the JSON, with
``selected`` = 1 on the chosen ones.

Output in ``-o DIR``: ``scaling.csv`` (one row per run x resolution; ``resolution`` is
0-based as in /timeline; ``error_bound`` the certified max |C_r - C|, ``error_estimate`` the
run's statistical estimate of the relative error |C_r - C|_F / |C|_F), ``ranks.csv`` (one row per run x rank), ``scaling.json``
(everything, with the machine), and the PNGs of :mod:`mpilayer.jobs.scaling_plots`.
``mpilayer scaling merge DIR... -o DIR`` pools the ``scaling.json`` of separate sweeps of
the same problem (e.g. one Slurm job per node count) into one report; runs of the same mode
and rank count found in several inputs are treated as repeats of each other.
"""
from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

from mpilayer.cli.options import launched_rank
from mpilayer.errors import InputError, OutputError, one_line

FORMAT = "mpilayer-scaling"
FORMAT_VERSION = 1
BREAKDOWN = ("compute_s", "comm_s", "idle_s", "io_s")
TIMELINE_COLUMNS = ("resolution", "resolutions_total", "elapsed_s", "start_s", "work_s", "step_s",
                    "error_bound", "error_estimate", "bytes_sent", "bytes_received", "tiles_done")
RANK_COLUMNS = ("rank", "role", "compute_s", "comm_s", "idle_s", "io_s", "other_s", "wall_s", "cpu_s",
                "jobs", "bytes_in", "bytes_out", "baseline_rss_bytes", "peak_rss_bytes")


# ---------------------------------------------------------------------------- entry point

def run(args) -> int:
    """``mpilayer scaling ...`` and ``mpilayer scaling merge DIR... -o DIR``."""
    if _under_launcher():
        if launched_rank() != 0:
            return 2
        raise InputError("mpilayer scaling launches its own MPI runs: start it directly (one process, "
                         "e.g. in the batch script), not under mpiexec/srun")
    words = list(args.merge or [])
    if words:
        if words[0] != "merge":
            raise InputError(f"unexpected argument {words[0]!r}; the only positional form is "
                             f"'mpilayer scaling merge DIR [DIR ...] -o DIR'")
        if len(words) < 2:
            raise InputError("merge needs at least one report directory: mpilayer scaling merge DIR [DIR ...] -o DIR")
        return merge(words[1:], args)
    return sweep(args)


# ---------------------------------------------------------------------------- the sweep

def sweep(args) -> int:
    ranks = parse_ranks(args.ranks)
    if args.repeat < 1:
        raise InputError(f"--repeat must be at least 1, not {args.repeat}")
    if not 0 <= args.max_background <= 1:
        raise InputError(f"--max-background must be a fraction in 0..1, not {args.max_background:g}")
    if args.warmup < 0:
        raise InputError(f"--warmup must be >= 0, not {args.warmup}")
    if args.timeout is not None and args.timeout <= 0:
        raise InputError(f"--timeout must be > 0 seconds, not {args.timeout:g}")
    modes = ("strong", "weak") if args.mode == "both" else (args.mode,)
    out = _prepare_out(args.output, args.force)
    launcher, prefix = resolve_launcher(args.launcher)
    machine = machine_info(launcher, prefix)
    m0, k, n = args.shape
    problem = {"shape": [m0, k, n], "dtype": args.dtype, "bits": args.bits,
               "component_bits": _listify(args.component_bits), "scale": args.scale,
               "tile": _listify(args.tile), "seed": args.seed}
    settings = {"ranks": ranks, "modes": list(modes), "repeat": args.repeat, "warmup": args.warmup,
                "pick": args.pick,
                "launcher": launcher, "launch_prefix": prefix, "timeout_s": args.timeout,
                "keep_files": bool(args.keep_files)}
    configs = [{"mode": mode, "ranks": r, "workers": workers_of(r),
                "shape": [m0 * (workers_of(r) if mode == "weak" else 1), k, n]}
               for mode in modes for r in ranks]

    work = os.path.join(out, "work")
    os.makedirs(work, exist_ok=True)
    cpus = machine["cpus_available"]
    say = (lambda *a, **k: None) if args.quiet else print  # -q: progress lines off
    say(f"mpilayer scaling: {', '.join(modes)} scaling of {_problem_text(problem, modes)} on ranks "
          f"{','.join(map(str, ranks))}, {args.repeat} repeat(s), launcher {launcher} ({' '.join(prefix)}); "
          f"{machine['hostname']}, {cpus} CPU(s) available", flush=True)
    if max(ranks) > cpus:
        print(f"note: {', '.join(str(r) for r in ranks if r > cpus)} rank(s) exceed the {cpus} available "
              f"CPU(s): those runs are oversubscribed and measure time-sharing, not scaling", flush=True)

    inputs = {}
    for cfg in configs:
        shape = tuple(cfg["shape"])
        if shape not in inputs:
            from mpilayer.io.example_data import write_example
            tag = "x".join(map(str, shape))
            a, b = (os.path.join(work, f"{name}-{tag}-{args.dtype}.h5") for name in ("A", "B"))
            t0 = time.perf_counter()
            inputs[shape] = write_example(a, b, shape, args.dtype, args.seed, force=True)
            say(f"  inputs {tag} {args.dtype} written in {time.perf_counter() - t0:.2f} s", flush=True)

    runs = []
    total = len(configs) * args.repeat
    interrupted = False
    try:
        for i in range(args.warmup):  # untimed: first launches pay for cold caches
            warm = run_one(configs[0], -1 - i, inputs[tuple(configs[0]["shape"])], work, args, launcher, prefix,
                           machine)
            say(f"  [warm-up, not recorded] {_run_line(warm)}", flush=True)
        for rep in range(args.repeat):
            for cfg in configs:
                run_rec = run_one(cfg, rep, inputs[tuple(cfg["shape"])], work, args, launcher, prefix, machine)
                runs.append(run_rec)
                say(f"  [{len(runs)}/{total}] {_run_line(run_rec)}", flush=True)
    except KeyboardInterrupt:  # keep what was measured: report the finished runs, then stop
        interrupted = True
        print(f"mpilayer scaling: interrupted after {len(runs)} of {total} run(s); reporting those", flush=True)
    finally:
        if not args.keep_files:
            shutil.rmtree(work, ignore_errors=True)

    source = {"dir": out, "machine": machine, "problem": problem, "settings": settings,
              "created": machine["date"]}
    for run_rec in runs:
        run_rec["source"] = 0
    report = build_report([source], runs, args.pick, args.max_background)
    write_report(report, out)
    if interrupted:
        raise KeyboardInterrupt
    failed = [r for r in runs if not r["ok"]]
    if failed:
        print(f"mpilayer scaling: {len(failed)} of {len(runs)} run(s) failed; see 'error' in {out}/scaling.json",
              file=sys.stderr)
        return 1
    return 0


def workers_of(ranks: int) -> int:
    """Ranks that compute: the one process with 1 rank, all but the master otherwise."""
    return 1 if ranks == 1 else ranks - 1


def parse_ranks(text) -> list:
    """``"1,2,4"`` -> [1, 2, 4] (sorted, unique); InputError otherwise."""
    try:
        values = sorted({int(v) for v in str(text).split(",") if v.strip()})
    except ValueError:
        raise InputError(f"--ranks must be comma-separated rank counts like 1,2,4, not {text!r}") from None
    if not values or values[0] < 1:
        raise InputError(f"--ranks must be comma-separated positive rank counts like 1,2,4, not {text!r}")
    return values


def run_one(cfg, rep, ab, work, args, launcher, prefix, machine) -> dict:
    """Launch one ``mpilayer matmul`` and turn its result file into a run record."""
    tag = f"{cfg['mode']}-r{cfg['ranks']}-{rep}"
    out_h5 = os.path.join(work, f"C-{tag}.h5")
    cmd = [*prefix_for(prefix, cfg["ranks"], launcher), sys.executable, "-m", "mpilayer", "matmul",
           ab[0], ab[1], "-o", out_h5, "--force", "--bits", str(args.bits), "--scale", args.scale]
    if args.component_bits is not None:
        widths = _listify(args.component_bits)
        cmd += ["--component-bits", widths if isinstance(widths, str) else ",".join(map(str, widths if isinstance(widths, list) else [widths]))]
    if args.tile:
        cmd += ["--tile", ",".join(map(str, args.tile))]
    rec = {"mode": cfg["mode"], "ranks": cfg["ranks"], "workers": cfg["workers"], "shape": cfg["shape"],
           "repeat": rep, "selected": False, "ok": False, "hostname": machine["hostname"],
           "oversubscribed": cfg["ranks"] > machine["cpus_available"], "command": cmd,
           "start_s": None, "elapsed_s": None, "resolutions_total": None, "exact": False, "timeline": [],
           "rank_stats": []}
    t0, busy0, kids0 = time.perf_counter(), _host_busy_s(), _children_cpu_s()
    code, stdout, stderr = _launch(cmd, args.timeout)
    rec["wall_s"] = time.perf_counter() - t0
    busy1, kids1 = _host_busy_s(), _children_cpu_s()
    local = launcher == "mpiexec" and int(os.environ.get("SLURM_JOB_NUM_NODES", "1") or 1) <= 1
    if local and busy0 is not None and busy1 is not None:
        # CPU time other processes on this host used during the run: host busy time minus the run's own
        rec["background_cpu_s"] = max(0.0, (busy1 - busy0) - (kids1 - kids0))
        rec["background_load"] = rec["background_cpu_s"] / (rec["wall_s"] * machine["cpus_available"])
    rec["returncode"] = code
    rec["log"] = stdout
    if code != 0:
        why = "timed out" if code is None else f"exit status {code}"
        rec["error"] = f"{why}: {_tail(stderr) or _tail(stdout)}"
        return rec
    try:
        from mpilayer.io.result_store import read_result
        result = read_result(out_h5, max_c_bytes=0)
    except Exception as err:  # noqa: BLE001 - a bad result file is a failed run, not a crashed sweep
        rec["error"] = f"cannot read {out_h5}: {one_line(err)}"
        return rec
    finally:
        if not args.keep_files:
            _remove(out_h5)
    setup = result["attrs"].get("setup_s")  # program start to the first job, from the result file
    rec.update(run_fields(result, float(setup) if setup is not None else None))
    rec["result_file"] = out_h5 if args.keep_files else None
    return rec


def run_fields(result: dict, start_s) -> dict:
    """What a run record keeps of a result file (see module docstring for the times)."""
    attrs = {key: _jsonable(value) for key, value in result["attrs"].items()}
    total = int(attrs.get("resolutions_total") or attrs.get("n_resolutions") or 0)
    timeline, previous = [], 0.0
    for row in _rows(result.get("timeline")):
        elapsed = float(row["elapsed_s"])
        work = elapsed - start_s if start_s is not None else None
        row.update(resolutions_total=total, start_s=start_s, work_s=work,
                   step_s=(work - previous) if work is not None else None)
        previous = work if work is not None else previous
        timeline.append(row)
    ranks = []
    for row in _rows(result.get("ranks")):
        if all(key in row for key in ("wall_s", *BREAKDOWN)):
            row["other_s"] = max(0.0, float(row["wall_s"]) - sum(float(row[key]) for key in BREAKDOWN))
        ranks.append(row)
    return {"ok": bool(timeline), "start_s": start_s, "elapsed_s": attrs.get("elapsed_s"),
            "resolutions_total": total, "resolution_reached": attrs.get("resolution"),
            "exact": bool(attrs.get("exact")), "stopped_by": attrs.get("stopped_by"),
            "kernels": attrs.get("kernels"), "tile": attrs.get("tile"), "attrs": attrs,
            "timeline": timeline, "rank_stats": ranks,
            **({} if timeline else {"error": "the result file has no /timeline rows"})}


def _launch(cmd, timeout):
    """Run ``cmd`` in its own session; on timeout kill that session. ``(code|None, out, err)``."""
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    env.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")  # Open MPI refuses -n > cores otherwise
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        _kill_session(proc, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            _kill_session(proc, signal.SIGKILL)
            out, err = proc.communicate()
        return None, out, (err or "") + f"\n(killed after --timeout {timeout:g} s)"
    except BaseException:
        _kill_session(proc, signal.SIGKILL)
        proc.wait()
        raise


def _host_busy_s():
    """Seconds all CPUs of this host were busy since boot (/proc/stat), None where unavailable."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    """User + system seconds of this process's finished (and waited-for) descendants."""
    import resource
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _kill_session(proc, sig) -> None:
    try:
        os.killpg(proc.pid, sig)  # the launcher's own session: only what this job started
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------------------- launcher, machine

def resolve_launcher(choice: str):
    """``(name, command prefix without -n)`` for ``--launcher auto|mpiexec|srun``."""
    if choice == "auto":
        if os.environ.get("SLURM_JOB_ID") and shutil.which("srun"):
            choice = "srun"
        else:
            if os.environ.get("SLURM_JOB_ID"):
                print("note: SLURM_JOB_ID is set but there is no srun on PATH; using mpiexec", flush=True)
            choice = "mpiexec"
    if choice == "srun":
        srun = shutil.which("srun")
        if not srun:
            raise InputError("--launcher srun: no srun on PATH")
        if not os.environ.get("SLURM_JOB_ID"):
            raise InputError("--launcher srun needs a Slurm allocation (SLURM_JOB_ID is not set)")
        prefix = [srun, "--mpi=pmi2", "--kill-on-bad-exit=1"]
        if os.environ.get("SLURM_CPUS_PER_TASK"):  # srun does not inherit -c from sbatch (Slurm 22.05)
            prefix.append(f"--cpus-per-task={os.environ['SLURM_CPUS_PER_TASK']}")
        return "srun", prefix
    found = (os.environ.get("MPIEXEC") or shutil.which("mpiexec")
             or shutil.which("mpiexec", path=os.path.dirname(sys.executable)))
    if not found:
        raise InputError("no mpiexec: set MPIEXEC, put one on PATH (the mpich wheel's is in the venv's bin), "
                         "or use --launcher srun inside Slurm")
    return "mpiexec", [found]


def prefix_for(prefix: list, ranks: int, launcher: str) -> list:
    """The launch prefix for ``ranks`` ranks: ``mpiexec -n R`` / ``srun -n R --mpi=pmi2 ...``."""
    return [prefix[0], "-n", str(ranks), *prefix[1:]]


def machine_info(launcher: str, prefix: list) -> dict:
    import mpilayer
    versions = {"python": platform.python_version()}
    try:
        from importlib.metadata import PackageNotFoundError, version
        for pkg in ("numpy", "h5py", "mpi4py", "mpich", "matplotlib"):
            try:
                versions[pkg] = version(pkg)
            except PackageNotFoundError:
                pass
    except ImportError:  # pragma: no cover - Python < 3.8
        pass
    slurm = {key: os.environ[var] for key, var in (("job_id", "SLURM_JOB_ID"), ("nodelist", "SLURM_JOB_NODELIST"),
                                                   ("nodes", "SLURM_JOB_NUM_NODES"),
                                                   ("cpus_per_node", "SLURM_JOB_CPUS_PER_NODE"))
             if os.environ.get(var)}
    return {
        "hostname": socket.gethostname(),
        "cores": os.cpu_count(),
        "cpus_available": available_cpus(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "mpilayer_version": getattr(mpilayer, "__version__", "unknown"),
        "versions": versions,
        "launcher": launcher,
        "launch_command": " ".join(prefix),
        "slurm": slurm or None,
        "threads_per_rank": os.environ.get("OPENBLAS_NUM_THREADS", "1"),
        "source_tree": _source_tree(os.path.dirname(os.path.abspath(mpilayer.__file__))),
    }


def _source_tree(path: str):
    """Commit of the mpilayer checkout and whether it had local changes (read-only git); None if no git."""
    try:
        head = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", path, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return {"commit": head.stdout.strip(), "modified": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def available_cpus() -> int:
    """CPUs the runs may use: the Slurm allocation's if inside one, else this process's affinity."""
    spec = os.environ.get("SLURM_JOB_CPUS_PER_NODE", "") if os.environ.get("SLURM_JOB_ID") else ""
    total = 0
    for item in filter(None, spec.split(",")):   # "4(x2),2" = 10
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if m:
            total += int(m.group(1)) * int(m.group(2) or 1)
    if total:
        return total
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _under_launcher() -> bool:
    """True when this process is one of several ranks started by mpiexec/srun."""
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS"):
        if os.environ.get(var, "").isdigit() and int(os.environ[var]) > 1:
            return True
    step = os.environ.get("SLURM_STEP_ID", "")
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "")
    return step.isdigit() and int(step) < 4294967290 and tasks.isdigit() and int(tasks) > 1


# ---------------------------------------------------------------------------- report

def build_report(sources: list, runs: list, pick: str, max_background: float = 1.0) -> dict:
    """Select one run per (mode, ranks), compute speedups, and assemble the JSON document.

    Runs during which other processes used more than ``max_background`` of the host's CPU are
    left out of the choice, unless every run of the group was disturbed."""
    for i, run_rec in enumerate(runs):
        run_rec["id"] = i
        run_rec["selected"] = False
    groups = {}
    for run_rec in runs:
        if run_rec["ok"]:
            groups.setdefault((run_rec["mode"], run_rec["ranks"]), []).append(run_rec)
    for group in groups.values():
        group.sort(key=lambda r: (_final_time(r), r["source"], r["repeat"]))
        clean = [r for r in group if (r.get("background_load") or 0.0) <= max_background] or group
        chosen = clean[0] if pick == "best" else clean[(len(clean) - 1) // 2]
        chosen["selected"] = True
    problem = dict(sources[0]["problem"])
    done = [r for r in runs if r["ok"]]
    if done:  # what matmul actually used when left to its defaults
        attrs = done[0].get("attrs") or {}
        if attrs.get("component_bits") is not None:
            problem["components_used"] = _listify(attrs["component_bits"])
        tiles = _unique([_listify(r["attrs"]["tile"])[:2] for r in done
                         if (r.get("attrs") or {}).get("tile") is not None], key=tuple)
        if tiles:  # one per run when matmul picks it (the automatic tile depends on the workers)
            problem["tile_used"] = tiles[0] if len(tiles) == 1 else tiles
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "problem": problem, "pick": pick, "max_background": max_background,
        "modes": [m for m in ("strong", "weak") if any(r["mode"] == m for r in runs)],
        "machines": _unique([s["machine"] for s in sources], key=_machine_key),
        "sources": sources,
        "summary": summarize(runs, max_background),
        "runs": runs,
    }


def summarize(runs: list, max_background: float = 1.0) -> list:
    """One row per (mode, ranks) of the selected runs, with speedups against the reference."""
    rows = []
    for mode in ("strong", "weak"):
        chosen = sorted((r for r in runs if r["selected"] and r["mode"] == mode), key=lambda r: r["ranks"])
        if not chosen:
            continue
        ref = next((r for r in chosen if r["ranks"] == 1), chosen[0])
        finals, quiet = {}, {}
        limit = max_background
        for r in runs:
            if r["ok"] and r["mode"] == mode:
                calm = (r.get("background_load") or 0.0) <= limit
                quiet[r["ranks"]] = quiet.get(r["ranks"], 0) + calm
                finals.setdefault(r["ranks"], {True: [], False: []})[calm].append(_final_time(r))
        finals = {k: v[True] or v[False] for k, v in finals.items()}  # the runs the choice was made from
        for r in chosen:
            tl = r["timeline"]
            last = tl[-1]
            work_ratio = r["shape"][0] / ref["shape"][0]
            row = {
                "mode": mode, "ranks": r["ranks"], "workers": r["workers"], "shape": r["shape"],
                "run_id": r["id"], "runs_pooled": sum(1 for x in runs if x["ok"] and x["mode"] == mode
                                                      and x["ranks"] == r["ranks"]),
                "runs_quiet": quiet[r["ranks"]],
                "reference_ranks": ref["ranks"],
                "final_s_min": min(finals[r["ranks"]]), "final_s_max": max(finals[r["ranks"]]),
                "final_spread": (max(finals[r["ranks"]]) - min(finals[r["ranks"]])) / _final_time(r),
                "oversubscribed": r["oversubscribed"], "hostname": r["hostname"],
                "resolutions_total": r["resolutions_total"],
                "resolution_reached": last["resolution"], "exact": r["exact"],
                "start_s": r["start_s"], "elapsed_s": r["elapsed_s"], "wall_s": r.get("wall_s"),
                "first_s": _time(tl[0]), "final_s": _time(last),
                "first_bound": tl[0]["error_bound"], "first_error": tl[0].get("error_estimate"),
                "final_error": last.get("error_estimate"), "background_load": r.get("background_load"),
                "bytes_sent": sum(int(t["bytes_sent"]) for t in tl),
                "bytes_received": sum(int(t["bytes_received"]) for t in tl),
            }
            master = next((s for s in r["rank_stats"] if s.get("rank") == 0), None)
            if master and master.get("wall_s"):
                row["master_io_share"] = master["io_s"] / master["wall_s"]
            workers = [s for s in r["rank_stats"] if s.get("rank") != 0] or ([master] if master else [])
            if workers and all(s.get("wall_s") for s in workers):
                row["worker_compute_share"] = sum(s["compute_s"] for s in workers) / sum(s["wall_s"] for s in workers)
            for which, index in (("first", 0), ("final", -1)):
                t, t_ref = _time(tl[index]), _time(ref["timeline"][index])
                same = tl[index]["resolution"] == ref["timeline"][index]["resolution"]
                speedup = work_ratio * t_ref / t if (t and t_ref and same) else None
                row[f"speedup_{which}"] = speedup
                row[f"efficiency_{which}"] = speedup / (r["ranks"] / ref["ranks"]) if speedup else None
                row[f"worker_efficiency_{which}"] = speedup / (r["workers"] / ref["workers"]) if speedup else None
            rows.append(row)
    return rows


def _time(timeline_row):
    """The time a resolution took to reach: from the first job, else from the program start."""
    work = timeline_row.get("work_s")
    return work if work is not None else timeline_row.get("elapsed_s")


def _final_time(run_rec) -> float:
    return _time(run_rec["timeline"][-1]) if run_rec["timeline"] else math.inf


def write_report(report: dict, out: str) -> None:
    """scaling.json, scaling.csv, ranks.csv, the PNGs; then the table on stdout."""
    _write_json(report, os.path.join(out, "scaling.json"))
    _write_csv(os.path.join(out, "scaling.csv"), _timeline_rows(report["runs"]))
    _write_csv(os.path.join(out, "ranks.csv"), _rank_rows(report["runs"]))
    from mpilayer.jobs import scaling_plots
    pngs = scaling_plots.plot_all(report, out)
    print(format_table(report))
    print(f"wrote {', '.join(os.path.join(out, f) for f in ('scaling.csv', 'ranks.csv', 'scaling.json'))}")
    print(f"plots: {', '.join(pngs)}", flush=True)


def _timeline_rows(runs):
    for r in runs:
        base = _run_cols(r)
        if not r["timeline"]:
            yield {**base, **{c: None for c in TIMELINE_COLUMNS}}
        for t in r["timeline"]:
            yield {**base, **{c: t.get(c) for c in TIMELINE_COLUMNS}}


def _rank_rows(runs):
    for r in runs:
        base = _run_cols(r)
        for s in r.get("rank_stats") or ():
            yield {**base, **{c: s.get(c) for c in RANK_COLUMNS}}


def _run_cols(r) -> dict:
    m, k, n = r["shape"]
    return {"run_id": r["id"], "mode": r["mode"], "ranks": r["ranks"], "workers": r["workers"], "M": m, "K": k,
            "N": n, "repeat": r["repeat"], "source": r["source"], "selected": int(r["selected"]),
            "ok": int(r["ok"]), "oversubscribed": int(r["oversubscribed"]), "hostname": r["hostname"]}


def _write_csv(path, rows) -> None:
    rows = list(rows)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as fh:
        if rows:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _csv_cell(v) for k, v in row.items()})
    os.replace(tmp, path)


def _csv_cell(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return value


def _write_json(report, path) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(_jsonable(report), fh, indent=1, allow_nan=False)
        fh.write("\n")
    os.replace(tmp, path)


def format_table(report: dict) -> str:
    """The summary as an aligned text table (selected runs; times in seconds)."""
    problem = report["problem"]
    machines = report["machines"]
    lines = [f"{_problem_text(problem, report['modes'])}; {report['pick']} of the quiet runs per configuration; "
             f"{'; '.join(_machine_text(m) for m in machines)}",
             "times in s: start = program start to first job (start-up, MPI init, input read); "
             "t(res) = from first job to that resolution; total = program start to exact result; "
             "err = the run's estimate of the relative error |C_r - C|_F / |C|_F"]
    header = ("mode", "ranks", "workers", "M", "runs", "spread", "start", "t(res 0)", "err(res 0)", "t(final)", "total",
              "speedup1", "speedup", "eff/rank", "eff/worker", "MiB sent", "master io", "bg load")
    rows = []
    for s in report["summary"]:
        n_res = s["resolutions_total"]
        rows.append((
            s["mode"], str(s["ranks"]) + ("*" if s["oversubscribed"] else ""), str(s["workers"]), str(s["shape"][0]),
            f"{s['runs_quiet']}/{s['runs_pooled']}", _pct(s["final_spread"]), _f(s["start_s"]), _f(s["first_s"]),
            _f(s.get("first_error"), 4),
            _f(s["final_s"]) + ("" if s["exact"] else f" (resolution {s['resolution_reached']} of 0..{n_res - 1}, "
                                                      f"err {_f(s.get('final_error'), 4)})"),
            _f(s["elapsed_s"]), _f(s["speedup_first"], 2), _f(s["speedup_final"], 2),
            _pct(s["efficiency_final"]), _pct(s["worker_efficiency_final"]), _f(s["bytes_sent"] / 2**20, 1),
            _pct(s.get("master_io_share")), _pct(s.get("background_load"))))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    lines += [fmt(header), fmt(tuple("-" * w for w in widths))] + [fmt(row) for row in rows]
    for r in report["runs"]:
        if not r["ok"]:
            lines.append(f"FAILED: {r['mode']} {r['ranks']} rank(s), repeat {r['repeat'] + 1}: "
                         f"{one_line(r.get('error', '?'))[:200]}")
    if any(s["oversubscribed"] for s in report["summary"]):
        lines.append("* more ranks than available CPUs: oversubscribed, the ranks time-share cores")
    lines.append(f"runs = quiet/all runs (quiet: bg load <= {100 * report.get('max_background', 1.0):.0f}%; only "
                 "quiet runs are chosen unless none is); spread = (slowest - fastest) / reported t(final) over "
                 "the runs chosen from; "
                 "speedup = (M/M_ref) x t_ref / t against the reference (1 rank if swept, else the fewest ranks); "
                 "speedup1 at the first resolution (0); eff/rank = speedup / (ranks/ref); eff/worker = speedup / "
                 "(workers/ref); master io = rank 0's I/O time (reading+encoding blocks, writing tiles, "
                 "publishing) / its wall time; bg load = CPU used by other processes on this host during the "
                 "run / (wall x CPUs), '-' when the ranks may run on other hosts")
    return "\n".join(lines)


def _f(value, digits=3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _problem_text(problem, modes=("strong",)) -> str:
    m, k, n = problem["shape"]
    comps = problem.get("components_used") or problem.get("component_bits")
    if comps is None:
        comps = "matmul's default"
    elif isinstance(comps, list):
        comps = "+".join(map(str, comps))
    elif not isinstance(comps, str):
        comps = f"{comps}-bit"
    tile = problem.get("tile_used") or problem.get("tile")
    if tile and isinstance(tile[0], list):
        tile_text = ", tiles " + " / ".join("x".join(map(str, t)) for t in tile) + " (by run)"
    else:
        tile_text = ", tile " + "x".join(map(str, tile)) if tile else ""
    weak = f"; weak: M = {m} x workers" if "weak" in modes else ""
    return (f"A {m}x{k} @ B {k}x{n} {problem['dtype']} ({problem['bits']}-bit, components {comps}"
            f"{tile_text}{weak})")


def _machine_text(m) -> str:
    return f"{m['hostname']} ({m['cpus_available']} CPUs, {m['cpu_model']}), {m['launcher']}, {m['date']}"


def _machine_key(m):
    return (m.get("hostname"), m.get("cpu_model"), m.get("cpus_available"), m.get("launcher"))


def _unique(items, key):
    seen, out = set(), []
    for item in items:
        if key(item) not in seen:
            seen.add(key(item))
            out.append(item)
    return out


def _run_line(r) -> str:
    m, k, n = r["shape"]
    head = f"{r['mode']:<6} {r['ranks']} rank(s), {m}x{k}x{n}" + (f", repeat {r['repeat'] + 1}: " if r["repeat"] >= 0 else ": ")
    if not r["ok"]:
        return head + "FAILED " + one_line(r.get("error", ""))[:200]
    times = ", ".join(f"res {t['resolution']} {_f(_time(t))} s" for t in r["timeline"])
    bg = f", background load {_pct(r['background_load'])}" if r.get("background_load") is not None else ""
    return head + f"{times} (total {_f(r['elapsed_s'])} s, start {_f(r['start_s'])} s{bg})"


# ---------------------------------------------------------------------------- merge

def merge(dirs: list, args) -> int:
    """Pool the scaling.json of several sweeps of one problem into one report in ``-o``."""
    reports = []
    for d in dirs:
        path = d if d.endswith(".json") else os.path.join(d, "scaling.json")
        try:
            with open(path) as fh:
                report = json.load(fh)
        except OSError as err:
            raise InputError(f"cannot read {path}: {one_line(err.strerror or err)}") from None
        except ValueError as err:
            raise InputError(f"{path}: not JSON ({one_line(err)})") from None
        if not isinstance(report, dict) or report.get("format") != FORMAT:
            raise InputError(f"{path}: not an mpilayer scaling report")
        reports.append((path, report))
    base = reports[0][1]["problem"]
    for path, report in reports[1:]:
        for key in ("shape", "dtype", "bits", "component_bits", "scale", "tile"):
            if report["problem"].get(key) != base.get(key):
                raise InputError(f"cannot merge {path}: its problem differs in {key} "
                                 f"({report['problem'].get(key)} vs {base.get(key)} in {reports[0][0]})")
    out = _prepare_out(args.output, args.force)
    sources, runs = [], []
    for path, report in reports:
        offset = len(sources)
        sources.extend(report["sources"])
        for run_rec in report["runs"]:
            runs.append({**run_rec, "source": offset + run_rec.get("source", 0)})
    if not args.quiet:
        print(f"mpilayer scaling merge: {len(runs)} run(s) from {len(reports)} report(s): "
              f"{', '.join(p for p, _ in reports)}", flush=True)
    write_report(build_report(sources, runs, args.pick, args.max_background), out)
    return 0


# ---------------------------------------------------------------------------- helpers

def _prepare_out(out: str, force: bool) -> str:
    out = os.path.abspath(out)
    if os.path.exists(os.path.join(out, "scaling.json")) and not force:
        raise OutputError(f"{out} already holds a scaling report; pass --force to overwrite it")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create {out}: {one_line(err.strerror or err)}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {out}")
    return out


def _rows(table) -> list:
    if table is None:
        return []
    names = table.dtype.names or ()
    return [{name: _jsonable(row[name]) for name in names} for row in table]


def _listify(value):
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return int(value)


def _jsonable(value):
    """Plain JSON values (numpy scalars -> Python, tuples -> lists, inf/nan -> None)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _jsonable(value.tolist())
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _tail(text: str, lines: int = 3) -> str:
    kept = [line for line in (text or "").strip().splitlines() if line.strip()]
    return " | ".join(kept[-lines:])


def _remove(path) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
