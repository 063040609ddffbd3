"""Tests of the crash-safe result file, read_result and describe_result."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

from mpilayer.errors import InputError, MpilayerError, OutputError
from mpilayer.io import result_store
from mpilayer.io.result_info import describe_result
from mpilayer.io.result_store import ResultStore, read_result

PACKAGE_DIR = os.path.dirname(os.path.abspath(result_store.__file__))


def assert_one_line_error(excinfo, *needles):
    message = str(excinfo.value)
    assert isinstance(excinfo.value, MpilayerError)
    assert "\n" not in message
    for needle in needles:
        assert str(needle) in message, (needle, message)


def make_store(tmp_path, name="c.h5", **kwargs):
    args = dict(shape=(10, 7), dtype="int64", tile_shape=(4, 3), n_resolutions=3, attrs={"bits": 8})
    args.update(kwargs)
    return ResultStore(tmp_path / name, **args)


def fill_tile(store, ti, tj, value, resolution, bound=1.0):
    rows, cols = store.tile_slices(ti, tj)
    data = np.full((rows.stop - rows.start, cols.stop - cols.start), value)
    store.write_tile(ti, tj, data.astype(store.dtype), resolution, bound)
    return rows, cols


def scratch_files(directory):
    return sorted(name for name in os.listdir(directory) if name.startswith("."))


# -- construction checks ---------------------------------------------------------


def test_missing_output_directory(tmp_path):
    with pytest.raises(OutputError) as excinfo:
        make_store(tmp_path, "nodir/c.h5")
    assert_one_line_error(excinfo, "nodir", "does not exist")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_output_directory(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(OutputError) as excinfo:
        make_store(tmp_path, "ro/c.h5")
    assert_one_line_error(excinfo, "ro", "not writable")


def test_working_file_failure_is_output_error(tmp_path, monkeypatch):
    """Covers unwritable directories even when the tests run as root."""

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(h5py, "File", refuse)
    with pytest.raises(OutputError) as excinfo:
        make_store(tmp_path)
    assert_one_line_error(excinfo, ".c.h5.work.h5", "Permission denied")


def test_existing_output_needs_force(tmp_path):
    (tmp_path / "c.h5").write_text("old result")
    with pytest.raises(OutputError) as excinfo:
        make_store(tmp_path)
    assert_one_line_error(excinfo, tmp_path / "c.h5", "exists; pass --force to overwrite")
    assert (tmp_path / "c.h5").read_text() == "old result"
    store = make_store(tmp_path, force=True)
    assert (tmp_path / "c.h5").read_text() == "old result"  # kept until the first publish replaces it
    store.discard()
    assert (tmp_path / "c.h5").read_text() == "old result"  # a run that publishes nothing keeps it
    store = make_store(tmp_path, force=True)
    store.publish({}, [])
    assert read_result(tmp_path / "c.h5")["attrs"]["publish_seq"] == 1
    store.discard()


def test_second_store_on_same_output_is_refused(tmp_path):
    """One run per output: the lock is taken before any scratch file is touched."""
    first = make_store(tmp_path)
    fill_tile(first, 0, 0, 5, 0)
    with pytest.raises(OutputError) as excinfo:
        make_store(tmp_path, force=True)
    assert_one_line_error(excinfo, "c.h5", "being written by another run", f"pid {os.getpid()}")
    first.close({}, [])  # the first store's working file was not touched
    assert read_result(tmp_path / "c.h5")["C"][0, 0] == 5
    assert os.listdir(tmp_path) == ["c.h5"]


def test_output_that_is_an_input_is_refused(tmp_path):
    (tmp_path / "a.h5").write_bytes(b"input")
    os.symlink(tmp_path / "a.h5", tmp_path / "sym.h5")
    os.link(tmp_path / "a.h5", tmp_path / "hard.h5")
    for name in ("a.h5", "sym.h5", "hard.h5"):
        with pytest.raises(OutputError) as excinfo:
            make_store(tmp_path, name, force=True, inputs=[str(tmp_path / "a.h5")])
        assert_one_line_error(excinfo, name, "is the input file")
    assert (tmp_path / "a.h5").read_bytes() == b"input"
    assert sorted(os.listdir(tmp_path)) == ["a.h5", "hard.h5", "sym.h5"]


def test_refused_publish_keeps_previous_state(tmp_path):
    """before_publish raising (an input changed) publishes nothing."""
    state = {"changed": False}

    def check():
        if state["changed"]:
            raise InputError("a.h5 changed during the run")

    store = make_store(tmp_path, before_publish=check)
    fill_tile(store, 0, 0, 1, 0)
    store.publish({"exact": False}, [])
    fill_tile(store, 0, 0, 2, 2)
    state["changed"] = True
    with pytest.raises(InputError):
        store.close({"exact": True}, [])
    store.discard()
    assert read_result(tmp_path / "c.h5")["C"][0, 0] == 1
    assert os.listdir(tmp_path) == ["c.h5"]


def test_output_is_a_directory(tmp_path):
    (tmp_path / "c.h5").mkdir()
    with pytest.raises(OutputError) as excinfo:
        make_store(tmp_path, force=True)
    assert_one_line_error(excinfo, "c.h5", "directory")


# -- layout and publishing ---------------------------------------------------------


def test_working_file_layout(tmp_path):
    store = make_store(tmp_path, dtype="float64", keep_all=True)
    assert store.grid == (3, 3)
    assert scratch_files(tmp_path) == [".c.h5.work.h5"]
    store.publish({"resolution": -1}, [])
    with h5py.File(tmp_path / "c.h5", "r") as f:
        c = f["C"]
        assert c.shape == (10, 7) and c.dtype == np.float64 and c.chunks == (4, 3) and c.fillvalue == 0
        assert f["tile_resolution"].dtype == np.int16
        np.testing.assert_array_equal(f["tile_resolution"][...], -1)
        assert np.all(np.isinf(f["tile_error_bound"][...]))
        assert list(f["resolutions"]) == []
        assert "timeline" not in f
    store.discard()


def test_chunks_clipped_to_matrix(tmp_path):
    store = make_store(tmp_path, shape=(5, 2), tile_shape=(64, 64))
    assert store.grid == (1, 1)
    store.close({}, [])
    with h5py.File(tmp_path / "c.h5", "r") as f:
        assert f["C"].chunks == (5, 2)


def test_tiles_visible_only_after_publish(tmp_path):
    store = make_store(tmp_path)
    fill_tile(store, 0, 0, 5, 0)
    store.publish({"resolution": -1}, [])
    fill_tile(store, 2, 2, 9, 1)
    result = read_result(tmp_path / "c.h5")
    assert result["C"][9, 6] == 0 and result["C"][0, 0] == 5
    assert result["tile_resolution"][2, 2] == -1
    store.publish({"resolution": -1}, [])
    result = read_result(tmp_path / "c.h5")
    assert result["C"][9, 6] == 9 and result["tile_resolution"][2, 2] == 1
    assert result["attrs"]["publish_seq"] == 2
    store.discard()


def test_attrs_and_timeline_round_trip(tmp_path):
    store = make_store(tmp_path, attrs={"inputs": ("a.h5:/A", "b.h5:/B"), "bits": 8, "stopped_by": "x"})
    attrs = {
        "stopped_by": "deadline",
        "exact": False,
        "elapsed_s": 1.5,
        "deadline_s": None,
        "split": np.array([4, 2, 2]),
        "extra": {"k": 1},
    }
    timeline = [
        {"resolution": 0, "elapsed_s": 0.5, "stopped_by": "none", "exact": False},
        {"resolution": 1, "elapsed_s": None, "stopped_by": "deadline", "exact": True},
    ]
    store.close(attrs, timeline)
    result = read_result(tmp_path / "c.h5")
    got = result["attrs"]
    assert got["inputs"] == ("a.h5:/A", "b.h5:/B") and got["bits"] == 8
    assert got["stopped_by"] == "deadline"  # publish attrs override the constructor's
    assert got["exact"] is False and got["elapsed_s"] == 1.5 and got["deadline_s"] == "none"
    assert got["split"] == (4, 2, 2) and json.loads(got["extra"]) == {"k": 1}
    assert got["n_resolutions"] == 3 and got["tile_shape"] == (4, 3) and got["format"] == "mpilayer-result"
    table = result["timeline"]
    assert table.dtype["resolution"] == np.int64 and table.dtype["exact"] == np.bool_
    assert list(table["resolution"]) == [0, 1] and list(table["stopped_by"]) == ["none", "deadline"]
    assert table["elapsed_s"][0] == 0.5 and np.isnan(table["elapsed_s"][1])


def test_keep_all_layout(tmp_path):
    store = make_store(tmp_path, keep_all=True)
    for ti in range(3):
        for tj in range(3):
            fill_tile(store, ti, tj, 10 + ti * 3 + tj, 0)
    fill_tile(store, 1, 1, 99, 2)  # skips resolution 1
    store.close({}, [])
    result = read_result(tmp_path / "c.h5")
    assert result["resolutions"] == [0, 2]
    with h5py.File(tmp_path / "c.h5", "r") as f:
        r0, r2 = f["resolutions/0"], f["resolutions/2"]
        assert r0.chunks == f["C"].chunks and r0.dtype == f["C"].dtype
        np.testing.assert_array_equal(r0[4:8, 3:6], 14)
        np.testing.assert_array_equal(r2[4:8, 3:6], 99)
        assert r2[0, 0] == 0  # tiles that never reached r stay at the fill value
        np.testing.assert_array_equal(f["C"][4:8, 3:6], 99)
        np.testing.assert_array_equal(f["C"][0:4, 0:3], 10)


def test_write_tile_validation(tmp_path):
    store = make_store(tmp_path)
    with pytest.raises(ValueError):
        store.write_tile(0, 0, np.zeros((3, 3), np.int64), 0, 1.0)  # wrong shape
    with pytest.raises(ValueError):
        store.write_tile(0, 0, np.zeros((4, 3)), 0, 1.0)  # float into int64
    with pytest.raises(IndexError):
        store.write_tile(3, 0, np.zeros((4, 3), np.int64), 0, 1.0)
    with pytest.raises(ValueError):
        store.write_tile(0, 0, np.zeros((4, 3), np.int64), 3, 1.0)  # beyond n_resolutions
    with pytest.raises(ValueError):
        store.write_tile(0, 0, np.zeros((4, 3), np.int64), 0, float("nan"))
    fill_tile(store, 0, 0, 1, 2)
    with pytest.raises(ValueError):
        fill_tile(store, 0, 0, 1, 1)  # resolutions never go down
    fill_tile(store, 2, 2, 1, 0)  # the clipped corner tile is 2 x 1
    assert store.tile_slices(2, 2) == (slice(8, 10), slice(6, 7))
    store.discard()


def test_close_and_discard_remove_scratch(tmp_path):
    store = make_store(tmp_path)
    store.publish({}, [])
    store.close({"stopped_by": "done"}, [])
    assert os.listdir(tmp_path) == ["c.h5"]
    store.close()  # idempotent
    with make_store(tmp_path, "d.h5") as store:
        fill_tile(store, 0, 0, 1, 0)
    assert sorted(os.listdir(tmp_path)) == ["c.h5"]  # nothing published, nothing left


def test_failed_publish_keeps_previous_state(tmp_path, monkeypatch):
    store = make_store(tmp_path)
    fill_tile(store, 0, 0, 1, 0)
    store.publish({"resolution": 0}, [])

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    fill_tile(store, 0, 0, 2, 1)
    monkeypatch.setattr(result_store.os, "replace", broken_replace)
    with pytest.raises(OutputError) as excinfo:
        store.publish({"resolution": 1}, [])
    assert_one_line_error(excinfo, "c.h5", "No space left")
    assert read_result(tmp_path / "c.h5")["C"][0, 0] == 1
    assert scratch_files(tmp_path) == [".c.h5.work.h5"]  # temp copy cleaned up
    monkeypatch.undo()
    store.close({"resolution": 1}, [])  # the store still works
    assert read_result(tmp_path / "c.h5")["C"][0, 0] == 2


def test_leftover_scratch_from_a_crash_is_replaced(tmp_path):
    (tmp_path / ".c.h5.work.h5").write_bytes(b"\0garbage")
    dead_pid = 2**22 + 12345  # above Linux's pid_max default: never running
    (tmp_path / f".c.h5.tmp-{dead_pid}.h5").write_bytes(b"half a copy")
    (tmp_path / "c.h5").write_text("old")
    store = make_store(tmp_path, force=True)
    fill_tile(store, 0, 0, 3, 0)
    store.close({}, [])
    assert os.listdir(tmp_path) == ["c.h5"]
    assert read_result(tmp_path / "c.h5")["C"][0, 0] == 3


# -- crash safety -------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys
    import types

    import numpy as np

    # Load mpilayer.io.result_store without the package's __init__ (which pulls in
    # the compiled kernels): faster start, and no dependence on the build.
    package = types.ModuleType("mpilayer")
    package.__path__ = [sys.argv[4]]
    sys.modules["mpilayer"] = package
    from mpilayer.io.result_store import ResultStore

    path, seed, keep_all = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    rng = np.random.default_rng(seed)
    store = ResultStore(path, (200, 150), "int64", (32, 32), 1000, {"seed": seed},
                        keep_all=keep_all, force=True)
    print("start", flush=True)
    grid = store.grid

    def write(ti, tj, r):
        rows, cols = store.tile_slices(ti, tj)
        value = r * 10000 + ti * 100 + tj
        tile = np.full((rows.stop - rows.start, cols.stop - cols.start), value, np.int64)
        store.write_tile(ti, tj, tile, r, 1.0 / (r + 1))

    timeline = []
    for r in range(1000):
        for ti, tj in rng.permutation([(i, j) for i in range(grid[0]) for j in range(grid[1])]):
            if store.tile_resolution[ti, tj] < r:
                write(ti, tj, r)
        for ti, tj in zip(rng.integers(0, grid[0], 5), rng.integers(0, grid[1], 5)):
            write(ti, tj, r + 1)  # some tiles run ahead of the global resolution
        timeline.append({"resolution": r, "elapsed_s": 0.01 * r, "stopped_by": "running"})
        store.publish({"resolution": r, "stopped_by": "running"}, timeline)
        print("published", r, flush=True)
    """
)


def check_consistent(path):
    """The published file agrees with itself: attrs, tile maps, data, timeline."""
    result = read_result(path)
    attrs, res, bounds, c = result["attrs"], result["tile_resolution"], result["tile_error_bound"], result["C"]
    assert attrs["resolution"] == res.min() == attrs["min_tile_resolution"]
    assert attrs["max_tile_error_bound"] == bounds.max()
    np.testing.assert_array_equal(bounds, 1.0 / (res + 1.0))
    assert attrs["publish_seq"] == len(result["timeline"]) == attrs["resolution"] + 1
    assert list(result["timeline"]["resolution"]) == list(range(attrs["resolution"] + 1))
    for ti in range(res.shape[0]):
        for tj in range(res.shape[1]):
            tile = c[ti * 32 : (ti + 1) * 32, tj * 32 : (tj + 1) * 32]
            np.testing.assert_array_equal(tile, int(res[ti, tj]) * 10000 + ti * 100 + tj)
    return attrs["resolution"]


def test_sigkill_never_leaves_a_torn_file(tmp_path):
    """Kill a publishing writer at random moments while reading its output."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    path = tmp_path / "c.h5"
    rng = random.Random(1234)
    reached = []
    for round_ in range(6):
        proc = subprocess.Popen(
            [sys.executable, script, str(path), str(round_), str(round_ % 2), PACKAGE_DIR],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert proc.stdout.readline() == "start\n", proc.stderr.read()
        deadline = time.monotonic() + rng.uniform(0.0, 0.5)
        while time.monotonic() < deadline:  # readers see the old or the new file only
            if path.exists():
                check_consistent(path)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        published = [int(line.split()[1]) for line in proc.stdout.read().splitlines() if line.startswith("published")]
        proc.stdout.close()
        proc.stderr.close()
        if published:
            assert check_consistent(path) >= published[-1]
            reached.append(published[-1])
        elif path.exists():
            check_consistent(path)
    assert reached, "the writer never published; make the test slower?"
    print("published resolutions when killed:", reached, "leftovers:", scratch_files(tmp_path))
    # The next run replaces all leftovers and cleans up after itself.
    store = ResultStore(path, (4, 4), "int64", (2, 2), 2, force=True)
    store.close({}, [])
    assert sorted(os.listdir(tmp_path)) == ["c.h5", "writer.py"]


# -- reading and describing ----------------------------------------------------------


def test_read_result_errors(tmp_path):
    with pytest.raises(InputError) as excinfo:
        read_result(tmp_path / "none.h5")
    assert_one_line_error(excinfo, "none.h5")
    (tmp_path / "text.h5").write_text("hello" * 100)
    with pytest.raises(InputError) as excinfo:
        read_result(tmp_path / "text.h5")
    assert_one_line_error(excinfo, "text.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["X"] = np.ones(3)
    with pytest.raises(InputError) as excinfo:
        describe_result(tmp_path / "other.h5")
    assert_one_line_error(excinfo, "other.h5", "not an mpilayer result")


def test_read_result_skips_large_c(tmp_path):
    store = make_store(tmp_path)
    store.close({}, [])
    result = read_result(tmp_path / "c.h5", max_c_bytes=10)
    assert result["C"] is None and result["shape"] == (10, 7) and result["dtype"] == np.int64


def test_describe_result(tmp_path):
    store = make_store(tmp_path, n_resolutions=4, attrs={"inputs": ("a.h5:/A", "b.h5:/B"), "bits": 8, "zz_custom": 7})
    for ti in range(3):
        for tj in range(3):
            fill_tile(store, ti, tj, 1, 2 if ti else 1, bound=0.25)
    attrs = {
        "resolution": 1,
        "exact": False,
        "error_bound": 0.25,
        "stopped_by": "deadline",
        "elapsed_s": 12.5,
        "deadline_s": 12.0,
        "split": (4, 4),
    }
    timeline = [
        {"resolution": 0, "elapsed_s": 3.25, "error_bound": 12.0},
        {"resolution": 1, "elapsed_s": 12.5, "error_bound": 0.25},
    ]
    store.close(attrs, timeline)
    text = describe_result(tmp_path / "c.h5")
    for needle in ["10 x 7 int64", "3 x 3 tiles of 4 x 3", "1 of 0..3", "exact", "no", "0.25",
                   "deadline", "elapsed 12.5 s", "deadline 12 s", "a.h5:/A, b.h5:/B", "bits", "split",
                   "4, 4", "zz_custom", "tile resolutions (9 tiles)", "timeline:", "3.25"]:
        assert needle in text, (needle, text)
    lines = text.splitlines()
    attr_names = [line.split()[0] for line in lines[lines.index("attributes of /C:") + 1 :] if line.startswith("  ")]
    assert attr_names.index("resolution") < attr_names.index("bits") < attr_names.index("zz_custom")
    histogram = lines[lines.index("tile resolutions (9 tiles):") + 1 :][:5]
    assert [line.split()[:2] for line in histogram] == [["resolution", "tiles"], ["0", "0"], ["1", "3"],
                                                        ["2", "6"], ["3", "0"]]
    header = lines[lines.index("timeline:") + 1]
    assert header.split() == ["resolution", "elapsed_s", "error_bound"]


def test_describe_result_without_placeholders(tmp_path):
    """No deadline: 'none', not -1 / 0; resolutions_total equal to n_resolutions is not listed twice."""
    store = make_store(tmp_path, n_resolutions=2)
    for ti in range(3):
        for tj in range(3):
            fill_tile(store, ti, tj, 1, 1, bound=0.0)
    store.close({"resolution": 1, "exact": True, "deadline_s": -1.0, "overshoot_s": 0.0, "resolutions_total": 2}, [])
    text = describe_result(tmp_path / "c.h5")
    attrs = dict(line.split(None, 1) for line in text.split("attributes of /C:\n")[1].split("\n\n")[0].splitlines())
    assert attrs["deadline_s"] == "none" and attrs["overshoot_s"] == "none", text
    assert "resolutions_total" not in attrs and attrs["n_resolutions"] == "2", text
    assert "1 of 0..1 (final)" in text and "no deadline" in text and "-1" not in text.split("\n", 1)[1]


def test_info_describes_the_other_commands_outputs(tmp_path):
    """`mpilayer info` on a stream / infer / adaptive output (no /C): its kind, attributes,
    datasets and tables; a file of none of these kinds stays a one-line error."""
    from mpilayer.errors import InputError
    from mpilayer.io.result_info import describe_result

    table = np.zeros(3, dtype=[("resolution", "i8"), ("settled", "f8")])
    table["resolution"], table["settled"] = [0, 1, 2], [0.5, 0.9, 1.0]
    for name, extra, kind in (("s.h5", "items", "stream"), ("p.h5", "predictions", "inference"),
                              ("d.h5", "per_resolution", "adaptive")):
        with h5py.File(tmp_path / name, "w") as f:
            f.attrs["bits"] = 8
            f.create_dataset("per_resolution" if extra != "per_resolution" else "table", data=table)
            f.create_dataset(extra, data=table if extra == "per_resolution" else np.arange(7))
        text = describe_result(tmp_path / name)
        assert text.splitlines()[0].endswith(f"mpilayer {kind} result (mpilayer {'infer' if kind == 'inference' else kind})")
        assert "bits  8" in text and f"/{extra}" in text and "resolution  settled" in text and "0.9" in text
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["A"] = np.zeros((2, 2))
    with pytest.raises(InputError, match="not an mpilayer result"):
        describe_result(tmp_path / "x.h5")


def test_part_sync_syncs_in_the_background_and_names_a_failed_part(tmp_path, monkeypatch):
    """write_part with a PartSync: the part is in place and readable at once, its file is
    fsynced on the sync's thread (then closed) and wait() fsyncs the directory too; an fsync
    that fails makes wait() raise one OutputError naming that part."""
    from mpilayer.io import distributed_store as ds

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(ds.os, "fsync", lambda fd: synced.append(os.fstat(fd).st_ino) or real_fsync(fd))
    open_fds = lambda: len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0  # noqa: E731
    sync = ds.PartSync()
    paths = [str(tmp_path / "r1" / f"t0_{j}.h5") for j in range(3)]
    (tmp_path / "warm").write_bytes(b"x")
    sync.add(os.open(tmp_path / "warm", os.O_RDONLY), str(tmp_path / "warm"))  # (its thread exists from here)
    sync.wait()
    fds = open_fds()
    for j, path in enumerate(paths):
        ds.write_part(path, np.full((4, 5), float(j)), sync)
        with h5py.File(path) as f:  # readable before any wait
            assert f[ds.PART_DATASET][0, 0] == j
    sync.wait()
    assert open_fds() == fds  # each part's descriptor closed after its fsync
    inodes = {os.stat(p).st_ino for p in paths}
    assert inodes <= set(synced) and os.stat(tmp_path / "r1").st_ino in synced  # every part, then the directory
    assert sorted(os.listdir(tmp_path / "r1")) == sorted(os.path.basename(p) for p in paths)  # no temp file left
    monkeypatch.setenv("MPILAYER_FAULT", "part-sync")
    ds.write_part(paths[0], np.zeros((4, 5)), sync)
    with pytest.raises(OutputError, match="cannot write result part .*t0_0.h5.*Input/output error"):
        sync.wait()
    assert open_fds() == fds
    sync.wait()  # reported once
