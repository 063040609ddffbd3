"""``mpilayer scaling``: real sweeps under the real mpiexec (1 and 2 ranks), the report files,
merging, and argument errors."""
import csv
import json
import os
import shutil
import subprocess

import pytest
from mpirun import BIN, mpi_env

from mpilayer.io.result_store import read_result
from mpilayer.jobs.scaling import build_report

SHAPE = "256,512,256"
PNGS = ("time_to_resolution.png", "speedup.png", "bound_vs_time.png", "breakdown.png")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.mpi


def scaling(*args, timeout=120, env=None, cwd=None) -> subprocess.CompletedProcess:
    exe = shutil.which("mpilayer", path=BIN)
    assert exe, f"no mpilayer console script in {BIN}"
    return subprocess.run([exe, "scaling", *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env or mpi_env(), cwd=cwd)


def sweep(out, *args):
    proc = scaling("--shape", SHAPE, "--launcher", "mpiexec", "-o", out, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def load(out):
    with open(os.path.join(out, "scaling.json")) as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """One sweep: ranks 1,2, strong and weak, result files kept for cross-checks."""
    out = str(tmp_path_factory.mktemp("scaling") / "both")
    proc = sweep(out, "--ranks", "1,2", "--mode", "both", "--keep-files")
    return out, proc


def test_csv_rows_and_columns(both):
    out, _ = both
    rows = read_csv(os.path.join(out, "scaling.csv"))
    assert len(rows) == 2 * 2 * 2  # modes x rank counts x resolutions (components 1+7)
    for col in ("mode", "ranks", "workers", "M", "K", "N", "repeat", "selected", "resolution", "elapsed_s",
                "start_s", "work_s", "error_bound", "error_estimate", "bytes_sent", "bytes_received"):
        assert col in rows[0], col
    assert {(r["mode"], r["ranks"]) for r in rows} == {("strong", "1"), ("strong", "2"), ("weak", "1"), ("weak", "2")}
    assert all(float(r["work_s"]) > 0 and float(r["elapsed_s"]) > float(r["work_s"]) for r in rows)

    ranks = read_csv(os.path.join(out, "ranks.csv"))
    assert len(ranks) == 2 * (1 + 2)  # per mode: the 1-rank run has 1 row, the 2-rank run 2
    for col in ("rank", "role", "compute_s", "comm_s", "idle_s", "io_s", "other_s", "wall_s"):
        assert col in ranks[0], col
    roles = {(r["mode"], r["ranks"], r["rank"]): r["role"] for r in ranks}
    assert roles[("strong", "1", "0")] == "master+worker"
    assert roles[("strong", "2", "0")] == "master" and roles[("strong", "2", "1")] == "worker"
    assert all(float(r["compute_s"]) > 0 for r in ranks if r["role"] != "master")


def test_json_matches_the_result_files(both):
    out, _ = both
    report = load(out)
    assert report["format"] == "mpilayer-scaling"
    machine = report["machines"][0]
    for key in ("hostname", "cores", "cpu_model", "date", "mpilayer_version", "launcher"):
        assert machine[key], key
    assert machine["launcher"] == "mpiexec"
    runs = report["runs"]
    assert len(runs) == 4 and all(r["ok"] for r in runs)
    for r in runs:
        result = read_result(r["result_file"], max_c_bytes=0)
        attrs, timeline = result["attrs"], result["timeline"]
        assert attrs["ranks"] == r["ranks"]
        assert attrs["exact"] and r["exact"]
        assert len(r["timeline"]) == attrs["resolutions_total"] == len(timeline) == 2
        assert [t["elapsed_s"] for t in r["timeline"]] == pytest.approx(list(timeline["elapsed_s"]))
        works = [t["work_s"] for t in r["timeline"]]
        assert all(0 < a < b for a, b in zip(works, works[1:])), works  # later resolutions come later
        # workers read their own operand blocks (data_plane.py): the master sends only job headers
        assert all(t["bytes_received"] > 0 for t in r["timeline"])
        assert r["timeline"][0]["error_bound"] > 0 and r["timeline"][-1]["error_bound"] == 0
        assert 0 < r["timeline"][0]["error_estimate"] < 1 and r["timeline"][-1]["error_estimate"] == 0
        assert len(r["rank_stats"]) == r["ranks"] == len(result["ranks"])
        assert 0 < r["start_s"] < r["elapsed_s"]
        m = int(SHAPE.split(",")[0])
        assert r["shape"][0] == (m * r["workers"] if r["mode"] == "weak" else m)
    summary = {(s["mode"], s["ranks"]): s for s in report["summary"]}
    assert set(summary) == {("strong", 1), ("strong", 2), ("weak", 1), ("weak", 2)}
    assert summary[("strong", 1)]["speedup_final"] == pytest.approx(1.0)
    assert summary[("strong", 2)]["speedup_final"] > 0
    assert sum(r["selected"] for r in runs) == 4


def test_pngs_and_table(both):
    out, proc = both
    for name in PNGS:
        path = os.path.join(out, name)
        with open(path, "rb") as fh:
            assert fh.read(8) == PNG_MAGIC, name
        assert os.path.getsize(path) > 15_000, name
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("mode "))
    assert set(lines[header + 1]) <= {"-", " "}
    rows = lines[header + 2:header + 6]
    assert [row.split()[:2] for row in rows] == [["strong", "1"], ["strong", "2"], ["weak", "1"], ["weak", "2"]]
    assert lines[header].split()[9:11] == ["err(res", "0)"]
    assert all(0 < float(row.split()[8]) < 1 for row in rows), rows  # resolution 0's estimated relative error
    assert len({len(line) for line in lines[header:header + 2]}) == 1  # aligned columns


def test_merge_gives_the_union(tmp_path):
    one, two, merged = (str(tmp_path / d) for d in ("one", "two", "merged"))
    sweep(one, "--ranks", "1", "--warmup", "0")
    sweep(two, "--ranks", "2", "--warmup", "0")
    proc = scaling("merge", one, two, "-o", merged)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = load(merged)
    assert sorted(s["ranks"] for s in report["summary"]) == [1, 2]
    assert len(report["runs"]) == 2 and len(report["sources"]) == 2
    assert report["summary"][0]["speedup_final"] == pytest.approx(1.0)  # reference: the 1-rank run of `one`
    assert len(read_csv(os.path.join(merged, "scaling.csv"))) == 4
    assert len(read_csv(os.path.join(merged, "ranks.csv"))) == 3
    assert all(os.path.getsize(os.path.join(merged, name)) > 15_000 for name in PNGS)

    # A different problem does not merge.
    other = load(two)
    other["problem"]["shape"] = [512, 512, 256]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "scaling.json").write_text(json.dumps(other))
    proc = scaling("merge", one, str(bad), "-o", str(tmp_path / "nope"))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "problem differs in shape" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--ranks", "0,2"], "--ranks"),
    (["--ranks", "1,x"], "--ranks"),
    (["--mode", "sideways"], "--mode"),
    (["--shape", "1,2"], "--shape"),
    (["--repeat", "0"], "--repeat"),
    (["--warmup", "-1"], "--warmup"),
    (["merge"], "merge needs"),
    (["merge", "/nonexistent/dir", "-o", "x"], "cannot read"),
    (["sideways"], "unexpected argument"),
])
def test_bad_arguments_give_one_line(tmp_path, args, message):
    proc = scaling(*args, "-o", str(tmp_path / "o"), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("mpilayer") and message in proc.stderr
    assert not (tmp_path / "o" / "scaling.json").exists()


def test_existing_report_needs_force(both, tmp_path):
    out, _ = both
    proc = scaling("--ranks", "1", "--shape", SHAPE, "-o", out)
    assert proc.returncode == 2 and "--force" in proc.stderr and proc.stderr.count("\n") == 1


def test_refuses_to_run_under_a_launcher(tmp_path):
    proc = scaling("--ranks", "1", "-o", str(tmp_path / "o"), env=mpi_env(PMI_SIZE="4", PMI_RANK="0"))
    assert proc.returncode == 2 and "not under mpiexec/srun" in proc.stderr
    proc = scaling("--ranks", "1", "-o", str(tmp_path / "o"), env=mpi_env(PMI_SIZE="4", PMI_RANK="3"))
    assert proc.returncode == 2 and proc.stderr == ""  # only rank 0 speaks


def fake_run(mode, ranks, rep, final, m=100, start=0.5):
    workers = 1 if ranks == 1 else ranks - 1
    timeline = [{"resolution": 0, "elapsed_s": start + final / 4, "work_s": final / 4, "error_bound": 10.0,
                 "bytes_sent": 1, "bytes_received": 1},
                {"resolution": 1, "elapsed_s": start + final, "work_s": final, "error_bound": 0.0,
                 "bytes_sent": 1, "bytes_received": 1}]
    return {"mode": mode, "ranks": ranks, "workers": workers, "shape": [m * (workers if mode == "weak" else 1), 8, 8],
            "repeat": rep, "source": 0, "ok": True, "oversubscribed": False, "hostname": "h", "start_s": start,
            "elapsed_s": start + final, "resolutions_total": 2, "exact": True, "timeline": timeline,
            "rank_stats": []}


def test_pick_and_speedup_arithmetic():
    source = {"problem": {"shape": [100, 8, 8]}, "machine": {"hostname": "h"}}
    runs = [fake_run("strong", 1, rep, t) for rep, t in enumerate((4.0, 2.0, 3.0))]
    runs += [fake_run("strong", 3, rep, t) for rep, t in enumerate((1.5, 1.0))]
    runs += [fake_run("weak", 2, 0, 2.0), fake_run("weak", 3, 0, 2.5)]
    report = build_report([source], runs, "median")
    chosen = [(r["mode"], r["ranks"], r["timeline"][-1]["work_s"]) for r in report["runs"] if r["selected"]]
    assert chosen == [("strong", 1, 3.0), ("strong", 3, 1.0), ("weak", 2, 2.0), ("weak", 3, 2.5)]
    s = {(row["mode"], row["ranks"]): row for row in report["summary"]}
    assert s[("strong", 3)]["speedup_final"] == pytest.approx(3.0)
    assert s[("strong", 3)]["efficiency_final"] == pytest.approx(1.0)
    assert s[("strong", 3)]["worker_efficiency_final"] == pytest.approx(1.5)
    # weak: reference is the fewest ranks (2, one worker); 3 ranks do twice the work in 2.5/2.0 the time
    assert s[("weak", 3)]["reference_ranks"] == 2
    assert s[("weak", 3)]["speedup_final"] == pytest.approx(2 * 2.0 / 2.5)
    assert s[("weak", 3)]["worker_efficiency_final"] == pytest.approx(2.0 / 2.5)
    best = build_report([source], runs, "best")
    assert [r["timeline"][-1]["work_s"] for r in best["runs"] if r["selected"]][:2] == [2.0, 1.0]


def test_srun_launcher_inside_slurm(tmp_path):
    """--launcher auto with SLURM_JOB_ID set runs `srun -n R --mpi=pmi2 ...`; a stand-in srun on PATH
    records its arguments and runs the rest under mpiexec (real Slurm is tested in test_slurm.py)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    log = tmp_path / "srun.args"
    (fake / "srun").write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$*" >> "{log}"\n'
        'n=$2; shift 2\n'
        'while [ "${1#--}" != "$1" ]; do shift; done\n'
        f'exec "{BIN}/mpiexec" -n "$n" "$@"\n')
    (fake / "srun").chmod(0o755)
    env = mpi_env(SLURM_JOB_ID="4242", SLURM_JOB_CPUS_PER_NODE="2(x2)")
    env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
    out = str(tmp_path / "o")
    proc = scaling("--ranks", "1,2", "--shape", SHAPE, "--warmup", "0", "-o", out, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = log.read_text().splitlines()
    assert [c.split()[:4] for c in calls] == [["-n", "1", "--mpi=pmi2", "--kill-on-bad-exit=1"],
                                              ["-n", "2", "--mpi=pmi2", "--kill-on-bad-exit=1"]]
    machine = load(out)["machines"][0]
    assert machine["launcher"] == "srun" and machine["cpus_available"] == 4
    assert machine["slurm"]["job_id"] == "4242"


def test_a_run_past_its_timeout_is_killed_and_reported(tmp_path):
    out = str(tmp_path / "o")
    proc = scaling("--ranks", "2", "--shape", SHAPE, "--warmup", "0", "--timeout", "0.05", "-o", out)
    assert proc.returncode == 1 and "1 of 1 run(s) failed" in proc.stderr
    assert "FAILED: strong 2 rank(s)" in proc.stdout
    (run,) = load(out)["runs"]
    assert not run["ok"] and not run["selected"] and run["error"].startswith("timed out")
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert out not in ps  # the launcher's whole session was killed


def test_disturbed_runs_are_not_chosen():
    source = {"problem": {"shape": [100, 8, 8]}, "machine": {"hostname": "h"}}
    runs = [fake_run("strong", 1, rep, t) for rep, t in enumerate((1.0, 2.0, 3.0))]
    runs[1]["background_load"] = 0.5  # the median run shared the host with something else
    report = build_report([source], runs, "median", max_background=0.1)
    assert [r["timeline"][-1]["work_s"] for r in report["runs"] if r["selected"]] == [1.0]  # lower median of 1, 3
    assert report["summary"][0]["runs_quiet"] == 2 and report["summary"][0]["runs_pooled"] == 3
    for r in runs:
        r["background_load"] = 0.5  # all disturbed: choose among all
    report = build_report([source], runs, "median", max_background=0.1)
    assert [r["timeline"][-1]["work_s"] for r in report["runs"] if r["selected"]] == [2.0]


def test_problem_text_names_each_runs_tile():
    """The plots' subtitle names the tile a run used, every one when matmul chose different tiles
    for different rank counts (its automatic tile depends on the workers)."""
    from mpilayer.jobs.scaling import _problem_text
    problem = {"shape": [64, 32, 48], "dtype": "int8", "bits": 8, "components_used": [7, 1]}
    assert ", tile 16x16" in _problem_text({**problem, "tile_used": [16, 16]})
    assert ", tiles 16x16 / 24x24 (by run)" in _problem_text({**problem, "tile_used": [[16, 16], [24, 24]]})
