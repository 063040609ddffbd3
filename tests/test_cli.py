"""One vocabulary on the command line: -o/--output, --force and -q on every command that writes,
--shape/--tile/--component-bits spelled one way, --deadline with one meaning, 0-based resolutions
in the help; old spellings kept as deprecated aliases. Parsing only: nothing is launched."""
import argparse
import importlib
import os
import subprocess
import sys

import h5py
import pytest

from mpilayer import cli
from mpilayer.cli import options

WRITERS = ["matmul", "example", "example-stream", "example-model", "adaptive", "infer", "stream", "scaling",
           "deadline-experiment"]


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def _commands(parser=None):
    """(name, parser) of every command and bench subcommand."""
    top = _subparsers(parser or cli.build_parser())
    for name, p in top.items():
        if name == "bench":
            for sub, q in _subparsers(p).items():
                yield f"bench {sub}", q
        else:
            yield name, p


def _options(p):
    return {s: a for a in p._actions for s in a.option_strings}


def _parse(*argv):
    return cli.build_parser().parse_args([str(a) for a in argv])


@pytest.mark.parametrize("name", WRITERS)
def test_writers_take_output_force_quiet(name):
    opts = _options(dict(_commands())[name])
    for flag in ("-o", "--output", "--force", "-q", "--quiet"):
        assert flag in opts and opts[flag].help != argparse.SUPPRESS, (name, flag)
    for old in ("--out", "--json"):
        assert old not in opts or opts[old].help == argparse.SUPPRESS, (name, old)


def test_every_command_says_what_it_does():
    for name, p in _commands():
        assert p.description and len(p.description) > 40, name


def test_top_help_numbers_resolutions_from_zero():
    text = cli.build_parser().format_help()
    assert "numbered from 0" in text and "N-1" in text


def test_one_declaration_of_component_bits_and_tile():
    for name, p in _commands():
        opts = _options(p)
        if "--component-bits" in opts:
            assert opts["--component-bits"].type is options.component_bits, name
        if "--tile" in opts:
            assert opts["--tile"].type is options.tile, name
        if "--shape" in opts and name != "example-stream":
            assert opts["--shape"].type in (options.shape, options.square_shape), name


def test_shape_and_tile_spellings():
    args = _parse("example", "-o", "a.h5", "b.h5", "--shape", "64")
    assert args.shape == (64, 64, 64) and args.output == ["a.h5", "b.h5"]
    assert _parse("example", "-o", "a", "b", "--shape", "2,3,4").shape == (2, 3, 4)
    assert _parse("matmul", "a:/A", "b:/B", "-o", "c", "--tile", "32").tile == (32, 32)
    assert _parse("matmul", "a:/A", "b:/B", "-o", "c", "--tile", "32,16").tile == (32, 16)
    assert _parse("bench", "kernels", "--shape", "128").n == 128
    assert _parse("bench", "stragglers", "--tile", "32").tile == (32, 32)
    with pytest.raises(SystemExit):
        _parse("bench", "kernels", "--shape", "64,32,64")  # square products only


def test_deadline_has_one_meaning(capsys):
    assert _parse("matmul", "a:/A", "b:/B", "-o", "c", "--deadline", "5").deadline == 5
    assert _parse("stream", "a:/A", "x:/X", "-o", "s", "--item-deadline", "0.5").item_deadline == 0.5
    assert _parse("deadline-experiment", "-o", "d", "--threshold", "0.2").threshold == 0.2
    for argv, new in ((["stream", "a:/A", "x:/X", "-o", "s"], "--item-deadline"),
                      (["deadline-experiment", "-o", "d"], "--threshold")):
        with pytest.raises(SystemExit) as exc:
            _parse(*argv, "--deadline", "1")
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and new in err[0], err


def test_old_spellings_still_work(capsys):
    assert _parse("scaling", "--out", "rep").output == "rep"
    assert _parse("deadline-experiment", "--out", "d").output == "d"
    args = _parse("bench", "kernels", "--n", "64", "--json", "k.json")
    assert (args.n, args.output) == (64, "k.json")
    args = _parse("deadline-experiment", "-o", "d", "--components", "3", "--tiles", "2")
    assert (args.components, args.row_blocks) == (3, 2)
    err = capsys.readouterr().err
    for old in ("--out", "--n", "--json", "--components", "--tiles"):
        assert f"{old} is deprecated" in err, old


def test_output_is_required(capsys):
    for argv in (["matmul", "a:/A", "b:/B"], ["deadline-experiment"], ["example", "--shape", "8"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
        assert "required: -o/--output" in capsys.readouterr().err


def test_example_outputs_force_quiet(tmp_path, capsys):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    assert cli.main(["example", "-o", str(a), str(b), "--shape", "8,6,4"]) == 0
    assert "wrote" in capsys.readouterr().out
    with h5py.File(a) as fa, h5py.File(b) as fb:
        assert fa["A"].shape == (8, 6) and fb["B"].shape == (6, 4)
    assert cli.main(["example", "-o", str(a), str(b), "--shape", "8"]) == 2  # exists: no --force
    assert "--force" in capsys.readouterr().err
    assert cli.main(["example", "-o", str(a), str(b), "--shape", "8", "--force", "-q"]) == 0
    assert capsys.readouterr().out == ""
    assert cli.main(["example", str(a), str(b), "--shape", "8", "--force"]) == 0  # old positional spelling
    assert "deprecated" in capsys.readouterr().err


def test_every_command_runs_a_function_that_exists():
    for name, p in _commands():
        module, function = p.get_default("_run").split(":")
        assert callable(getattr(importlib.import_module(module), function)), name


def test_building_the_parser_imports_no_job_and_not_numpy():
    """`mpilayer --help` stays cheap, and the BLAS thread count is set before anything imports numpy."""
    code = ("import os, sys\nos.environ.pop('OPENBLAS_NUM_THREADS', None)\nimport mpilayer.cli\n"
            "mpilayer.cli.build_parser().format_help()\n"
            "print(os.environ['OPENBLAS_NUM_THREADS'], sorted(m for m in sys.modules if m.split('.')[0] == 'numpy'"
            " or m.startswith('mpilayer.jobs')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "[]"], out


def test_a_command_built_alone_is_the_same():
    """main builds only the chosen command's options (the others by name and help): same help, same parse."""
    assert cli.build_parser(only="").format_help() == cli.build_parser().format_help()
    for name, p in _commands():
        alone = dict(_commands(cli.build_parser(only=name.split()[0])))[name]
        assert alone.format_help() == p.format_help(), name
    argv = ["matmul", "a:/A", "b:/B", "-o", "c", "--tile", "32", "--deadline", "5"]
    assert cli.build_parser(only="matmul").parse_args(argv) == cli.build_parser().parse_args(argv)


def test_no_mpi_library_is_one_line(tmp_path):
    """Without an MPI library (a plain `pip install .` on a machine with none), an MPI command says
    what to install in one line, exit 2, instead of mpi4py's traceback. mpi4py's wheels load libmpi
    at import and honour MPI4PY_LIBMPI, which here points to nothing."""
    from mpilayer.io.example_data import write_example

    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    write_example(a, b, (20, 30, 10), "int8", 0)
    env = {**os.environ, "MPI4PY_LIBMPI": str(tmp_path / "no" / "libmpi.so.12")}
    proc = subprocess.run([sys.executable, "-m", "mpilayer", "matmul", f"{a}:/A", f"{b}:/B", "-o", str(tmp_path / "c.h5")],
                          capture_output=True, text=True, env=env, timeout=120)
    if proc.returncode == 0:
        pytest.skip("this mpi4py is built against a fixed MPI library (MPI4PY_LIBMPI has no effect)")
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no MPI library found" in lines[0] and "mpilayer[mpich]" in lines[0], proc.stderr
    assert not (tmp_path / "c.h5").exists()
