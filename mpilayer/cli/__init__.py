"""Command line of mpilayer: ``mpilayer <command> ...`` (also ``python -m mpilayer``).

Each command's work lives in ``jobs/`` (installed as ``mpilayer.jobs``). Here, one module per
command (``NAME``, its one-line ``HELP``) adds its parser and options (``register(subparsers)``,
shared options from :mod:`mpilayer.cli.options`) and names the function that runs it,
"module:function", imported only when that command is chosen: building the parser imports
neither numpy nor the jobs. This module sets one BLAS thread per rank, parses, and turns user
errors into one line on stderr and a non-zero exit.
"""
from __future__ import annotations

import gc
import os
import sys
import time

START = time.monotonic()  # a run's deadline counts from here: the start of the program

# One BLAS/OpenMP thread per rank unless the caller set otherwise: ranks, not threads, use the
# cores. Set before anything imports numpy.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import importlib  # noqa: E402

from mpilayer.cli import (adaptive, bench, cleanup, deadline_experiment, example, example_model,  # noqa: E402
                          example_stream, infer, info, matmul, scaling, selftest, stream)
from mpilayer.cli.options import Parser, RawDescriptionFormatter, check_output  # noqa: E402
from mpilayer.errors import MpilayerError  # noqa: E402

# The commands in the order `mpilayer --help` lists them.
COMMANDS = (matmul, example, info, cleanup, selftest, bench, scaling, example_model, infer, stream,
            example_stream, adaptive, deadline_experiment)

EPILOG = """\
examples:
  mpilayer example -o a.h5 b.h5 --shape 2048,2048,2048 --dtype int8
  mpiexec -n 4 mpilayer matmul a.h5:/A b.h5:/B -o c.h5 --deadline 30
  mpilayer info c.h5
  mpilayer bench kernels --shape 2048

Resolutions are numbered from 0 (the coarsest) to N-1 (the exact product of the quantised
operands) everywhere: progress lines ("resolution 0 of 0..3"), `mpilayer info`, the HDF5
files (/resolutions/<r>, tile_resolution) and the Python API.

Every command that writes takes -o/--output and refuses to overwrite without --force; -q/--quiet
leaves only the final line or table. --deadline always stops the whole run after that many
seconds (stream's per-item deadline is --item-deadline).
"""


class _VersionAction(argparse.Action):
    """--version, looked up only when asked for (importlib.metadata costs ~50 ms at every start)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import PackageNotFoundError, version
        try:
            text = version("mpilayer")
        except PackageNotFoundError:
            text = "unknown (not installed)"
        print(f"mpilayer {text}")
        parser.exit()


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Every command with its options; with ``only``, just that command's options and the others
    by name and help (what ``mpilayer --help`` lists): every rank of an MPI run parses its command
    line, and declaring all options costs about as much as the rest of the start-up."""
    parser = Parser(
        prog="mpilayer", formatter_class=RawDescriptionFormatter, epilog=EPILOG,
        description="Layered-resolution matrix multiplication: a coarse, certified C = A @ B first, "
                    "refined to the exact product of the quantised operands, under MPI with a deadline.")
    parser.add_argument("--version", action=_VersionAction, help="show the installed version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in COMMANDS:
        if only is None or command.NAME == only:
            command.register(sub)
        else:
            sub.add_parser(command.NAME, help=command.HELP)
    return parser


def _command_word(argv) -> str:
    """The command a command line names: its first word that is not an option (no top-level
    option takes a value), "" if none."""
    return next((word for word in argv if not word.startswith("-")), "")


NO_MPI = ("no MPI library found (mpi4py cannot load libmpi): pip install 'mpilayer[mpich]' for the MPICH "
          "wheel (with mpiexec), or install your system's MPI and build mpi4py against it (README: System MPI)")


def _no_mpi_library(err: RuntimeError) -> bool:
    """mpi4py's wheels load libmpi at import: on a machine without one, its import raises this."""
    import traceback

    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and "mpi4py" in frames[-1].filename and "cannot load MPI library" in str(err)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(only=_command_word(argv)).parse_args(argv)
    check_output(args)
    args.start = START  # process start: start-up counts against --deadline
    module, function = args._run.split(":")
    try:
        return getattr(importlib.import_module(module), function)(args)
    except MpilayerError as err:
        print(f"mpilayer: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        if not _no_mpi_library(err):
            raise
        print(f"mpilayer: error: {NO_MPI}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mpilayer: interrupted", file=sys.stderr)
        return 130


def entry_point() -> None:
    """Console script: a crash on any rank aborts the whole MPI job instead of hanging it."""
    try:
        code = main()
    except SystemExit:
        raise
    except BrokenPipeError:  # `mpilayer info c.h5 | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except BaseException:
        import traceback
        traceback.print_exc()
        mpi = sys.modules.get("mpi4py.MPI")
        if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized() and mpi.COMM_WORLD.Get_size() > 1:
            mpi.COMM_WORLD.Abort(1)
        sys.exit(1)
    # The interpreter's teardown then skips its garbage collections over every object the
    # modules made (MPI finalize, atexit handlers and deallocation still run): measured on 3
    # ranks, 2 cores, last output to mpiexec's exit 75-103 ms with them, 28-64 ms without.
    gc.freeze()
    sys.exit(code)
