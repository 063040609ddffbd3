"""slurm/*.sbatch on a real, local Slurm cluster (tests/slurm_cluster.py).

One session-scoped cluster (munged + slurmctld + two slurmd, virtual nodes
node1/node2 on this host) serves every test. It needs root; Debian's Slurm
and MUNGE packages are apt-installed when missing. The tests skip only when
the machine cannot run Slurm at all, and never when CI=true.

* harness tests: a stand-in MPI program under srun and mpiexec.
* plumbing tests: slurm/matmul.sbatch with a stand-in `mpilayer` (a fake venv,
  tests/slurm_cluster.py:make_stub_venv) - arguments, launcher, threads, and
  the deadline derived from the time limit, independent of the real CLI.
* product tests: slurm/matmul.sbatch running the real `mpilayer matmul`; they
  fail (not skip) while the CLI is not importable.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

try:
    from . import slurm_cluster as sc
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    import slurm_cluster as sc

ROOT = Path(__file__).resolve().parents[1]
MATMUL_SBATCH = ROOT / "slurm" / "matmul.sbatch"
IN_CI = os.environ.get("CI", "").lower() == "true"

pytestmark = pytest.mark.mpi


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def slurm():
    cluster = sc.LocalSlurmCluster()
    try:
        cluster.start()
    except sc.SlurmUnavailable as e:
        cluster.cleanup()
        if IN_CI:
            pytest.fail(f"CI=true but this machine cannot run a local Slurm: {e}")
        pytest.skip(f"this machine cannot run a local Slurm: {e}")
    except BaseException:
        cluster.cleanup()
        raise
    try:
        yield cluster
    finally:
        cluster.cleanup()


def job_env(cluster, **extra):
    """Job environment: our cluster, the Python running these tests (its venv, or its bin/
    first on PATH), and no MPILAYER_* settings from the caller's shell."""
    env = {k: v for k, v in cluster.env().items() if not k.startswith("MPILAYER_")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    env["MPILAYER_VENV"] = sys.prefix if sys.prefix != sys.base_prefix else "none"
    env.update(extra)
    return env


def run_job(cluster, *args, cwd, env, expect="COMPLETED", timeout=120):
    """Submit, wait (0.2 s polling), check the final state; returns (record, output text)."""
    info = cluster.submit_and_wait(*args, cwd=cwd, env=env, timeout=timeout)
    out_path = info.get("StdOut", "")
    try:
        output = Path(out_path).read_text(errors="replace")
    except OSError as e:
        output = f"<cannot read job output {out_path!r}: {e}>"
    if info.get("JobState") not in (expect if isinstance(expect, tuple) else (expect,)):
        pytest.fail(f"job {info.get('JobId')} ended {info.get('JobState')} (exit {info.get('ExitCode')}), "
                    f"expected {expect}\n--- job output {out_path}:\n{output}\n"
                    + cluster.diagnostics())
    return info, output


# ------------------------------------------------------------ harness tests
PROBE = """\
import json, os, sys
from mpi4py import MPI
comm = MPI.COMM_WORLD
me = {k: os.environ.get(k) for k in ("SLURMD_NODENAME", "SLURM_NODEID")}
me["rank"] = comm.rank
everyone = comm.gather(me, root=0)
if comm.rank == 0:
    print("PROBE", sys.argv[1], json.dumps({"size": comm.size, "ranks": everyone}), flush=True)
"""


def _probe_results(output: str) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for line in output.splitlines():
        if line.startswith("PROBE "):
            _, launcher, payload = line.split(" ", 2)
            found.setdefault(launcher, []).append(json.loads(payload))
    return found


def test_cluster_nodes_idle_and_limits_enforced(slurm, tmp_path):
    assert slurm.node_states() == {n: "idle" for n in slurm.nodes}
    # EnforcePartLimits=ALL: an impossible request is refused at submission
    # instead of pending forever (which would hang `sbatch --wait`).
    script = tmp_path / "noop.sh"
    script.write_text("#!/bin/bash\ntrue\n")
    proc = slurm.run("sbatch", "--parsable", "-n", str(len(slurm.nodes) * slurm.cpus + 1), str(script),
                     check=False, cwd=tmp_path)
    assert proc.returncode != 0, f"oversized job was accepted: {proc.stdout}"


def test_standin_mpi_job_spans_both_nodes(slurm, tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    mpiexec = Path(sys.executable).parent / "mpiexec"
    mpiexec = str(mpiexec) if mpiexec.exists() else "mpiexec"
    script = tmp_path / "standin.sh"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        set -euo pipefail
        srun --mpi=pmi2 "{sys.executable}" probe.py srun
        "{mpiexec}" -n "$SLURM_NTASKS" "{sys.executable}" probe.py mpiexec
        """))
    _, output = run_job(slurm, "-N", "2", "-n", "2", "--output=standin-%j.out", str(script),
                        cwd=tmp_path, env=job_env(slurm))
    with slurm.explain_failure():
        results = _probe_results(output)
        assert set(results) == {"srun", "mpiexec"}, output
        for launcher, worlds in results.items():
            assert len(worlds) == 1, f"{launcher}: {len(worlds)} worlds instead of one:\n{output}"
            world = worlds[0]
            assert world["size"] == 2, (launcher, world)
            assert sorted(r["SLURMD_NODENAME"] for r in world["ranks"]) == ["node1", "node2"], (launcher, world)
            assert sorted(r["SLURM_NODEID"] for r in world["ranks"]) == ["0", "1"], (launcher, world)


# ----------------------------------------------------------- plumbing tests
DEADLINE_LINE = re.compile(r"time left (\d+) s - margin (\d+) s .*-> --deadline (\d+)")


@pytest.fixture(scope="module")
def stub_venv(tmp_path_factory):
    return sc.make_stub_venv(tmp_path_factory.mktemp("stub") / "venv")


def _stub_run(output: str) -> dict:
    runs = sc.parse_stub_output(output)
    assert len(runs) == 1, f"expected one stand-in run, got {len(runs)}:\n{output}"
    return runs[0]


@pytest.mark.parametrize("launcher", ["auto", "srun", "mpiexec"])
def test_matmul_sbatch_plumbing(slurm, stub_venv, tmp_path, launcher):
    """Arguments pass through unchanged; -N 2 -n 3 -c ... gives one world over both nodes."""
    args = ["a b.h5:/A", "b.h5:/B", "-o", "c.h5", "--deadline", "7.5", "--bits", "8"]
    info, output = run_job(slurm, "-N", "2", "-n", "2", "-c", "2", str(MATMUL_SBATCH), *args,
                           cwd=tmp_path, env=job_env(slurm, MPILAYER_VENV=str(stub_venv), MPILAYER_LAUNCHER=launcher))
    with slurm.explain_failure():
        # the script's #SBATCH defaults: job name and --output=%x-%j.out in the submit directory
        assert info["JobName"] == "mpilayer-matmul"
        assert info["StdOut"] == str(tmp_path / f"mpilayer-matmul-{info['JobId']}.out")
        run = _stub_run(output)
        assert run["argv"] == ["matmul", *args]
        assert run["size"] == 2
        assert sorted(r["SLURMD_NODENAME"] for r in run["ranks"]) == ["node1", "node2"]
        for r in run["ranks"]:
            assert r["OMP_NUM_THREADS"] == r["OPENBLAS_NUM_THREADS"] == r["MKL_NUM_THREADS"] == "2"
            assert r["VIRTUAL_ENV"] == str(stub_venv)
        expected = "srun" if launcher == "srun" else "mpiexec"  # auto: mpiexec across nodes
        launch_line = next(line for line in output.splitlines() if line.startswith("mpilayer-slurm: launcher: "))
        assert launch_line.split()[2].endswith(expected), output
        assert "deadline: given on the command line" in output


def test_matmul_sbatch_from_project_root_three_ranks(slurm, stub_venv, tmp_path):
    """Submitted as `slurm/matmul.sbatch` from the checkout; default threads = 1; 3 ranks on 2 nodes."""
    out = tmp_path / "job-%j.out"
    _, output = run_job(slurm, "-N", "2", "-n", "3", f"--output={out}", "--time=5", "slurm/matmul.sbatch",
                        "x.h5:/A", cwd=ROOT, env=job_env(slurm, MPILAYER_VENV=str(stub_venv)))
    with slurm.explain_failure():
        run = _stub_run(output)
        assert run["size"] == 3
        assert sorted(r["SLURMD_NODENAME"] for r in run["ranks"]) == ["node1", "node1", "node2"]
        assert all(r["OMP_NUM_THREADS"] == "1" for r in run["ranks"])
        # 5 min limit, default margin max(30 s, 10%) = 30 s
        left, margin, deadline = map(int, DEADLINE_LINE.search(output).groups())
        assert 290 <= left <= 300 and margin == 30 and deadline == left - margin
        assert run["argv"] == ["matmul", "--deadline", str(deadline), "x.h5:/A"]


@pytest.mark.parametrize("alloc, launcher, nodes", [
    (["-N", "2"], "auto", ["node1", "node2"]),  # no -n: SLURM_NTASKS unset, one task per node
    (["-N", "2", "--ntasks-per-node=2"], "mpiexec", ["node1", "node1", "node2", "node2"]),
], ids=["N2-auto", "N2-per-node2-mpiexec"])
def test_matmul_sbatch_rank_count_from_nodes(slurm, stub_venv, tmp_path, alloc, launcher, nodes):
    _, output = run_job(slurm, *alloc, str(MATMUL_SBATCH), "a.h5:/A", "--deadline", "1", cwd=tmp_path,
                        env=job_env(slurm, MPILAYER_VENV=str(stub_venv), MPILAYER_LAUNCHER=launcher))
    with slurm.explain_failure():
        run = _stub_run(output)
        assert run["size"] == len(nodes)
        assert sorted(r["SLURMD_NODENAME"] for r in run["ranks"]) == nodes


@pytest.mark.parametrize("margin_spec, margin_of", [
    (None, lambda left: max(30, left // 10)),
    ("50", lambda left: 50),
    ("25%", lambda left: left * 25 // 100),
], ids=["default", "seconds", "percent"])
def test_derived_deadline_stub(slurm, stub_venv, tmp_path, margin_spec, margin_of):
    extra = {"MPILAYER_VENV": str(stub_venv), "MPILAYER_LAUNCHER": "mpiexec"}
    if margin_spec is not None:
        extra["MPILAYER_DEADLINE_MARGIN"] = margin_spec
    _, output = run_job(slurm, "-n", "1", "--time=2", str(MATMUL_SBATCH), "a.h5:/A", "b.h5:/B", "-o", "c.h5",
                        cwd=tmp_path, env=job_env(slurm, **extra))
    with slurm.explain_failure():
        m = DEADLINE_LINE.search(output)
        assert m, output
        left, margin, deadline = map(int, m.groups())
        assert 110 <= left <= 120
        assert margin == margin_of(left)
        assert deadline == left - margin
        run = _stub_run(output)
        assert run["argv"] == ["matmul", "--deadline", str(deadline), "a.h5:/A", "b.h5:/B", "-o", "c.h5"]


SCALING_SBATCH = ROOT / "slurm" / "scaling.sbatch"


@pytest.mark.parametrize("args, launcher, expected", [
    (["--ranks", "1,2,3", "-o", "rep"], "auto", ["--launcher", "mpiexec", "--ranks", "1,2,3", "-o", "rep"]),
    (["--ranks", "2", "--launcher", "mpiexec"], "auto", ["--ranks", "2", "--launcher", "mpiexec"]),
    (["merge", "r1", "r2", "-o", "rep"], "srun", ["merge", "r1", "r2", "-o", "rep"]),
], ids=["auto-two-nodes", "own-launcher", "merge"])
def test_scaling_sbatch_runs_the_driver_once(slurm, stub_venv, tmp_path, args, launcher, expected):
    """`mpilayer scaling` starts its own MPI runs: the script runs it once, passing the launcher."""
    info, output = run_job(slurm, "-N", "2", "-n", "3", str(SCALING_SBATCH), *args, cwd=tmp_path,
                           env=job_env(slurm, MPILAYER_VENV=str(stub_venv), MPILAYER_LAUNCHER=launcher))
    with slurm.explain_failure():
        assert info["JobName"] == "mpilayer-scaling"
        run = _stub_run(output)
        assert run["size"] == 1
        assert run["argv"] == ["scaling", *expected]
        assert "--deadline" not in run["argv"]


# ------------------------------------------------------ real product tests
def _cli_env() -> dict[str, str] | None:
    """Environment in which `python -m mpilayer` works, or None."""
    for extra in ({}, {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}):
        env = dict(os.environ, **extra)
        proc = subprocess.run([sys.executable, "-c", "import mpilayer.cli"], env=env, cwd="/",
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode == 0:
            return env
    return None


@pytest.fixture(scope="module")
def cli_env():
    env = _cli_env()
    if env is None:
        pytest.fail("the mpilayer CLI is not importable (`import mpilayer.cli` failed with this Python, "
                    f"{sys.executable}, also with PYTHONPATH={ROOT}); these tests need it")
    return env


def make_inputs(cli_env, workdir: Path, shape, seed=1, dtype="int8"):
    cmd = [sys.executable, "-m", "mpilayer", "example", "-o", "A.h5", "B.h5",
           "--shape", ",".join(map(str, shape)), "--dtype", dtype, "--seed", str(seed)]
    proc = subprocess.run(cmd, cwd=workdir, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}"
    import h5py
    with h5py.File(workdir / "A.h5", "r") as fa, h5py.File(workdir / "B.h5", "r") as fb:
        a, b = fa["/A"][...], fb["/B"][...]
    assert a.shape == tuple(shape[:2]) and b.shape == tuple(shape[1:])
    return a, b


def read_c(path: Path):
    import h5py
    with h5py.File(path, "r") as f:
        c = f["/C"][...]
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f["/C"].attrs.items()}
    return c, attrs


def _n_resolutions(attrs):
    return int(attrs["resolutions_total"] if "resolutions_total" in attrs else attrs["n_resolutions"])


def exact_product(a, b):
    """A @ B exactly, fast: float64 BLAS is exact while every partial sum stays below 2**53."""
    assert np.issubdtype(a.dtype, np.integer) and np.issubdtype(b.dtype, np.integer)
    worst = float(np.abs(a.astype(np.float64)).max()) * float(np.abs(b.astype(np.float64)).max()) * a.shape[1]
    if worst < 2.0**53:
        return (a.astype(np.float64) @ b.astype(np.float64)).astype(np.int64)
    return a.astype(np.int64) @ b.astype(np.int64)


def check_exact(c, attrs, a, b, output):
    exact = exact_product(a, b)
    assert c.shape == exact.shape
    assert np.array_equal(c, exact), f"C differs from A@B in {np.count_nonzero(c != exact)} entries"
    assert bool(attrs["exact"]) is True, attrs
    assert int(attrs["resolution"]) == _n_resolutions(attrs) - 1, attrs
    assert attrs.get("stopped_by") == "complete", attrs


@pytest.mark.parametrize("launcher", ["auto", "mpiexec"])
def test_matmul_exact_two_ranks(slurm, cli_env, tmp_path, launcher):
    a, b = make_inputs(cli_env, tmp_path, (96, 80, 64))
    _, output = run_job(slurm, "-N", "1", "-n", "2", "--time=5", str(MATMUL_SBATCH), "A.h5:/A", "B.h5:/B",
                        "-o", "C.h5", cwd=tmp_path, env=job_env(slurm, MPILAYER_LAUNCHER=launcher))
    with slurm.explain_failure():
        c, attrs = read_c(tmp_path / "C.h5")
        check_exact(c, attrs, a, b, output)
        if launcher == "auto":  # one node: the pmi2 probe decides, and srun works here
            assert "probe saw one world of 2 ranks -> srun" in output, output


def test_matmul_exact_three_ranks_two_nodes(slurm, cli_env, tmp_path):
    a, b = make_inputs(cli_env, tmp_path, (96, 80, 64), seed=2)
    _, output = run_job(slurm, "-N", "2", "-n", "3", "--time=5", str(MATMUL_SBATCH), "A.h5:/A", "B.h5:/B",
                        "-o", "C.h5", "--bits", "8", cwd=tmp_path, env=job_env(slurm))
    with slurm.explain_failure():
        c, attrs = read_c(tmp_path / "C.h5")
        check_exact(c, attrs, a, b, output)


# 8 one-bit resolutions of a 1536^3 int8 product take ~0.6 s (first) to ~1.2 s (exact)
# on 2 ranks of a 2-core box, reading inputs included; the deadline aims in between
# and is moved (from what the previous try reached) if a slower/faster machine misses: after
# a complete try, to the middle of its first and last resolutions' times.
DEADLINE_SHAPE = (1536, 1536, 1536)
DEADLINE_COMPONENTS = "1"  # W-bit components: 8 resolutions for 8 bits
DEADLINE_TRIES = (2.0,)


def read_tiles(path: Path):
    import h5py
    with h5py.File(path, "r") as f:
        if "tile_error_bound" not in f or "tile_shape" not in f["/C"].attrs:
            return None
        return f["tile_resolution"][...], f["tile_error_bound"][...], tuple(int(t) for t in f["/C"].attrs["tile_shape"])


def _resolution_times(path: Path) -> list:
    """Seconds from the run's start at which each resolution was published (its /timeline)."""
    import h5py
    with h5py.File(path, "r") as f:
        return [float(t) for t in f["timeline"]["elapsed_s"]] if "timeline" in f else []


def test_matmul_deadline_saves_a_lower_resolution(slurm, cli_env, tmp_path):
    a, b = make_inputs(cli_env, tmp_path, DEADLINE_SHAPE, seed=3)
    exact = exact_product(a, b)
    deadline, history = DEADLINE_TRIES[0], []
    for attempt in range(4):
        c_path = tmp_path / f"C{attempt}.h5"
        _, output = run_job(slurm, "-n", "2", "--time=5", str(MATMUL_SBATCH), "A.h5:/A", "B.h5:/B",
                            "-o", c_path.name, "--component-bits", DEADLINE_COMPONENTS, "--deadline", str(deadline),
                            cwd=tmp_path, env=job_env(slurm),
                            expect=("COMPLETED", "FAILED"))  # FAILED: exit 3, no resolution by the deadline
        c, attrs = read_c(c_path)
        history.append((deadline, attrs.get("resolution"), attrs.get("stopped_by"), attrs.get("elapsed_s")))
        if attrs["stopped_by"] == "deadline" and int(attrs["resolution"]) >= 0:
            break
        # Missed the window on this machine: before the first resolution, or all of them done.
        if int(attrs["resolution"]) < 0:
            deadline = round(deadline * 1.5, 3)
        else:
            times = _resolution_times(c_path)
            deadline = round((times[0] + times[-1]) / 2, 3) if len(times) > 1 else round(deadline / 2, 3)
    print(f"deadline tries (deadline, resolution, stopped_by, elapsed_s): {history}")
    with slurm.explain_failure():
        assert "deadline: given on the command line" in output
        assert attrs["stopped_by"] == "deadline" and int(attrs["resolution"]) >= 0, \
            f"no try stopped by the deadline after a first resolution: (deadline, resolution, stopped_by, elapsed) = {history}"
        n_res = _n_resolutions(attrs)
        assert 0 <= int(attrs["resolution"]) < n_res - 1 and not bool(attrs["exact"]), attrs
        assert float(attrs["deadline_s"]) == pytest.approx(deadline)
        assert c.shape == exact.shape
        err = np.abs(c.astype(np.float64) - exact.astype(np.float64))
        bound = float(attrs["error_bound"])
        assert 0 < bound < np.inf, attrs
        assert err.max() <= bound, f"max |C - exact| = {err.max()} > error_bound {bound}"
        assert err.max() > 0  # it really is a lower resolution
        tiles = read_tiles(c_path)
        if tiles is not None:  # per-tile certificates, where the result file has them
            tile_res, tile_bound, (th, tw) = tiles
            assert tile_res.min() == int(attrs["resolution"]) and tile_bound.max() == bound
            for i in range(tile_res.shape[0]):
                for j in range(tile_res.shape[1]):
                    e = err[i * th:(i + 1) * th, j * tw:(j + 1) * tw].max()
                    assert e <= tile_bound[i, j], (i, j, e, tile_bound[i, j])
                    if tile_res[i, j] == n_res - 1:
                        assert e == 0 and tile_bound[i, j] == 0, (i, j, e, tile_bound[i, j])


def test_matmul_derived_deadline(slurm, cli_env, tmp_path):
    """No --deadline: the job passes time left minus MPILAYER_DEADLINE_MARGIN, and the CLI records it."""
    a, b = make_inputs(cli_env, tmp_path, (96, 80, 64), seed=4)
    _, output = run_job(slurm, "-n", "2", "--time=1", str(MATMUL_SBATCH), "A.h5:/A", "B.h5:/B", "-o", "C.h5",
                        cwd=tmp_path, env=job_env(slurm, MPILAYER_DEADLINE_MARGIN="40"))
    with slurm.explain_failure():
        m = DEADLINE_LINE.search(output)
        assert m, output
        left, margin, deadline = map(int, m.groups())
        assert 45 <= left <= 60 and margin == 40 and deadline == left - margin
        assert re.search(rf"matmul --deadline {deadline} A\.h5:/A", output), output
        c, attrs = read_c(tmp_path / "C.h5")
        assert float(attrs["deadline_s"]) == pytest.approx(deadline)
        check_exact(c, attrs, a, b, output)


def test_scaling_sbatch_real_sweep_two_nodes(slurm, cli_env, tmp_path):
    """The real `mpilayer scaling` through slurm/scaling.sbatch: one sweep over 1 and 3 ranks
    spread over both nodes, report files written once."""
    _, output = run_job(slurm, "-N", "2", "-n", "3", "--time=5", str(SCALING_SBATCH), "--ranks", "1,3",
                        "--shape", "96,128,64", "--warmup", "0", "-o", "report",
                        cwd=tmp_path, env=job_env(slurm), timeout=240)
    with slurm.explain_failure():
        import csv
        rows = list(csv.DictReader(open(tmp_path / "report" / "scaling.csv")))
        # one run per rank count, two resolutions each (default split 1+7): the sweep ran once,
        # not once per task
        assert sorted(row["ranks"] for row in rows) == ["1", "1", "3", "3"], rows
        assert (tmp_path / "report" / "time_to_resolution.png").stat().st_size > 1000


# --------------------------------------------- stop signals (issue 12: nothing lost)
SLOW_ARGS = ("--component-bits", "1", "--tile", "32,32", "--bits", "8")


def _check_signal_stop(tmp_path: Path, a, b, output: str, c_name="C.h5"):
    """The run stopped by a signal: every tile at its best resolution, no scratch, no lock."""
    import h5py
    import mpilayer
    expected = {r.index: r.estimate for r in mpilayer.layered_matmul(a, b, component_bits=1)}
    with h5py.File(tmp_path / c_name, "r") as f:
        c, res, attrs = f["C"][...], f["tile_resolution"][...], dict(f["C"].attrs)
    assert attrs["stopped_by"] in ("signal", b"signal"), (attrs, output)
    assert not bool(attrs["exact"]) and res.max() >= 0, (res, output)
    for ti in range(res.shape[0]):
        for tj in range(res.shape[1]):
            if res[ti, tj] >= 0:
                rows, cols = slice(ti * 32, (ti + 1) * 32), slice(tj * 32, (tj + 1) * 32)
                assert np.array_equal(c[rows, cols], expected[int(res[ti, tj])][rows, cols]), (ti, tj)
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{c_name}.") or p.name == f"{c_name}.lock"]
    assert left == [], left
    assert "Traceback" not in output, output


def test_scancel_publishes_every_tile_at_its_best_resolution(slurm, cli_env, tmp_path):
    """scancel (SIGTERM to every process of the job, SIGKILL KillWait=5 s later): rank 0 publishes
    every tile at its best resolution with stopped_by=signal before the SIGKILL."""
    import time
    a, b = make_inputs(cli_env, tmp_path, (128, 96, 128), seed=5)
    job = slurm.sbatch("-n", "3", "--time=5", "--output=cancel-%j.out", str(MATMUL_SBATCH), "A.h5:/A", "B.h5:/B",
                       "-o", "C.h5", *SLOW_ARGS, "--service-time", "exp:0.05", cwd=tmp_path, env=job_env(slurm))
    until = time.monotonic() + 90
    while not (tmp_path / "C.h5").exists():  # the first resolution is published
        assert time.monotonic() < until, slurm.diagnostics()
        time.sleep(0.1)
    time.sleep(0.5)
    slurm.run("scancel", job)
    info = slurm.wait_job(job, timeout=60)
    output = Path(info["StdOut"]).read_text(errors="replace")
    with slurm.explain_failure():
        assert info["JobState"] == "CANCELLED", (info, output)
        assert "mpilayer: stopped by SIG" in output, output
        _check_signal_stop(tmp_path, a, b, output)


def test_time_limit_warning_signal_stops_the_run(slurm, cli_env, tmp_path):
    """A job that cannot finish in its time limit (1 min): the script's `--signal=B:USR1@60` makes
    Slurm warn the batch shell, which passes SIGUSR1 on 30 s before the limit; rank 0 publishes
    every tile at its best resolution and exits with 138 (the product would need ~3 minutes)."""
    a, b = make_inputs(cli_env, tmp_path, (128, 96, 128), seed=6)
    info, output = run_job(slurm, "-n", "3", "--time=1", "--output=limit-%j.out", str(MATMUL_SBATCH), "A.h5:/A",
                           "B.h5:/B", "-o", "C.h5", *SLOW_ARGS, "--service-time", "exp:1.0", "--deadline", "600",
                           cwd=tmp_path, env=job_env(slurm), expect=("FAILED", "TIMEOUT"), timeout=150)
    with slurm.explain_failure():
        assert re.search(r"got SIGUSR1 \(time limit in \d+ s\)", output), output
        assert "mpilayer: stopped by SIG" in output, output
        _check_signal_stop(tmp_path, a, b, output)
