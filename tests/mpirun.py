"""Launching mpilayer under a real mpiexec from the tests (never mocked)."""
import os
import shutil
import subprocess
import sys

BIN = os.path.dirname(sys.executable)


def mpiexec_path() -> str:
    """The launcher: $MPIEXEC, else the one beside this Python (the mpich wheel's), else PATH's."""
    found = os.environ.get("MPIEXEC") or shutil.which("mpiexec", path=BIN) or shutil.which("mpiexec")
    if not found:
        raise RuntimeError("no mpiexec found: install the mpich wheel (make install) or set MPIEXEC")
    return found


def mpi_env(**extra) -> dict:
    env = dict(os.environ)
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")  # Open MPI: allow -n > cores
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env.update(extra)
    return env


def mpilayer_cmd(n: int, *args) -> list:
    return [mpiexec_path(), "-n", str(n), sys.executable, "-m", "mpilayer", *map(str, args)]


def run_mpilayer(n: int, *args, timeout: float = 120, env=None, cwd=None) -> subprocess.CompletedProcess:
    """Run ``mpiexec -n N python -m mpilayer ARGS``; fail the test (not hang) past ``timeout``."""
    return subprocess.run(mpilayer_cmd(n, *args), capture_output=True, text=True, timeout=timeout,
                          env=env or mpi_env(), cwd=cwd)
