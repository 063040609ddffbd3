"""``mpilayer bench vs-dask``: float32 HDF5 matrices, end to end, against Dask.

Generates float32 Gaussian A, B (n x n) in HDF5 and times whole processes, alternating and
keeping the best of R runs of each, after one untimed run of each command that leaves the
Python modules' bytecode in the scratch directory (``PYTHONPYCACHEPREFIX``), so that no run
compiles modules, as with an installed package -- whatever ``PYTHONDONTWRITEBYTECODE`` says
(with it, an editable install compiles every mpilayer module on every rank of every run:
~0.1-0.2 s of CPU per process):

- Dask: float32, 2 threads, ``da.from_array`` on the h5py datasets (chunks of n/2 x n/2 by
  default), ``A @ B``, ``da.to_hdf5``;
- ``mpiexec -n 3 mpilayer matmul --bits 8`` (default schedule, every resolution published);
- the same with ``--bits 16``;
- ``--bits 8 --deadline 0.3 x`` the best Dask time measured so far in the run.

Prints one table: wall time, ratio to Dask, resolutions reached, the relative Frobenius error
of the result against the float64 product of the same float32 inputs (Dask's float32 result
included), and where mpilayer's time went (from its result file): the set-up (interpreter,
imports, MPI start-up, input checks and the preparation pass over the inputs) and the time of
the first resolution, both from the start of rank 0's process.
"""
from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

DASK_SCRIPT = """
import sys
import dask, dask.array as da, h5py
a_path, b_path, out, chunk = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
with h5py.File(a_path, "r") as fa, h5py.File(b_path, "r") as fb:
    A = da.from_array(fa["A"], chunks=(chunk, chunk))
    B = da.from_array(fb["B"], chunks=(chunk, chunk))
    with dask.config.set(scheduler="threads", num_workers=2):
        da.to_hdf5(out, "/C", A @ B)
"""


def dask_missing() -> str | None:
    """A one-line message if dask.array cannot be imported, else None."""
    try:
        import dask.array  # noqa: F401
    except ImportError as err:
        return (f"mpilayer bench vs-dask: needs dask[array] ({err}); install it with "
                f"`{sys.executable} -m pip install 'dask[array]'` (the extra of `pip install 'mpilayer[bench]'`)")
    return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mpiexec() -> str:
    found = os.environ.get("MPIEXEC") or shutil.which("mpiexec")
    if not found:
        raise SystemExit("mpilayer bench vs-dask: no mpiexec on PATH (set MPIEXEC)")
    return found


def write_inputs(work: str, n: int, seed: int) -> tuple:
    import h5py

    rng = np.random.default_rng(seed)
    paths = []
    for name in ("A", "B"):
        path = os.path.join(work, f"{name.lower()}.h5")
        with h5py.File(path, "w") as f:
            for i0 in range(0, n, 1024):  # row blocks: no float64 temporary of the whole matrix
                if i0 == 0:
                    ds = f.create_dataset(name, shape=(n, n), dtype=np.float32)
                rows = min(1024, n - i0)
                ds[i0:i0 + rows] = rng.standard_normal((rows, n), dtype=np.float32)
        paths.append(path)
    return tuple(paths)


def _timed(cmd, env=None, allowed=(0,)) -> tuple:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode not in allowed:
        raise SystemExit(f"mpilayer bench vs-dask: run failed (status {proc.returncode}): {' '.join(cmd)}\n"
                         f"{proc.stdout}{proc.stderr}")
    return wall, proc


def relative_error(path: str, dataset: str, reference: np.ndarray) -> float:
    import h5py

    num = 0.0
    with h5py.File(path, "r") as f:
        c = f[dataset]
        for i0 in range(0, reference.shape[0], 512):
            d = c[i0:i0 + 512].astype(np.float64) - reference[i0:i0 + 512]
            num += float(np.einsum("ij,ij->", d, d))
    return (num / float(np.einsum("ij,ij->", reference, reference))) ** 0.5


def run(args) -> int:
    msg = dask_missing()
    if msg:
        print(msg, file=sys.stderr)
        return 2
    import h5py

    from mpilayer.io.run_guard import benchmark_directory

    n, repeat = args.n, args.repeat
    chunk = args.dask_chunk or max(1, n // 2)
    work = benchmark_directory("mpilayer-vs-dask-", args.tmpdir)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPYCACHEPREFIX": os.path.join(work, "pycache")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    try:
        a_path, b_path = write_inputs(work, n, args.seed)
        out = {name: os.path.join(work, f"c_{name}.h5") for name in ("dask", "b8", "b16", "deadline")}
        mpi = [_mpiexec(), "-n", "3", sys.executable, "-m", "mpilayer", "matmul", f"{a_path}:/A", f"{b_path}:/B",
               "--force", "-q"]
        configs = [("mpilayer --bits 8", "b8", ["--bits", "8"]), ("mpilayer --bits 16", "b16", ["--bits", "16"])]
        with h5py.File(a_path, "r") as fa, h5py.File(b_path, "r") as fb:  # the reference, not timed
            ref = fa["A"][...].astype(np.float64) @ fb["B"][...].astype(np.float64)
        runs = {}  # name -> [(wall, reached, relative error, set-up s, first resolution s), ...]

        def record(name, wall, path, dataset="C"):
            info = _summary(path) if name != "dask" else {"resolution": 0, "reached": "-", "setup_s": None,
                                                         "first_s": None}
            err = relative_error(path, dataset, ref) if info["resolution"] >= 0 else float("nan")
            runs.setdefault(name, []).append((wall, info["reached"], err, info["setup_s"], info["first_s"]))

        dask_cmd = [sys.executable, "-c", DASK_SCRIPT, a_path, b_path, out["dask"], str(chunk)]
        _timed(dask_cmd, env)  # untimed: bytecode of every module either command imports
        for _, name, extra in configs:
            _timed(mpi + ["-o", out[name], *extra], env)
        deadlines = []
        for _ in range(repeat):  # alternate, so that drifting machine load hits every run alike
            if os.path.exists(out["dask"]):
                os.remove(out["dask"])
            wall, _ = _timed(dask_cmd, env)
            record("dask", wall, out["dask"])
            for label, name, extra in configs:
                wall, _ = _timed(mpi + ["-o", out[name], *extra], env)
                record(name, wall, out[name])
            deadline = args.deadline_fraction * min(run[0] for run in runs["dask"])
            deadlines.append(deadline)
            wall, _ = _timed(mpi + ["-o", out["deadline"], "--bits", "8", "--deadline", f"{deadline:.3f}"], env,
                             allowed=(0, 3))
            record("deadline", wall, out["deadline"])
        t_dask = min(run[0] for run in runs["dask"])
        print(f"mpilayer bench vs-dask: float32 Gaussian A, B {n}x{n} in HDF5; whole processes, best of {repeat}, "
              f"alternating, bytecode cached; {os.cpu_count()} cores, {cpu_name()}; "
              f"{datetime.date.today().isoformat()}")
        print(f"{'run':<40} {'wall s':>7} {'/ Dask':>7} {'resolutions':>12} {'rel. error vs f64 A.B':>22} "
              f"{'set-up s':>9} {'res. 0 s':>9}")
        rows = [(f"Dask float32, 2 threads, chunks {chunk}", "dask")] + [(label, name) for label, name, _ in configs]
        rows.append((f"mpilayer --bits 8 --deadline {args.deadline_fraction:g}x Dask", "deadline"))
        for label, name in rows:
            wall, reached, err, setup, first = min(runs[name], key=lambda run: run[0])
            if name == "deadline":  # every run's outcome: a deadline run is only as good as its worst
                reached = ",".join(sorted({run[1] for run in runs[name]}))
                err = max(run[2] if run[2] == run[2] else float("inf") for run in runs[name])
            print(f"{label:<40} {wall:7.3f} {wall / t_dask:7.2f} {reached:>12} {err:22.3e} "
                  f"{_seconds(setup):>9} {_seconds(first):>9}")
        print(f"deadlines used (s): {', '.join(f'{d:.3f}' for d in deadlines)}; deadline row: best wall, "
              f"resolutions reached by any run, largest error over the runs (inf: a run reached none); set-up "
              f"and res. 0: of the best run, seconds from rank 0's start (set-up: start-up, checks, preparation)")
        print("all walls (s): " + "; ".join(f"{name} " + " ".join(f"{run[0]:.2f}" for run in v)
                                            for name, v in runs.items()))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _seconds(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _summary(path: str) -> dict:
    """Resolution reached, set-up seconds and the first resolution's time, from a result file."""
    import h5py

    with h5py.File(path, "r") as f:
        attrs = f["C"].attrs
        res, total = int(attrs["resolution"]), int(attrs["resolutions_total"])
        setup = float(attrs["setup_s"]) if "setup_s" in attrs else None
        timeline = f["timeline"][...] if "timeline" in f else []
    first = next((float(row["elapsed_s"]) for row in timeline if row["resolution"] == 0), None)
    return {"resolution": res, "total": total, "reached": f"{res} of 0..{total - 1}" if res >= 0 else "none",
            "setup_s": setup, "first_s": first}
