"""A throw-away Slurm cluster on this one machine, for the tests of ``slurm/``.

``LocalSlurmCluster`` installs Debian's Slurm and MUNGE packages when they are
missing, writes a private configuration under a temporary directory (nothing in
/etc is read or written), and starts one ``munged``, one ``slurmctld`` and one
``slurmd`` per virtual node, all in the foreground as children of this process
so that they are stopped by PID (SIGTERM, wait, SIGKILL) and reaped (PID 1 may
not reap orphans on a container/VM). The virtual nodes ``node1``, ``node2``
share this host and are told apart by ``SLURMD_NODENAME`` / ``SLURM_NODEID``.

Used by tests/test_slurm.py through a session-scoped fixture; it can also be
driven by hand::

    python tests/slurm_cluster.py            # start, print SLURM_CONF, wait for Ctrl-C
"""
from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel"]
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
    "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY", "SPECIAL_EXIT", "REVOKED",
}


class SlurmUnavailable(RuntimeError):
    """This machine cannot run a local Slurm (not root, no apt, install failed)."""


class SlurmError(RuntimeError):
    """The local cluster misbehaved (a daemon died, a job did not finish...)."""


def _sbin_path(env_path: str | None = None) -> str:
    parts = (env_path or os.environ.get("PATH", "")).split(os.pathsep)
    for extra in ("/usr/sbin", "/sbin", "/usr/bin"):
        if extra not in parts:
            parts.append(extra)
    return os.pathsep.join(p for p in parts if p)


def missing_binaries() -> list[str]:
    path = _sbin_path()
    return [b for b in BINARIES if shutil.which(b, path=path) is None]


def ensure_installed(log=print) -> None:
    """Install the Slurm daemons and MUNGE with apt when a binary is missing.

    Raises SlurmUnavailable when that is impossible on this machine.
    """
    missing = missing_binaries()
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"Slurm binaries {missing} are missing and installing them needs root")
    if shutil.which("apt-get", path=_sbin_path()) is None:
        raise SlurmUnavailable(f"Slurm binaries {missing} are missing and there is no apt-get")
    log(f"slurm_cluster: installing {' '.join(PACKAGES)} (missing: {' '.join(missing)})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", PATH=_sbin_path())
    apt_opts = ["-o", "DPkg::Lock::Timeout=300", "-q"]
    created_policy = False
    if not POLICY_RC_D.exists():
        # Keep the post-install scripts from starting system-wide daemons.
        POLICY_RC_D.write_text("#!/bin/sh\n# temporary, written by mpilayer tests/slurm_cluster.py\nexit 101\n")
        POLICY_RC_D.chmod(0o755)
        created_policy = True
    try:
        for cmd in (["apt-get", *apt_opts, "update"],
                    ["apt-get", *apt_opts, "install", "-y", "--no-install-recommends", *PACKAGES]):
            proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, stdin=subprocess.DEVNULL)
            if proc.returncode != 0:
                raise SlurmUnavailable(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    finally:
        if created_policy:
            POLICY_RC_D.unlink(missing_ok=True)
    missing = missing_binaries()
    if missing:
        raise SlurmUnavailable(f"after apt-get install, still missing: {missing}")


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM the daemon if the process that started it dies.

    So a test run killed without clean-up (SIGKILL, a CI time-out) leaves no
    daemons behind. Runs after Popen's setuid, which would clear the setting.
    """
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


# A watchdog child: reads daemon PIDs from its stdin (one per line), and when
# that pipe closes - this process died without stop(), e.g. SIGKILL or a CI
# time-out - it TERMs then KILLs them. stop() kills the watchdog first, so it
# never signals PIDs that a clean stop has already reaped.
WATCHDOG = r"""
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
pids = [int(line) for line in sys.stdin if line.strip()]
for sig in (signal.SIGTERM, signal.SIGKILL):
    alive = []
    for p in pids:
        try:
            os.kill(p, sig)
            alive.append(p)
        except ProcessLookupError:
            pass
    if not alive:
        break
    time.sleep(5)
if len(sys.argv) > 1:  # the cluster's own temp directory
    import shutil
    shutil.rmtree(sys.argv[1], ignore_errors=True)
"""


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_ports(preferred: list[int]) -> list[int]:
    """The preferred ports if all are free, else free ports from a random base."""
    if all(_port_free(p) for p in preferred):
        return preferred
    import random
    for _ in range(200):
        base = random.randint(20000, 30000)
        ports = list(range(base, base + len(preferred)))
        if all(_port_free(p) for p in ports):
            return ports
    raise SlurmError("no free TCP ports for the local Slurm cluster")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"<{e}>"
    return "\n".join(text[-lines:])


def parse_scontrol_record(text: str) -> dict[str, str]:
    """``Key=Value Key2=Value2`` (one-liner output of ``scontrol -o``) -> dict."""
    out: dict[str, str] = {}
    # Values may contain spaces only in a few fields (e.g. Reason=...); good enough here.
    for m in re.finditer(r"(\S+?)=(\S*)", text):
        out.setdefault(m.group(1), m.group(2))
    return out


class LocalSlurmCluster:
    """Configure, start and stop a private MUNGE + Slurm cluster of ``nodes`` virtual nodes."""

    def __init__(self, base_dir: str | os.PathLike | None = None, nodes: int = 2,
                 cpus_per_node: int | None = None, ctld_port: int = 16817,
                 first_slurmd_port: int = 17001, log=print):
        self.log = log
        self.nodes = [f"node{i}" for i in range(1, nodes + 1)]
        self.cpus = cpus_per_node or max(2, os.cpu_count() or 1)
        self._own_base = base_dir is None
        self.base = Path(base_dir or tempfile.mkdtemp(prefix="mpilayer-slurm-")).resolve()
        self.base.mkdir(parents=True, exist_ok=True)
        ports = _pick_ports([ctld_port] + [first_slurmd_port + i for i in range(nodes)])
        self.ctld_port, self.slurmd_ports = ports[0], ports[1:]
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.base / "slurm.conf"
        self.munge_dir = self.base / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}
        self._watchdog: subprocess.Popen | None = None
        self.started = False

    # ------------------------------------------------------------------ setup
    def logs(self) -> dict[str, Path]:
        # munged --foreground logs to stderr, which _spawn sends to munged.stdout
        d = {"munged": self.base / "munged.stdout", "slurmctld": self.base / "slurmctld.log"}
        for n in self.nodes:
            d[f"slurmd {n}"] = self.base / f"slurmd_{n}.log"
        return d

    def log_tails(self, lines: int = 30) -> str:
        parts = []
        for name, path in self.logs().items():
            proc = self.procs.get(name)
            state = "" if proc is None else \
                f" (pid {proc.pid}, {'running' if proc.poll() is None else f'exited {proc.returncode}'})"
            parts.append(f"----- {name}{state}: {path}\n{_tail(path, lines)}")
            stdout = self.base / f"{name.replace(' ', '_')}.stdout"
            if stdout != path and stdout.exists() and stdout.stat().st_size:
                parts.append(f"----- {name} stdout/stderr: {stdout}\n{_tail(stdout, lines)}")
        return "\n".join(parts)

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for Slurm client commands: our SLURM_CONF, no inherited SLURM_* job variables."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SINFO_"))}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = _sbin_path(env.get("PATH"))
        env.update(extra)
        return env

    def _write_munge_key(self) -> None:
        munge = pwd.getpwnam("munge")
        self.munge_dir.mkdir(mode=0o755, exist_ok=True)
        os.chmod(self.munge_dir, 0o755)  # munged wants its socket directory world-executable
        os.chown(self.munge_dir, munge.pw_uid, munge.pw_gid)
        key = self.munge_dir / "munge.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(128))
        os.chown(key, munge.pw_uid, munge.pw_gid)

    def write_config(self) -> None:
        os.chmod(self.base, 0o755)
        (self.base / "state").mkdir(exist_ok=True)
        for n in self.nodes:
            (self.base / f"spool_{n}").mkdir(exist_ok=True)
        (self.base / "plugstack.conf").write_text("")
        node_lines = "\n".join(
            f"NodeName={n} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={p} "
            f"CPUs={self.cpus} State=UNKNOWN"
            for n, p in zip(self.nodes, self.slurmd_ports))
        b = self.base
        self.conf.write_text(f"""\
# Written by mpilayer tests/slurm_cluster.py -- a private single-host test cluster.
ClusterName=mpilayertest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_ports[0]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool_%n
SlurmctldPidFile={b}/slurmctld.pid
SlurmdPidFile={b}/slurmd_%n.pid
SlurmctldLogFile={b}/slurmctld.log
SlurmdLogFile={b}/slurmd_%n.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={b}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=pmi2
ReturnToService=2
EnforcePartLimits=ALL
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=600
KillWait=5
InactiveLimit=0
{node_lines}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        self._write_munge_key()

    def _spawn(self, name: str, cmd: list[str], **kw) -> subprocess.Popen:
        out = open(self.base / f"{name.replace(' ', '_')}.stdout", "ab")
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=self.env(), cwd=self.base, start_new_session=True,
                                    preexec_fn=_die_with_parent, **kw)
        finally:
            out.close()
        self.procs[name] = proc
        self._watch(proc.pid)
        return proc

    def _watch(self, pid: int) -> None:
        if self._watchdog is None:
            extra = [str(self.base)] if self._own_base else []
            self._watchdog = subprocess.Popen([sys.executable, "-c", WATCHDOG, *extra], stdin=subprocess.PIPE,
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                              start_new_session=True, text=True)
        try:
            self._watchdog.stdin.write(f"{pid}\n")
            self._watchdog.stdin.flush()
        except OSError:
            pass

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.kill()
            self._watchdog.wait()
            with contextlib.suppress(OSError):
                self._watchdog.stdin.close()
            self._watchdog = None

    def _wait_for(self, what: str, predicate, timeout: float, interval: float = 0.1):
        t0 = time.monotonic()
        while True:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmError(f"{name} exited with {proc.returncode} while waiting for {what}\n"
                                     + self.log_tails())
            result = predicate()
            if result:
                return result
            if time.monotonic() - t0 > timeout:
                raise SlurmError(f"timed out after {timeout:.0f} s waiting for {what}\n" + self.log_tails())
            time.sleep(interval)

    def start(self, timeout: float = 60.0) -> "LocalSlurmCluster":
        ensure_installed(self.log)
        if os.geteuid() != 0:
            raise SlurmUnavailable("the local Slurm cluster runs its daemons as root/munge: needs root")
        try:
            pwd.getpwnam("munge")
        except KeyError:
            raise SlurmUnavailable("user 'munge' does not exist (munge package broken?)")
        self.write_config()
        t0 = time.monotonic()
        try:
            md = self.munge_dir
            self._spawn("munged", [
                shutil.which("munged", path=_sbin_path()), "--foreground",
                f"--key-file={md / 'munge.key'}", f"--socket={self.munge_socket}",
                f"--pid-file={md / 'munged.pid'}", f"--log-file={md / 'munged.log'}",
                f"--seed-file={md / 'munged.seed'}", "--num-threads=4",
            ], user="munge", group="munge", extra_groups=[])
            self._wait_for("the munge socket", self.munge_socket.exists, 15)
            self._spawn("slurmctld", [shutil.which("slurmctld", path=_sbin_path()), "-D", "-i",
                                      "-f", str(self.conf)])
            self._wait_for("slurmctld to answer", self._ctld_answers, timeout)
            for n in self.nodes:
                self._spawn(f"slurmd {n}", [shutil.which("slurmd", path=_sbin_path()), "-D", "-N", n,
                                            "-f", str(self.conf)])
            self._wait_for("all nodes idle", self.all_idle, timeout, interval=0.2)
        except BaseException:
            self.stop()
            raise
        self.started = True
        self.log(f"slurm_cluster: {len(self.nodes)} nodes idle after {time.monotonic() - t0:.1f} s "
                 f"(SLURM_CONF={self.conf})")
        return self

    # --------------------------------------------------------------- queries
    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env())
        proc = subprocess.run(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise SlurmError(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def _ctld_answers(self) -> bool:
        return self.run("scontrol", "ping", check=False, timeout=20).returncode == 0

    def node_states(self) -> dict[str, str]:
        proc = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=20)
        if proc.returncode != 0:
            return {}
        return dict(line.split()[:2] for line in proc.stdout.splitlines() if line.strip())

    def all_idle(self) -> bool:
        states = self.node_states()
        return bool(states) and all(states.get(n) == "idle" for n in self.nodes)

    # ------------------------------------------------------------------ jobs
    def sbatch(self, *args: str, cwd: str | os.PathLike | None = None, env: dict | None = None) -> str:
        """Submit; returns the job id. ``args`` are sbatch's own options then the script and its args."""
        proc = self.run("sbatch", "--parsable", *args, cwd=cwd, env=env or self.env())
        return proc.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        proc = self.run("scontrol", "-o", "show", "job", job_id, check=False, timeout=20)
        return parse_scontrol_record(proc.stdout) if proc.returncode == 0 else {}

    def wait_job(self, job_id: str, timeout: float = 120, interval: float = 0.2) -> dict[str, str]:
        """Poll until the job reaches a final state; returns its ``scontrol show job`` record."""
        t0 = time.monotonic()
        info: dict[str, str] = {}
        while time.monotonic() - t0 < timeout:
            info = self.job_info(job_id) or info
            if info.get("JobState") in TERMINAL_STATES:
                return info
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmError(f"{name} died (exit {proc.returncode}) while job {job_id} ran\n"
                                     + self.log_tails())
            time.sleep(interval)
        self.run("scancel", job_id, check=False)
        raise SlurmError(f"job {job_id} not finished after {timeout:.0f} s: {info}\n" + self.log_tails())

    def submit_and_wait(self, *args: str, cwd=None, env=None, timeout: float = 120) -> dict[str, str]:
        """``sbatch --wait`` without its slow polling: submit, poll every 0.2 s, return the record."""
        return self.wait_job(self.sbatch(*args, cwd=cwd, env=env), timeout=timeout)

    def diagnostics(self, *files: str | os.PathLike, lines: int = 40) -> str:
        """Job output files given, then the daemons' log tails: for failure messages."""
        parts = [f"===== {f}\n{_tail(Path(f), lines)}" for f in files if f]
        parts.append("===== daemon logs (last lines)\n" + self.log_tails(lines))
        return "\n".join(parts)

    @contextlib.contextmanager
    def explain_failure(self, *files: str | os.PathLike):
        """On an exception in the block, print the given files and the daemons' log tails."""
        try:
            yield
        except BaseException as e:
            if not isinstance(e, KeyboardInterrupt) and type(e).__name__ != "Skipped":
                print(self.diagnostics(*files), flush=True)
            raise

    # ------------------------------------------------------------------ stop
    def cancel_all_jobs(self, timeout: float = 15.0) -> None:
        """scancel whatever is still queued or running on this cluster, and wait for it to go."""
        ctld = self.procs.get("slurmctld")
        if ctld is None or ctld.poll() is not None:
            return
        def active():
            proc = self.run("squeue", "-h", "-o", "%i", check=False, timeout=20)
            return proc.stdout.split() if proc.returncode == 0 else []
        jobs = active()
        if not jobs:
            return
        self.run("scancel", *jobs, check=False, timeout=20)
        t0 = time.monotonic()
        while active() and time.monotonic() - t0 < timeout:
            time.sleep(0.2)

    def stop(self, grace: float = 10.0) -> None:
        """Cancel leftover jobs, TERM the daemons we started (slurmd first), wait, KILL; reap them all."""
        self._stop_watchdog()
        try:
            self.cancel_all_jobs()
        except (OSError, subprocess.SubprocessError):
            pass
        order = [n for n in self.procs if n.startswith("slurmd ")] + \
                [n for n in ("slurmctld", "munged") if n in self.procs]
        for name in order:
            proc = self.procs[name]
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=grace)
        self.procs.clear()
        self.started = False

    def cleanup(self) -> None:
        self.stop()
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.cleanup()


STUB_MPILAYER = r"""#!{python}
# Stand-in for the mpilayer CLI (tests of slurm/*.sbatch): rank 0 prints one
# JSON line with its argv, the MPI world and each rank's node and thread env.
import json, os, sys
from mpi4py import MPI
comm = MPI.COMM_WORLD
keys = ("SLURMD_NODENAME", "SLURM_NODEID", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
        "MKL_NUM_THREADS", "VIRTUAL_ENV")
mine = dict((k, os.environ.get(k)) for k in keys)
mine["rank"] = comm.rank
ranks = comm.gather(mine, root=0)
if comm.rank == 0:
    print("STUB-MPILAYER " + json.dumps({{"argv": sys.argv[1:], "size": comm.size, "ranks": ranks}}), flush=True)
"""


def make_stub_venv(path: str | os.PathLike, python: str = sys.executable) -> Path:
    """A fake virtualenv whose ``mpilayer`` is the MPI stand-in above.

    ``bin/python`` and ``bin/mpiexec`` forward to the interpreter running the
    tests and the mpiexec next to it (or on PATH), so mpi4py is the real one.
    """
    path = Path(path)
    bin_dir = path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    real_bin = Path(python).parent
    mpiexec = real_bin / "mpiexec"
    if not mpiexec.exists():
        mpiexec = Path(shutil.which("mpiexec") or "mpiexec")
    files = {
        "mpilayer": STUB_MPILAYER.format(python=python),
        "python": f'#!/bin/sh\nexec "{python}" "$@"\n',
        "mpiexec": f'#!/bin/sh\nexec "{mpiexec}" "$@"\n',
    }
    for name, text in files.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return path


def parse_stub_output(text: str) -> list[dict]:
    import json
    return [json.loads(line.split(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("STUB-MPILAYER ")]


if __name__ == "__main__":  # manual use: start a cluster and keep it up until Ctrl-C
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # clean up on TERM as on Ctrl-C
    cluster = LocalSlurmCluster(base_dir=sys.argv[1] if len(sys.argv) > 1 else None)
    with cluster:
        print(f"export SLURM_CONF={cluster.conf}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
