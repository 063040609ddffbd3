"""What the commands' parsers share: argument types, the option helpers every command that
takes an option uses (one declaration each, so one spelling and one help text), the old
spellings kept as hidden aliases, and one-line usage errors printed by rank 0 only.

Imports only the standard library: the parser is built before numpy may be imported.
"""
from __future__ import annotations

import argparse
import functools
import os
import re
import sys

DEFAULT_MEMORY = 2 * 2**30


# --- the parser: one-line usage errors, printed once; old spellings

def launched_rank() -> int:
    """This process's rank as the MPI launcher set it (0 when not under MPI)."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


@functools.lru_cache(maxsize=None)
def _help_width(columns) -> int:
    import shutil
    return shutil.get_terminal_size().columns - 2  # as argparse.HelpFormatter; COLUMNS overrides the terminal


class _OneWidth:
    """argparse measures the terminal for every option it declares (~190 times to build the
    parser): measured once per COLUMNS value instead, the help is the same and starts faster."""

    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None, **kw):
        width = _help_width(os.environ.get("COLUMNS")) if width is None else width
        super().__init__(prog, indent_increment, max_help_position, width, **kw)


class Formatter(_OneWidth, argparse.HelpFormatter):
    pass


class RawDescriptionFormatter(_OneWidth, argparse.RawDescriptionHelpFormatter):
    pass


class Parser(argparse.ArgumentParser):
    """Usage errors as one line, printed by rank 0 only (every rank parses the same line)."""

    def __init__(self, *args, formatter_class=Formatter, **kw):
        super().__init__(*args, formatter_class=formatter_class, **kw)

    def error(self, message):
        if launched_rank() == 0:
            print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


class Deprecated(argparse.Action):
    """A hidden old spelling of an option: works, with a one-line note on stderr."""

    def __init__(self, option_strings, dest, new="", **kw):
        self.new = new
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        if launched_rank() == 0:
            print(f"{parser.prog}: note: {option_string} is deprecated, use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


class Renamed(argparse.Action):
    """A hidden old option whose meaning now has another name: a one-line usage error."""

    def __init__(self, option_strings, dest, new="", **kw):
        self.new = new
        super().__init__(option_strings, argparse.SUPPRESS, help=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is not an option of {parser.prog.split(' ', 1)[-1]}; use {self.new}")


# --- argument types: a bad value is a one-line usage error naming the option

def ints(text: str, count: int, what: str):
    """``count`` positive comma-separated integers (``what``: the option, for the message)."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be {count} comma-separated integers, not {text!r}")
    if len(values) != count or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{what} must be {count} positive comma-separated integers, not {text!r}")
    return values


def component_bits(text: str):
    """auto, W (W-bit components) or W,W,... (the widths, most significant first)."""
    if text == "auto":
        return text
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--component-bits must be integers like 1 or 1,1,2,4, not {text!r}")
    return values[0] if len(values) == 1 else values


def byte_size(text: str) -> int:
    """--memory: bytes, or a size with a K/M/G/T suffix (powers of 2)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"--memory must be a size like 2G, 512M or 1000000, not {text!r}")
    value = int(float(match.group(1)) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[match.group(2)])
    if value < 32 * 2**20:  # below this, fixed MPI and interpreter overheads dominate
        raise argparse.ArgumentTypeError(f"--memory must be at least 32M, not {text!r}")
    return value


def seconds(text: str) -> float:
    """A duration >= 0 (NaN refused too)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not {text!r}")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds, not {text!r}")
    return value


def service_time(text: str):
    """--service-time MODEL, parsed where the model is defined (imported when given: numbers only)."""
    from mpilayer.core.service_time import parse_service_time
    try:
        return parse_service_time(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--service-time").strip(" :"))


def shape(text: str):
    """--shape N (square: N,N,N) or M,K,N."""
    values = ints(text, 3 if "," in text else 1, "--shape")
    return values * 3 if len(values) == 1 else values


def square_shape(text: str) -> int:
    """--shape of the square benchmarks: N or N,N,N -> N."""
    m, k, n = shape(text)
    if not m == k == n:
        raise argparse.ArgumentTypeError(f"this benchmark times square products: --shape N, not {text!r}")
    return n


def tile(text: str):
    """--tile ROWS,COLS, or a single number for a square tile."""
    values = ints(text, 2 if "," in text else 1, "--tile")
    return values * 2 if len(values) == 1 else values


def format_component_bits(value) -> str:
    """The --component-bits text of a parsed value (for commands that launch others)."""
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


# --- options shared by commands: one declaration each

def add_output(p, metavar, help, *, required=True, default=None, nargs=None, quiet=None, old=None) -> None:
    """-o/--output (every output file or directory), --force and, when ``quiet`` says what
    -q leaves on stdout, -q/--quiet. ``old``: a hidden deprecated spelling of -o; two files
    (``nargs``) may also be given as hidden deprecated positionals. :func:`check_output` checks."""
    aliased = required and (old or nargs)  # an old spelling may give it instead: checked after parsing
    p.add_argument("-o", "--output", metavar=metavar, nargs=nargs, required=required and not aliased,
                   default=None if required else default, help=help + (" (required)" if aliased else ""))
    if old:
        p.add_argument(old, dest="output", metavar=metavar, nargs=nargs, action=Deprecated, new="-o/--output")
    p.set_defaults(_output_parser=p if aliased else None)
    p.add_argument("--force", action="store_true", help="overwrite existing output")
    if quiet:
        p.add_argument("-q", "--quiet", action="store_true", help=f"no progress lines; {quiet}")
    if nargs:
        p.add_argument("files", nargs="*", help=argparse.SUPPRESS)  # old spelling: the files positional


def add_component_bits(p, default="auto", help=None, auto=True) -> None:
    """--component-bits, the one declaration every command uses (``auto``: whether it takes auto)."""
    p.add_argument("--component-bits", type=component_bits, default=default,
                   metavar="auto|W[,W...]" if auto else "W[,W...]",
                   help=help or "widths of the resolution components, most significant first, summing to "
                                "--bits, e.g. 1,1,2,4; a single W means W-bit components. auto (default): the "
                                "widest first component whose extra predicted time on this CPU over a 1-bit one "
                                "stays within --budget, then the cheapest split of the rest")


def add_shape(p, default=None, help="", *, square=False, old_n=False) -> None:
    """--shape N (square) or M,K,N; benchmarks of square products take --shape N (``square``),
    with --n N as a hidden old spelling (``old_n``)."""
    metavar = "N" if square else "N|M,K,N"
    p.add_argument("--shape", dest="n" if square else "shape", type=square_shape if square else shape,
                   required=default is None, default=default, metavar=metavar, help=help)
    if old_n:
        p.add_argument("--n", dest="n", type=int, action=Deprecated, new="--shape N")


def add_deadline(p) -> None:
    """--deadline: stop the whole run at that many seconds (the one meaning of the name)."""
    p.add_argument("--deadline", type=seconds, default=None, metavar="SECONDS",
                   help="wall-clock seconds from the start of the run; at the deadline the run stops and "
                        "writes the best resolution of every tile (default: none)")


def add_tile(p, help, default=None) -> None:
    """--tile ROWS,COLS or S (square); ``help`` says what the tile is of and its default."""
    p.add_argument("--tile", type=tile, default=default, metavar="ROWS,COLS|S",
                   help=help + "; a single S means S x S")


def add_dtype(p, help="element type (default: int8)") -> None:
    """--dtype of generated inputs: the element types the readers and kernels take."""
    p.add_argument("--dtype", default="int8",
                   choices=("int8", "int16", "int32", "uint8", "uint16", "float32", "float64"), help=help)


def add_panel_and_memory(p, memory_help) -> None:
    """--k-panel and --memory: how the operands are cut to fit a rank's memory."""
    p.add_argument("--k-panel", type=int, default=None, metavar="K",
                   help="split the inner dimension into panels of K (default: all of K unless the memory "
                        "budget needs panels)")
    p.add_argument("--memory", type=byte_size, default=DEFAULT_MEMORY, metavar="BYTES", help=memory_help)


def add_product_options(p) -> None:
    """Options of the layered product shared by matmul, bench and the other jobs."""
    p.add_argument("--bits", type=int, default=8,
                   help="fixed-point bits per operand element, 2..16 (default: 8); integer inputs must fit")
    add_component_bits(p)
    p.add_argument("--budget", type=float, default=0.15, metavar="F",
                   help="with --component-bits auto: how much longer than a 1-bit first resolution the first "
                        "resolution may take, as a fraction of the larger of a one-shot float64 product of the "
                        "same shape and that 1-bit first resolution (default: 0.15)")
    p.add_argument("--scale", choices=("tensor", "axis"), default="tensor",
                   help="real inputs: one scale per operand, or one per row of A and per column of B "
                        "(default: tensor)")


def add_stragglers(p, all_lost: str = "") -> None:
    """--service-time, --seed, --reissue, --worker-timeout: emulated slow or hung workers and the
    engine's answers to them (mpilayer/mpi/engine.py), the same for every master/worker command;
    ``all_lost``: what else happens when no worker is left."""
    p.add_argument("--service-time", type=service_time, default=None, metavar="MODEL",
                   help="emulate worker service times (the worker sleeps, burning no CPU, after each mini-job): "
                        "exp:MEAN (extra Exp(MEAN) seconds per job), shifted-exp:SHIFT,MEAN, "
                        "straggler:RANK:FACTOR (rank RANK takes FACTOR x its time), hang:RANK:AFTER_JOBS "
                        "(rank RANK, or 'all', stops answering after that many jobs); join clauses with '+', "
                        "e.g. exp:0.02+straggler:1:10 (default: none)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the emulated service times; rank r draws from (seed, r) (default: 0)")
    p.add_argument("--reissue", choices=("on", "off"), default="on",
                   help="speculative re-issue: a worker with room gets a copy of a job of the lowest unfinished "
                        "resolution that has been out for more than twice the median turnaround; the first "
                        "result wins, the other copy is cancelled; results are unchanged (default: on)")
    p.add_argument("--worker-timeout", type=seconds, default=60.0, metavar="SECONDS",
                   help="a worker that owes a result and sends nothing for this long (or 4x the longest recent "
                        "turnaround, if more) is treated as lost: its work goes to the others; with no worker "
                        f"left the run stops with its best resolution saved{all_lost} (default: 60)")


def check_output(args) -> None:
    """After parsing: -o given in one of its spellings (-o, ``old``, positional files), once."""
    parser = getattr(args, "_output_parser", None)
    files = getattr(args, "files", None)
    if files:
        if args.output is not None or len(files) != 2:
            parser.error("give the two output files as -o FILE FILE")
        if launched_rank() == 0:
            print(f"{parser.prog}: note: output files as positional arguments are deprecated, use -o FILE FILE",
                  file=sys.stderr)
        args.output = files
    if parser is not None and args.output is None:
        parser.error("the following arguments are required: -o/--output")
