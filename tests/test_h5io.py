"""Tests of the input side: dataset specs, MatrixSource, example data."""

import os

import h5py
import numpy as np
import pytest

from mpilayer.errors import InputError, MpilayerError, OutputError
from mpilayer.io import example_data
from mpilayer.io.example_data import write_example
from mpilayer.io.h5io import SUPPORTED_DTYPES, MatrixSource, check_chain, check_finite, parse_dataset_spec

DTYPES = [str(d) for d in SUPPORTED_DTYPES]


def assert_one_line_error(excinfo, *needles):
    """The CLI prints str(err) after 'mpilayer: error:' -- one line, naming things."""
    message = str(excinfo.value)
    assert isinstance(excinfo.value, MpilayerError)
    assert "\n" not in message and message.strip() == message
    for needle in needles:
        assert str(needle) in message, (needle, message)


def write(path, name="/A", data=None, **kwargs):
    with h5py.File(path, "a") as f:
        f.create_dataset(name, data=data, **kwargs)
    return f"{path}:{name}"


def random_matrix(rng, shape, dtype):
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


# -- parse_dataset_spec ---------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("a.h5:/A", ("a.h5", "/A")),
        ("dir/a.h5:/group/sub/A", ("dir/a.h5", "/group/sub/A")),
        ("C:/data/a.h5:/A", ("C:/data/a.h5", "/A")),
        ("odd:name.h5:/A", ("odd:name.h5", "/A")),
        ("a.h5", ("a.h5", "/default")),
    ],
)
def test_parse_dataset_spec(spec, expected):
    assert parse_dataset_spec(spec, default_dataset="/default") == expected


def test_parse_dataset_spec_default_gets_leading_slash():
    assert parse_dataset_spec("a.h5", "A") == ("a.h5", "/A")


def test_parse_dataset_spec_without_dataset_or_file():
    with pytest.raises(InputError) as excinfo:
        parse_dataset_spec("a.h5")
    assert_one_line_error(excinfo, "a.h5", "FILE:/DATASET")
    with pytest.raises(InputError) as excinfo:
        parse_dataset_spec(":/A")
    assert_one_line_error(excinfo, "FILE:/DATASET")


# -- MatrixSource: validation -------------------------------------------------


def test_missing_file(tmp_path):
    spec = f"{tmp_path}/nope.h5:/A"
    with pytest.raises(InputError) as excinfo:
        MatrixSource(spec)
    assert_one_line_error(excinfo, spec, "does not exist")


def test_not_hdf5(tmp_path):
    path = tmp_path / "text.h5"
    path.write_text("not hdf5\n" * 100)
    with pytest.raises(InputError) as excinfo:
        MatrixSource(f"{path}:/A")
    assert_one_line_error(excinfo, f"{path}:/A", "not an HDF5 file")


def test_truncated_hdf5(tmp_path):
    path = tmp_path / "cut.h5"
    write(path, data=np.ones((200, 200)))
    with open(path, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(InputError) as excinfo:
        with MatrixSource(f"{path}:/A") as src:
            src.read(slice(None), slice(None))
    assert_one_line_error(excinfo, f"{path}:/A")


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(InputError) as excinfo:
        MatrixSource(f"{tmp_path}:/A")
    assert_one_line_error(excinfo, f"{tmp_path}:/A", "directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    path = tmp_path / "secret.h5"
    write(path, data=np.ones((2, 2)))
    path.chmod(0)
    with pytest.raises(InputError) as excinfo:
        MatrixSource(f"{path}:/A")
    assert_one_line_error(excinfo, f"{path}:/A", "permission denied")


def test_permission_error_from_hdf5_is_wrapped(tmp_path, monkeypatch):
    """Covers unreadable files even when the tests run as root."""
    path = tmp_path / "a.h5"
    write(path, data=np.ones((2, 2)))

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(h5py, "File", refuse)
    with pytest.raises(InputError) as excinfo:
        MatrixSource(f"{path}:/A")
    assert_one_line_error(excinfo, f"{path}:/A", "permission denied")


def test_missing_dataset_and_group(tmp_path):
    path = tmp_path / "a.h5"
    write(path, "/g/A", data=np.ones((2, 2)))
    with pytest.raises(InputError) as excinfo:
        MatrixSource(f"{path}:/B")
    assert_one_line_error(excinfo, f"{path}:/B", "no such dataset")
    with pytest.raises(InputError) as excinfo:
        MatrixSource(f"{path}:/g")
    assert_one_line_error(excinfo, f"{path}:/g", "group")
    with pytest.raises(InputError) as excinfo:
        MatrixSource(f"{path}:/g/A/x")
    assert_one_line_error(excinfo, f"{path}:/g/A/x")


@pytest.mark.parametrize(
    "data, needle",
    [
        (np.ones(5), "2-D"),
        (np.ones((2, 2, 2)), "2-D"),
        (np.float64(1.0), "2-D"),
        (np.ones((0, 3)), "empty"),
    ],
)
def test_bad_shapes(tmp_path, data, needle):
    spec = write(tmp_path / "a.h5", data=data)
    with pytest.raises(InputError) as excinfo:
        MatrixSource(spec)
    assert_one_line_error(excinfo, spec, needle)


@pytest.mark.parametrize(
    "data, needle",
    [
        (np.ones((2, 2), dtype=np.complex128), "complex128"),
        (np.ones((2, 2), dtype=bool), "bool"),
        (np.ones((2, 2), dtype=np.int64), "int64"),
        (np.ones((2, 2), dtype=np.uint32), "uint32"),
        (np.ones((2, 2), dtype=np.uint64), "uint64"),
        (np.ones((2, 2), dtype=np.float16), "float16"),
        (np.array([["a", "b"], ["c", "d"]], dtype="S1"), "not supported"),
        (np.zeros((2, 2), dtype=[("x", "f8"), ("y", "i4")]), "not supported"),
    ],
)
def test_unsupported_dtypes(tmp_path, data, needle):
    spec = write(tmp_path / "a.h5", data=data)
    with pytest.raises(InputError) as excinfo:
        MatrixSource(spec)
    assert_one_line_error(excinfo, spec, needle)


def test_int64_message_says_convert(tmp_path):
    spec = write(tmp_path / "a.h5", data=np.ones((2, 2), dtype=np.int64))
    with pytest.raises(InputError) as excinfo:
        MatrixSource(spec)
    assert_one_line_error(excinfo, "convert")


def test_enum_dtype_rejected(tmp_path):
    path = tmp_path / "a.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("A", data=np.zeros((2, 2), np.int8), dtype=h5py.enum_dtype({"R": 0, "G": 1}, basetype="i1"))
    with pytest.raises(InputError) as excinfo:
        MatrixSource(f"{path}:/A")
    assert_one_line_error(excinfo, f"{path}:/A", "enum")


# -- MatrixSource: reading ----------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "chunked", "gzip"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_read_equals_numpy_slicing(tmp_path, dtype, layout):
    rng = np.random.default_rng(hash((dtype, layout)) % 2**32)
    data = random_matrix(rng, (37, 23), dtype)
    options = {"contiguous": {}, "chunked": {"chunks": (8, 5)}, "gzip": {"chunks": (10, 7), "compression": "gzip"}}
    spec = write(tmp_path / "a.h5", data=data, **options[layout])
    with MatrixSource(spec) as src:
        assert src.shape == (37, 23) and src.dtype == np.dtype(dtype)
        assert src.is_integer == (np.dtype(dtype).kind in "iu")
        assert src.label == spec
        for _ in range(25):
            r0, r1 = sorted(rng.integers(-3, 42, size=2))
            c0, c1 = sorted(rng.integers(-3, 28, size=2))
            rows, cols = slice(int(r0), int(r1)), slice(int(c0), int(c1))
            block = src.read(rows, cols)
            np.testing.assert_array_equal(block, data[rows, cols])
            assert block.dtype == np.dtype(dtype) and block.flags.c_contiguous
        np.testing.assert_array_equal(src.read(slice(None), slice(None)), data)


def test_read_big_endian_returns_native(tmp_path):
    data = np.arange(12, dtype=">f8").reshape(3, 4)
    with MatrixSource(write(tmp_path / "a.h5", data=data)) as src:
        block = src.read(slice(1, 3), slice(0, 2))
    assert block.dtype == np.dtype("float64") and block.dtype.isnative
    np.testing.assert_array_equal(block, data[1:3, :2])


def test_read_rejects_steps_and_closed(tmp_path):
    src = MatrixSource(write(tmp_path / "a.h5", data=np.ones((4, 4))))
    with pytest.raises(ValueError):
        src.read(slice(0, 4, 2), slice(None))
    src.close()
    src.close()
    with pytest.raises(ValueError):
        src.read(slice(None), slice(None))


def test_corrupt_chunk_is_input_error(tmp_path):
    path = tmp_path / "a.h5"
    spec = write(path, data=np.arange(64 * 64, dtype="f8").reshape(64, 64), chunks=(32, 32), compression="gzip")
    with h5py.File(path, "r") as f:
        info = f["A"].id.get_chunk_info(1)
    with open(path, "r+b") as f:
        f.seek(info.byte_offset)
        f.write(b"\xff" * info.size)
    with MatrixSource(spec) as src:
        src.read(slice(32, 64), slice(0, 32))  # other chunks still fine
        with pytest.raises(InputError) as excinfo:
            src.read(slice(0, 32), slice(0, 64))
    assert_one_line_error(excinfo, spec, "rows 0:32")


# -- finiteness and shape checks ------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_finite_names_global_position(tmp_path, bad):
    data = np.ones((10, 8), dtype="f4")
    data[7, 5] = bad
    with MatrixSource(write(tmp_path / "a.h5", data=data)) as src:
        rows, cols = slice(4, 10), slice(2, 8)
        src.check_finite(src.read(slice(0, 4), cols), slice(0, 4), cols)
        with pytest.raises(InputError) as excinfo:
            src.check_finite(src.read(rows, cols), rows, cols)
    assert_one_line_error(excinfo, src.label, "NaN or Inf", "row 7, column 5")


def test_check_finite_ignores_integers():
    """Integers cannot be NaN: no scan, no error; the same call rejects a float NaN."""
    assert check_finite(np.full((2, 2), 127, np.int8), "x.h5:/A") is None
    with pytest.raises(InputError):
        check_finite(np.array([[1.0, np.nan]]), "x.h5:/A")


def test_check_chain(tmp_path):
    path = tmp_path / "ab.h5"
    write(path, "/A", data=np.ones((3, 4)))
    write(path, "/B", data=np.ones((5, 2)))
    write(path, "/B2", data=np.ones((4, 2)))
    with MatrixSource(f"{path}:/A") as a, MatrixSource(f"{path}:/B") as b, MatrixSource(f"{path}:/B2") as b2:
        check_chain(a, b2)
        with pytest.raises(InputError) as excinfo:
            check_chain(a, b)
    assert_one_line_error(excinfo, a.label, b.label, "3x4", "5x2")


# -- example data -----------------------------------------------------------------


def read_all(spec):
    with MatrixSource(spec) as src:
        return src.read(slice(None), slice(None))


@pytest.mark.parametrize("dtype", DTYPES)
def test_example_data_dtypes_and_determinism(tmp_path, dtype):
    a1, b1 = write_example(tmp_path / "a1.h5", tmp_path / "b1.h5", (150, 120, 90), dtype, seed=3)
    a2, b2 = write_example(tmp_path / "a2.h5", tmp_path / "b2.h5", (150, 120, 90), dtype, seed=3)
    a3, _ = write_example(tmp_path / "a3.h5", tmp_path / "b3.h5", (150, 120, 90), dtype, seed=4)
    A, B = read_all(a1), read_all(b1)
    assert A.shape == (150, 120) and B.shape == (120, 90)
    assert A.dtype == np.dtype(dtype) == B.dtype
    np.testing.assert_array_equal(A, read_all(a2))
    np.testing.assert_array_equal(B, read_all(b2))
    assert not np.array_equal(A, read_all(a3))
    assert not np.array_equal(A[:90, :90], B[:90, :90])
    with h5py.File(a1[: -len(":/A")], "r") as f:
        assert f["A"].chunks is not None
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        assert A.min() >= info.min and A.max() <= info.max
        span = float(info.max) - float(info.min)
        assert A.min() <= info.min + 0.01 * span and A.max() >= info.max - 0.01 * span
        if np.dtype(dtype).itemsize == 1:
            assert A.min() == info.min and A.max() == info.max
    else:
        assert abs(A.mean()) < 0.05 and 0.9 < A.std() < 1.1


def test_example_data_same_file_and_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(example_data, "BLOCK_BYTES", 1000)  # force many row blocks
    path = tmp_path / "ab.h5"
    a, b = write_example(path, path, (50, 40, 30), "float64", seed=1, a_dataset="X", b_dataset="/g/Y")
    assert (a, b) == (f"{path}:/X", f"{path}:/g/Y")
    A, B = read_all(a), read_all(b)
    assert A.shape == (50, 40) and B.shape == (40, 30)
    assert np.all(A != 0) and np.all(B != 0)  # every block written
    again, _ = write_example(tmp_path / "c.h5", tmp_path / "c.h5", (50, 40, 30), "float64", seed=1)
    np.testing.assert_array_equal(A, read_all(again))


def test_example_data_refuses_existing_without_force(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    write_example(a, b, (4, 4, 4), "int8")
    with pytest.raises(OutputError) as excinfo:
        write_example(a, b, (4, 4, 4), "int8")
    assert_one_line_error(excinfo, str(a), "--force")
    write_example(a, b, (6, 5, 4), "int16", force=True)
    assert read_all(f"{a}:/A").shape == (6, 5)
    assert sorted(os.listdir(tmp_path)) == ["a.h5", "b.h5"]  # no temp files


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"shape": (0, 2, 2)}, InputError),
        ({"shape": (2, 2)}, InputError),
        ({"dtype": "int64"}, InputError),
        ({"dtype": "nonsense"}, InputError),
        ({"b_path": "SAME", "b_dataset": "/A"}, InputError),
    ],
)
def test_example_data_bad_options(tmp_path, kwargs, error):
    args = {"a_path": tmp_path / "a.h5", "b_path": tmp_path / "b.h5", "shape": (2, 2, 2)}
    args.update(kwargs)
    if args["b_path"] == "SAME":
        args["b_path"] = args["a_path"]
    with pytest.raises(error) as excinfo:
        write_example(**args)
    assert_one_line_error(excinfo)


def test_example_data_missing_directory(tmp_path):
    with pytest.raises(OutputError) as excinfo:
        write_example(tmp_path / "no" / "a.h5", tmp_path / "b.h5", (2, 2, 2))
    assert_one_line_error(excinfo, "does not exist")
