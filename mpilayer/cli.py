"""Command line of mpilayer: ``mpilayer <command> ...`` (also ``python -m mpilayer``).

Each command's work lives in ``jobs/`` (installed as ``mpilayer.jobs``); this module only
parses arguments, and turns user errors into one line on stderr and a non-zero exit.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

# One BLAS/OpenMP thread per rank unless the caller set otherwise: ranks, not threads, use the
# cores. Set before anything imports numpy.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from mpilayer.errors import MpilayerError  # noqa: E402

START = time.monotonic()  # a run's deadline counts from here: the start of the program
DEFAULT_MEMORY = 2 * 2**30

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


def _ints(text: str, count: int, what: str):
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be {count} comma-separated integers, not {text!r}")
    if len(values) != count or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{what} must be {count} positive comma-separated integers, not {text!r}")
    return values


def _component_bits(text: str):
    if text == "auto":
        return text
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--component-bits must be integers like 1 or 1,1,2,4, not {text!r}")
    return values[0] if len(values) == 1 else values


def _bytes(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"--memory must be a size like 2G, 512M or 1000000, not {text!r}")
    value = int(float(match.group(1)) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[match.group(2)])
    if value < 32 * 2**20:  # below this, fixed MPI and interpreter overheads dominate
        raise argparse.ArgumentTypeError(f"--memory must be at least 32M, not {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not {text!r}")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds, not {text!r}")
    return value


def _service_time(text: str):
    from mpilayer.core.service_time import parse_service_time
    try:
        return parse_service_time(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--service-time").strip(" :"))


def _shape(text: str):
    """--shape N (square: N,N,N) or M,K,N."""
    values = _ints(text, 3 if "," in text else 1, "--shape")
    return values * 3 if len(values) == 1 else values


def _square(text: str) -> int:
    """--shape of the square benchmarks: N or N,N,N -> N."""
    m, k, n = _shape(text)
    if not m == k == n:
        raise argparse.ArgumentTypeError(f"this benchmark times square products: --shape N, not {text!r}")
    return n


def _tile(text: str):
    """--tile ROWS,COLS, or a single number for a square tile."""
    values = _ints(text, 2 if "," in text else 1, "--tile")
    return values * 2 if len(values) == 1 else values


def format_component_bits(value) -> str:
    """The --component-bits text of a parsed value (for commands that launch others)."""
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


class _Deprecated(argparse.Action):
    """A hidden old spelling of an option: works, with a one-line note on stderr."""

    def __init__(self, option_strings, dest, new="", **kw):
        self.new = new
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        if launched_rank() == 0:
            print(f"{parser.prog}: note: {option_string} is deprecated, use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


class _Renamed(argparse.Action):
    """A hidden old option whose meaning now has another name: a one-line usage error."""

    def __init__(self, option_strings, dest, new="", **kw):
        self.new = new
        super().__init__(option_strings, argparse.SUPPRESS, help=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is not an option of {parser.prog.split(' ', 1)[-1]}; use {self.new}")


def add_output(p, metavar, help, *, required=True, default=None, nargs=None, quiet=None, old=None) -> None:
    """-o/--output (every output file or directory), --force and, when ``quiet`` says what
    -q leaves on stdout, -q/--quiet. ``old``: a hidden deprecated spelling of -o."""
    aliased = required and (old or nargs)  # an old spelling may give it instead: checked after parsing
    p.add_argument("-o", "--output", metavar=metavar, nargs=nargs, required=required and not aliased,
                   default=None if required else default, help=help + (" (required)" if aliased else ""))
    if old:
        p.add_argument(old, dest="output", metavar=metavar, nargs=nargs, action=_Deprecated, new="-o/--output")
    p.set_defaults(_output_parser=p if aliased else None)
    p.add_argument("--force", action="store_true", help="overwrite existing output")
    if quiet:
        p.add_argument("-q", "--quiet", action="store_true", help=f"no progress lines; {quiet}")


def add_component_bits(p, default="auto", help=None, auto=True) -> None:
    """--component-bits, the one declaration every command uses (``auto``: whether it takes auto)."""
    p.add_argument("--component-bits", type=_component_bits, default=default,
                   metavar="auto|W[,W...]" if auto else "W[,W...]",
                   help=help or "widths of the resolution components, most significant first, summing to "
                                "--bits, e.g. 1,1,2,4; a single W means W-bit components. auto (default): the "
                                "widest first component whose extra predicted time on this CPU over a 1-bit one "
                                "stays within --budget, then the cheapest split of the rest")


def add_shape(p, default=None, help="", *, square=False, old_n=False) -> None:
    """--shape N (square) or M,K,N; benchmarks of square products take --shape N (``square``),
    with --n N as a hidden old spelling (``old_n``)."""
    metavar = "N" if square else "N|M,K,N"
    p.add_argument("--shape", dest="n" if square else "shape", type=_square if square else _shape,
                   required=default is None, default=default, metavar=metavar, help=help)
    if old_n:
        p.add_argument("--n", dest="n", type=int, action=_Deprecated, new="--shape N")


def add_deadline(p) -> None:
    """--deadline: stop the whole run at that many seconds (the one meaning of the name)."""
    p.add_argument("--deadline", type=_seconds, default=None, metavar="SECONDS",
                   help="wall-clock seconds from the start of the run; at the deadline the run stops and "
                        "writes the best resolution of every tile (default: none)")


def add_tile(p, help, default=None) -> None:
    p.add_argument("--tile", type=_tile, default=default, metavar="ROWS,COLS|S",
                   help=help + "; a single S means S x S")


def add_dtype(p, help="element type (default: int8)") -> None:
    p.add_argument("--dtype", default="int8",
                   choices=("int8", "int16", "int32", "uint8", "uint16", "float32", "float64"), help=help)


def add_panel_and_memory(p, memory_help) -> None:
    p.add_argument("--k-panel", type=int, default=None, metavar="K",
                   help="split the inner dimension into panels of K (default: all of K unless the memory "
                        "budget needs panels)")
    p.add_argument("--memory", type=_bytes, default=DEFAULT_MEMORY, metavar="BYTES", help=memory_help)


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


def launched_rank() -> int:
    """This process's rank as the MPI launcher set it (0 when not under MPI)."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


class Parser(argparse.ArgumentParser):
    """Usage errors as one line, printed by rank 0 only (every rank parses the same line)."""

    def error(self, message):
        if launched_rank() == 0:
            print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


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


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="mpilayer", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Layered-resolution matrix multiplication: a coarse, certified C = A @ B first, "
                    "refined to the exact product of the quantised operands, under MPI with a deadline.")
    parser.add_argument("--version", action=_VersionAction, help="show the installed version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("matmul", help="layered product of two HDF5 matrices (run under mpiexec/srun)",
                       description="C = A @ B resolution by resolution; rank 0 is the master, the other ranks "
                                   "workers. The output holds every tile at the best resolution it reached, "
                                   "published atomically after each resolution, so it stays readable even if "
                                   "the run is killed.")
    p.add_argument("a", help="A as FILE:/DATASET (M x K; float32/64 or int8/16/32, uint8/16)")
    p.add_argument("b", help="B as FILE:/DATASET (K x N)")
    add_output(p, "FILE", "output HDF5 file: C in /C, its attributes, /tile_resolution, /timeline, /ranks",
               quiet="only the final line on stdout")
    add_product_options(p)
    add_deadline(p)
    add_tile(p, "tile of C per mini-job (default: 512,512, smaller for small matrices)")
    p.add_argument("--keep", choices=("latest", "all"), default="latest",
                   help="'all' also stores each resolution r in /resolutions/<r> (default: latest)")
    add_panel_and_memory(p, "memory budget per rank for operand blocks and caches, e.g. 512M, 4G (default: 2G)")
    p.add_argument("--prefetch", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--grace", type=_seconds, default=0.0, metavar="SECONDS",
                   help="after the deadline, keep results arriving within this many seconds (default: 0)")
    p.add_argument("--service-time", type=_service_time, default=None, metavar="MODEL",
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
    p.add_argument("--code", default="none", metavar="CODE",
                   help="exact coded redundancy over row blocks of A: every group of K row blocks (per tile "
                        "column, k-panel and resolution) gets N-K extra parity jobs on integer combinations of "
                        "the blocks, each row of a group on a different worker, and the first K results of a "
                        "group give all K exactly (decoded in integer arithmetic). 'parity:K' (N = K+1), "
                        "'parity' (K = worker ranks - 1), 'mds:N,K' (any N-K workers may fail to answer); "
                        "needs at least N worker ranks; costs (N-K)/K more work (default: none)")
    p.add_argument("--worker-timeout", type=_seconds, default=60.0, metavar="SECONDS",
                   help="a worker that owes a result and sends nothing for this long (or 4x the longest recent "
                        "turnaround, if more) is treated as lost: its work goes to the others; with no worker "
                        "left the run stops with its best resolution saved, exit status 4 (default: 60)")
    p.add_argument("--layout", choices=("auto", "single", "distributed"), default="auto",
                   help="single: C in OUTPUT, written by rank 0; distributed: each worker writes the tiles it "
                        "computes to OUTPUT.parts/ and OUTPUT is a small index (HDF5 virtual datasets) that "
                        "h5py and mpilayer read like a single file ('mpilayer info OUTPUT --gather FILE' makes "
                        "one); needs shared inputs and output directory, no --code; auto: "
                        "distributed when C is 64 MiB or more (as float64) and it can be (default: auto)")

    p = sub.add_parser("example", help="write random test matrices A and B to HDF5",
                       description="Writes random A (M x K) in A_FILE:/A and B (K x N) in B_FILE:/B, block "
                                   "by block. Integers cover their dtype's full range; floats are normal.")
    add_output(p, ("A_FILE", "B_FILE"), "the two output HDF5 files (A in /A, B in /B)", nargs=2,
               quiet="nothing on stdout")
    p.add_argument("files", nargs="*", help=argparse.SUPPRESS)  # old spelling: A_FILE B_FILE positional
    add_shape(p, help="A is M x K, B is K x N; a single N means N,N,N")
    add_dtype(p)
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")

    p = sub.add_parser("info", help="human summary of a result file",
                       description="Prints what a result file of matmul (or scaling's work files) holds: shape, "
                                   "resolution reached (numbered from 0), exactness, certified error bound, why "
                                   "the run stopped, every attribute of /C, how many tiles reached each "
                                   "resolution and the timeline; for the outputs of stream, infer and adaptive, "
                                   "their attributes, datasets and tables. Writes nothing (except with --gather).")
    p.add_argument("path", help="HDF5 file written by mpilayer matmul, stream, infer or adaptive")
    p.add_argument("--gather", default=None, metavar="FILE",
                   help="also copy a result (a distributed one: its index and part files) into FILE, one ordinary "
                        "result file")

    p = sub.add_parser("cleanup", help="remove the scratch files and lock a killed run left beside an output",
                       description="Removes .OUTPUT.work.h5, .OUTPUT.acc.h5, .OUTPUT.tmp-PID.h5 and OUTPUT.lock "
                                   "left by a run that was killed (SIGKILL, node crash); refuses while a live run "
                                   "holds OUTPUT.lock. The next matmul run on OUTPUT does the same by itself.")
    p.add_argument("output", help="the OUTPUT given to the killed run's -o")

    sub.add_parser("selftest", help="check every SIMD kernel path of this CPU against the portable one, bit for bit",
                   description="Runs each SIMD path this CPU supports (AVX2, AVX-512 VPOPCNTDQ, AVX512-VNNI, "
                               "AVX-VNNI) on random, extreme and odd-sized operands against the portable C path; "
                               "prints one line per path (ok/FAIL, rate) and exits 1 on any mismatch. Writes "
                               "nothing.")

    p = sub.add_parser("bench", help="benchmarks (kernels: one process; mpi: under mpiexec)",
                       description="Benchmarks: each prints its table on stdout; they write only temporary files, "
                                   "except 'bench kernels -o FILE.json'. 'mpilayer bench WHICH --help' for each.")
    bench = p.add_subparsers(dest="bench", metavar="WHICH")
    bench.required = True
    pk = bench.add_parser("kernels", help="layered product vs numpy float64/float32 matmul, one core",
                          description="Times, side by side in one process with one BLAS thread, numpy float64 "
                                      "and float32 matmul and the layered product of int8 operands, and prints "
                                      "time per resolution, ratios, kernel rates (with each path's instruction peak), bound vs true "
                                      "error and the relative error of every resolution; with -o, also the results as JSON.")
    add_shape(pk, 2048, "times n x n x n products (default: 2048)", square=True, old_n=True)
    pk.add_argument("--repeat", type=int, default=3, help="timed repetitions, best kept (default: 3)")
    pk.add_argument("--schedules", default="auto;1;4,4",
                    help="component splits to time, ';'-separated: auto (the command line's default), "
                         "default (1,7), or widths (default: 'auto;1;4,4')")
    add_output(pk, "FILE.json", "also write the results as JSON to this file (default: none)", required=False,
               old="--json")
    pm = bench.add_parser("mpi", help="one process vs 1 master + 2 workers on the same problem",
                          description="Runs mpilayer matmul with 1 and with 3 ranks under mpiexec on a generated "
                                      "int8 problem and prints the throughput ratio, time and bytes per "
                                      "resolution, the master's CPU share and the deadline overshoot. Writes only temporary files.")
    add_shape(pm, 3072, "times n x n x n products (default: 3072)", square=True, old_n=True)
    pm.add_argument("--repeat", type=int, default=3, help="runs per configuration, best kept (default: 3)")
    add_component_bits(pm, help="component split, as matmul's (default: auto, matmul's default schedule)")
    pa = bench.add_parser("accuracy", help="relative error of every resolution on five kinds of data",
                          description="Per resolution (1-bit components): measured relative Frobenius error of "
                                      "the truncated product and of the reported estimate, the run's statistical "
                                      "estimate, and the certified bound; then the default schedule. Writes nothing.")
    pa.add_argument("--bits", type=int, default=8, help="fixed-point bits (default: 8)")
    pa.add_argument("--budget", type=float, default=0.15, help="budget of the default schedule (default: 0.15)")
    pa.add_argument("--seed", type=int, default=2026, help="random seed of the generated data (default: 2026)")
    pd = bench.add_parser("vs-dask", help="float32 HDF5 end to end: Dask vs mpiexec -n 3 mpilayer matmul",
                          description="Generates float32 Gaussian A, B in HDF5 and times whole processes, "
                                      "alternating, best of R: Dask (float32, 2 threads, da.from_array on h5py, "
                                      "to_hdf5), mpilayer matmul --bits 8, --bits 16, and --bits 8 with a deadline "
                                      "of a fraction of Dask's time; prints wall time, ratio to Dask, resolutions "
                                      "reached and the relative error against the float64 product. Writes only temporary "
                                      "files (in --tmpdir). Needs dask[array]: pip install 'mpilayer[bench]'.")
    add_shape(pd, 4096, "times n x n x n products (default: 4096)", square=True, old_n=True)
    pd.add_argument("--repeat", type=int, default=3, help="runs per configuration, best kept (default: 3)")
    pd.add_argument("--dask-chunk", type=int, default=None, help="Dask chunk edge (default: n/2)")
    pd.add_argument("--deadline-fraction", type=float, default=0.3,
                    help="deadline of the last run, times the best Dask time (default: 0.3)")
    pd.add_argument("--seed", type=int, default=0, help="random seed of A and B (default: 0)")
    pd.add_argument("--tmpdir", default=None, help="directory for the inputs and outputs (default: system temp)")
    ps = bench.add_parser("stragglers", help="time to each resolution with a straggler rank: plain, re-issue, coded",
                          description="Runs mpilayer matmul under mpiexec with emulated service times (workers sleep, "
                                      "so many ranks fit on few cores): no straggler / a straggler on rank 1, each "
                                      "plain, with re-issue and with --code, interleaved; prints the median time to "
                                      "each resolution side by side, the copies re-issued, parity jobs and decoded "
                                      "blocks, the work and bytes relative to the plain run, and checks that every "
                                      "result is bit-identical. Writes only temporary files.")
    add_shape(ps, 768, "times n x n x n products (default: 768)", square=True, old_n=True)
    add_tile(ps, "tile of C per mini-job (default: 128)", default=(128, 128))
    add_component_bits(ps, default=(1, 1, 2, 4), help="component split, as matmul's (default: 1,1,2,4)")
    ps.add_argument("--ranks", type=int, default=6, help="MPI ranks, 1 master + the workers (default: 6)")
    ps.add_argument("--service-time", default="exp:0.02", metavar="MODEL",
                    help="service-time model of every worker, as matmul's --service-time (default: exp:0.02)")
    ps.add_argument("--factor", type=float, default=10.0, help="the straggler (rank 1) takes FACTOR x (default: 10)")
    ps.add_argument("--repeat", type=int, default=3, help="runs per configuration, median kept (default: 3)")
    ps.add_argument("--code", default="parity", metavar="CODE",
                    help="the --code of the coded runs (default: parity, i.e. K = workers - 1)")
    pb = bench.add_parser("master", help="null workers: mini-jobs/s and bytes/s one master sustains, and a projection",
                          description="Runs mpilayer matmul under mpiexec with null workers (they answer at once "
                                      "with zero tiles of the right size) on generated inputs, for each data path "
                                      "(master-sent operands; worker-read operands; distributed results) and tile "
                                      "size; prints mini-jobs/s, bytes/s and bytes through rank 0, fits the "
                                      "master's time per job, and projects how many workers one master keeps busy "
                                      "for n = 16k..256k and p = 16..4096 at the given kernel rate; with -o, also "
                                      "a plot. Run it directly, not under mpiexec.")
    add_shape(pb, 4096, "n x n x n products of the measured runs (default: 4096)", square=True, old_n=True)
    add_dtype(pb, "input dtype (default: float32)")
    pb.set_defaults(dtype="float32")
    pb.add_argument("--ranks", type=int, default=3, help="MPI ranks, 1 master + null workers (default: 3)")
    pb.add_argument("--tiles", default="256,512", help="square tile sizes of the measured runs (default: 256,512)")
    pb.add_argument("--repeat", type=int, default=2, help="runs per configuration, fastest kept (default: 2)")
    pb.add_argument("--paths", default="master-sent,worker-read,distributed",
                    help="data paths to measure: master-sent, worker-read, distributed (default: all three)")
    pb.add_argument("--rate", type=float, default=250.0,
                    help="worker kernel rate, GMAC/s per core (default: 250, VNNI int8 on an AVX-512 CPU; "
                         "see mpilayer bench kernels)")
    pb.add_argument("--link", type=float, default=12.5, help="master network link, GB/s (default: 12.5 = 100 Gb/s)")
    pb.add_argument("--tiles-per-worker", type=float, default=4.0,
                    help="projection: tiles of C per worker and resolution, for load balance (default: 4)")
    add_output(pb, "IMAGE", "also plot the projection to this image file (default: none)", required=False)
    pb.add_argument("--tmpdir", default=None, help="directory for the inputs and outputs (default: system temp)")

    p = sub.add_parser("scaling", help="strong/weak scaling sweep of matmul, with CSV, JSON and plots",
                       description="Launches one 'mpilayer matmul' per rank count (and repeat) with mpiexec "
                                   "or srun on generated int/float inputs, and writes DIR/scaling.csv (run x "
                                   "resolution), DIR/ranks.csv (run x rank), DIR/scaling.json (everything, "
                                   "with the machine) and PNG plots; prints a table. Run it directly, not under "
                                   "mpiexec/srun. 'mpilayer scaling merge DIR [DIR ...] -o DIR' pools the "
                                   "reports of separate sweeps of the same problem (e.g. one Slurm job per "
                                   "node count) into one; only -o, --pick, --max-background, --force and -q "
                                   "apply to merge.")
    p.add_argument("merge", nargs="*", metavar="merge DIR",
                   help="'merge' followed by report directories (or their scaling.json) to pool")
    p.add_argument("--ranks", default="1,2,3", metavar="R[,R...]",
                   help="rank counts to run; 1 = one process doing everything, R > 1 = 1 master + R-1 "
                        "workers (default: 1,2,3)")
    p.add_argument("--mode", choices=("strong", "weak", "both"), default="strong",
                   help="strong: the fixed problem --shape; weak: M scaled by the number of workers, "
                        "--shape being the problem of one worker; both: the two sweeps (default: strong)")
    add_shape(p, (2048, 2048, 2048), "problem A (M x K) @ B (K x N), a single N meaning N,N,N; for weak scaling "
                                     "the one-worker problem (default: 2048,2048,2048)")
    add_dtype(p, "element type of the generated inputs (default: int8)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the generated inputs (default: 0)")
    add_product_options(p)
    add_tile(p, "tile of C per mini-job, passed to matmul (default: matmul's)")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="runs per configuration, interleaved; the summary and plots use the one chosen "
                        "by --pick, the CSVs and JSON keep all (default: 1)")
    p.add_argument("--warmup", type=int, default=1, metavar="N",
                   help="untimed runs of the first configuration before the sweep, not recorded (default: 1)")
    p.add_argument("--pick", choices=("median", "best"), default="median",
                   help="which of the repeats to report: the median (lower median for even N) or the "
                        "fastest by time to the exact result (default: median)")
    p.add_argument("--max-background", type=float, default=0.1, metavar="FRACTION",
                   help="runs during which other processes used more than this fraction of the host's CPUs "
                        "are not chosen by --pick unless all runs of their configuration are (default: 0.1)")
    add_output(p, "DIR", "report directory (default: results/scaling)", required=False,
               default=os.path.join("results", "scaling"), old="--out",
               quiet="only the summary table and the files written on stdout")
    p.add_argument("--launcher", choices=("auto", "mpiexec", "srun"), default="auto",
                   help="auto: srun when SLURM_JOB_ID is set (and srun exists), else mpiexec; srun runs "
                        "'srun -n R --mpi=pmi2 --kill-on-bad-exit=1'; mpiexec is $MPIEXEC or the one on PATH "
                        "(default: auto)")
    p.add_argument("--timeout", type=_seconds, default=3600.0, metavar="SECONDS",
                   help="kill a run that takes longer than this and record it as failed (default: 3600)")
    p.add_argument("--keep-files", action="store_true",
                   help="keep the generated inputs and each run's result file in DIR/work")

    p = sub.add_parser("example-model", help="train a small ReLU MLP on a bundled scikit-learn dataset, for infer",
                       description="Trains an MLP (ReLU hidden layers, linear output) with scikit-learn on a dataset "
                                   "bundled with it (no download) and writes MODEL (/layer0, /layer1, ... each with W "
                                   "(inputs x outputs), b, attributes activation and the activation calibration "
                                   "input_min/input_max from the training split) and DATA (/X: test split, samples x "
                                   "features; /y: labels).")
    add_output(p, ("MODEL", "DATA"), "the two output HDF5 files: the model, and the data with /X and /y", nargs=2,
               quiet="nothing on stdout")
    p.add_argument("files", nargs="*", help=argparse.SUPPRESS)  # old spelling: MODEL DATA positional
    p.add_argument("--seed", type=int, default=0, help="random seed of the split and the training (default: 0)")
    p.add_argument("--hidden", type=lambda t: _ints(t, len(t.split(",")), "--hidden"), default=(64, 32),
                   metavar="H[,H...]", help="hidden layer sizes (default: 64,32)")
    p.add_argument("--dataset", choices=("digits", "wine", "breast_cancer"), default="digits",
                   help="scikit-learn bundled dataset (default: digits)")

    p = sub.add_parser("infer", help="adaptive layered inference of an MLP with certified predictions (mpiexec)",
                       description="Every layer through layered products with certified bounds propagated through "
                                   "the layers; a sample stops as soon as its prediction is certified equal to the "
                                   "exact one-shot quantised prediction, the others are refined. Rank 0 reads the "
                                   "inputs and hands a block of samples to every rank. Prints a table per "
                                   "resolution and writes /predictions, /resolution (0-based; attribute resolutions_total), "
                                   "/predictions_one_shot and /per_resolution.")
    p.add_argument("model", help="model file written by 'mpilayer example-model' (or the same layout)")
    p.add_argument("data", help="inputs as FILE:/DATASET, samples x features (default dataset: /X)")
    add_output(p, "FILE", "output HDF5 file", quiet="only the last line on stdout")
    p.add_argument("--bits", type=int, default=8,
                   help="fixed-point bits of weights and activations, 2..16 (default: 8)")
    add_component_bits(p, default=None, auto=False,
                   help="widths of the resolution components, most significant first, summing to --bits; a single "
                        "W means W-bit components, e.g. 1 for 1-bit upgrades (default: 2,B-3,1, i.e. 2,5,1 for 8 "
                        "bits: measured on the digits MLP, the gap rule stops 98%% of samples at 2 bits, the "
                        "certificate settles 92%% at 7 bits, the rest is exact; see README)")
    p.add_argument("--rule", default="certified", metavar="certified|gap[:T]",
                   help="certified (default): a sample stops only when its prediction is proved equal to the exact "
                        "one-shot quantised prediction; gap[:T]: NOT certified, the paper's rule: stop when the top-2 "
                        "gap of the estimated logits exceeds T times the largest |logit| (default T 0.05); the job "
                        "counts how many predictions then differ from one-shot")
    p.add_argument("--check-from", type=int, default=None, metavar="R",
                   help="first resolution (0-based) at which the rule is tried (default: certified, the first keeping "
                        "min(bits-1, 7) bits: certificates need layer 0 nearly exact; gap, the first keeping 2 bits)")
    p.add_argument("--full", action="store_true",
                   help="compute every sample to the final resolution (the one-shot quantised result) instead of "
                        "stopping settled samples; the table still shows where each would have been certified")
    p.add_argument("--y", default=None, metavar="FILE:/DATASET",
                   help="labels (1-D integers), to report accuracy per resolution (default: none)")
    p.add_argument("--repeat", type=int, default=3, metavar="N",
                   help="time each inference N times on every rank and keep the fastest (default: 3)")

    p = sub.add_parser("stream", help="fixed A times a stream of items, each with a deadline (mpiexec)",
                       description="A (M x K, HDF5) stays resident on the workers; the items X_t (an HDF5 dataset "
                                   "of shape (T, K, B), or (T, K) for vectors) arrive one by one, item t at t/RATE "
                                   "seconds after the stream starts (all at once without --rate), and each must be "
                                   "done --item-deadline seconds after its arrival. Items are served earliest deadline "
                                   "first, each in resolution order; at an item's deadline its pending work is "
                                   "dropped and every tile keeps its best resolution with a certified bound. The "
                                   "output holds /estimates, /items (arrival, deadline, latency, resolution, bound, "
                                   "met, bytes) and, with --compare one-shot, the same for a one-shot pass over the "
                                   "same items, deadlines and ranks in /one_shot, plus /comparison; it is replaced "
                                   "atomically as items finish.")
    p.add_argument("a", help="A as FILE:/DATASET (M x K; float32/64 or int8/16/32, uint8/16)")
    p.add_argument("x", help="the items as FILE:/DATASET, shape (T, K, B) or (T, K)")
    add_output(p, "FILE", "output HDF5 file", quiet="no line per item; only the summary table on stdout")
    add_product_options(p)
    p.add_argument("--rate", type=float, default=None, metavar="ITEMS_PER_S",
                   help="items arrive at this rate from the start of the stream (default: all at the start)")
    p.add_argument("--item-deadline", type=_seconds, default=None, metavar="SECONDS",
                   help="each item's deadline, in seconds after its arrival (default: none)")
    p.add_argument("--deadline", action=_Renamed, new="--item-deadline SECONDS (each item's deadline after its arrival)")
    p.add_argument("--compare", choices=("one-shot", "none"), default="none",
                   help="one-shot: afterwards run the same stream (items, arrivals, deadlines, ranks) with a "
                        "single --bits-bit component and print the comparison (default: none)")
    add_tile(p, "tile of A X_t per mini-job (default: rows M/(2 workers), at least 16, at most 512; "
                "columns all of B up to 512)")
    add_panel_and_memory(p, "memory budget per rank, e.g. 512M, 4G; A is resident on a worker within half of it, "
                            "else split over the workers (default: 2G)")

    p = sub.add_parser("example-stream", help="write a random A and a stream of items X to HDF5, for stream",
                       description="Writes random A (M x K) in A_FILE:/A and the items X (T x K x B, or T x K with "
                                   "--shape M,K) in X_FILE:/X, one item per chunk. Integers cover their dtype's "
                                   "full range; floats are standard normals.")
    add_output(p, ("A_FILE", "X_FILE"), "the two output HDF5 files (A in /A, the items in /X)", nargs=2,
               quiet="nothing on stdout")
    p.add_argument("files", nargs="*", help=argparse.SUPPRESS)  # old spelling: A_FILE X_FILE positional
    p.add_argument("--shape", type=lambda t: _ints(t, len(t.split(",")) if len(t.split(",")) in (2, 3) else 3,
                                                   "--shape"),
                   required=True, metavar="M,K[,B]", help="A is M x K, each item K x B (K without B: vectors)")
    p.add_argument("--items", type=int, required=True, metavar="T", help="number of items")
    add_dtype(p)
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")

    p = sub.add_parser("adaptive", help="adaptive resolution: stop refining rows whose decision is certified",
                       description="Rows of A are items. After each resolution, a row whose decision is certified "
                                   "by the bounds (top1: the argmax of its output row; threshold:T: every output "
                                   "against T) stops; the others are refined. Prints the fraction settled and the "
                                   "work per resolution, and checks every decision against the exact product. "
                                   "Run under mpiexec to split the rows over ranks. Writes -o FILE.")
    p.add_argument("a", help="A as FILE:/DATASET (rows are the items)")
    p.add_argument("b", help="B as FILE:/DATASET")
    add_output(p, "FILE", "output HDF5: /decisions, /resolution (0-based), /per_resolution",
               quiet="only the last line on stdout")
    p.add_argument("--rule", default="top1", help="top1 or threshold:T (default: top1)")
    add_product_options(p)

    p = sub.add_parser("deadline-experiment",
                       help="the paper's deadline experiment: a Poisson stream of jobs, layered vs one-shot (mpiexec)",
                       description="Jobs A @ B_t (int8, generated from --seed) arrive at --rate per second; each is "
                                   "split into mini-jobs per layer (component pairs (i, j) with i + j = layer, m "
                                   "components per operand -> 2m - 1 layers) or run one-shot (one layer holding all "
                                   "the work), on the same ranks, arrivals and service-time seed, layered first. "
                                   "Workers compute every mini-job exactly, then sleep an emulated service time "
                                   "scaled by its share of the work. Reports per layer the mean delay and "
                                   "P(delay <= --threshold); writes delays.csv, summary.csv, success_vs_deadline.csv and "
                                   "two PNG plots to -o DIR. Layers are numbered from 0, like resolutions. See "
                                   "jobs/deadline_experiment.py.")
    add_output(p, "DIR", "output directory (created if missing; refuses one holding a result without --force)",
               old="--out", quiet="only the summary table and the files written on stdout")
    p.add_argument("--jobs", type=int, default=200, metavar="N", help="jobs per mode (default: 200)")
    p.add_argument("--rate", type=float, default=15.0, metavar="JOBS_PER_S",
                   help="Poisson arrival rate of jobs, per second (default: 15)")
    p.add_argument("--service-time", type=_service_time, default="exp:0.2", metavar="MODEL",
                   help="emulated service time of a WHOLE job (exp:MEAN, shifted-exp:SHIFT,MEAN, plus "
                        "straggler:RANK:FACTOR clauses; see matmul --help); a mini-job sleeps its share of the work "
                        "times a fresh draw (default: exp:0.2)")
    add_component_bits(p, default=4, auto=False,
                       help="widths of the M components per operand, an (almost) equal split of the 8 bits, widest "
                            "first; a single W means W-bit components, e.g. 4 = 4,4, 3 = 3,3,2, 2 = 2,2,2,2; "
                            "2M-1 layers (default: 4: layers of 1, 2, 1 quarter-products)")
    p.add_argument("--components", type=int, dest="components", action=_Deprecated, new="--component-bits W")
    p.add_argument("--row-blocks", type=int, default=1, metavar="T",
                   help="also split every mini-job (layered and one-shot) into T row blocks of A (default: 1)")
    p.add_argument("--tiles", type=int, dest="row_blocks", action=_Deprecated, new="--row-blocks T")
    p.add_argument("--threshold", type=float, default=None, metavar="SECONDS",
                   help="delay after arrival for the P(delay <= threshold) column; the runs have no deadline "
                        "(default: 10 x the mean service time of one component pair of a job, i.e. 10 x MEAN/M**2)")
    p.add_argument("--deadline", action=_Renamed, new="--threshold SECONDS (the delay of the P(meet) column)")
    p.add_argument("--order", choices=("layer", "job"), default="layer",
                   help="layered scheduling: layer = lowest layer of any arrived job first, then arrival; "
                        "job = FIFO by job arrival, then layer (default: layer)")
    p.add_argument("--redundancy", type=float, default=0.0, metavar="R",
                   help="a worker with nothing ready takes a copy of the most urgent outstanding mini-job, up to "
                        "R x the mini-jobs issued (e.g. 0.2 = 20%% extra); the first result wins (default: 0)")
    add_shape(p, (128, 256, 128), "A is M x K, every B_t is K x N; a single N means N,N,N (default: 128,256,128)")
    p.add_argument("--seed", type=int, default=0, help="seed of operands, arrivals and service times (default: 0)")
    return parser


def _check_output(args) -> None:
    """-o is required (old spellings: --out, positional files); the example commands' files."""
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


# What each command runs: "module:function" of a function taking the parsed arguments, imported
# only when chosen (a command's start-up pays for its own imports only).
COMMANDS = {
    "matmul": "mpilayer.jobs.matmul:run",
    "example": "mpilayer.cli:run_example",
    "selftest": "mpilayer.jobs.selftest:run",
    "info": "mpilayer.cli:run_info",
    "cleanup": "mpilayer.cli:run_cleanup",
    "adaptive": "mpilayer.jobs.adaptive:run",
    "bench kernels": "mpilayer.jobs.bench_kernels:run",
    "bench mpi": "mpilayer.jobs.bench_mpi:run",
    "bench accuracy": "mpilayer.jobs.bench_accuracy:run",
    "bench vs-dask": "mpilayer.jobs.bench_vs_dask:run",
    "bench stragglers": "mpilayer.jobs.bench_stragglers:run",
    "bench master": "mpilayer.jobs.bench_master:run",
    "example-model": "mpilayer.jobs.example_model:run",
    "infer": "mpilayer.jobs.infer:run",
    "scaling": "mpilayer.jobs.scaling:run",
    "stream": "mpilayer.jobs.stream:run",
    "example-stream": "mpilayer.jobs.example_stream:run",
    "deadline-experiment": "mpilayer.jobs.deadline_experiment:run",
}


def run_example(args) -> int:
    from mpilayer.io.example_data import write_example
    a, b = write_example(*args.output, args.shape, args.dtype, args.seed, force=args.force)
    if not args.quiet:
        print(f"wrote {a} and {b}")
    return 0


def run_info(args) -> int:
    from mpilayer.io.result_info import describe_result
    print(describe_result(args.path))
    if args.gather:
        from mpilayer.io.distributed_store import gather
        gather(args.path, args.gather)
        print(f"gathered -> {args.gather}")
    return 0


def run_cleanup(args) -> int:
    from mpilayer.io.run_guard import cleanup
    print(cleanup(args.output))
    return 0


def command_key(args) -> str:
    """The :data:`COMMANDS` key of the parsed command line."""
    return f"bench {args.bench}" if args.command == "bench" else args.command


def main(argv=None) -> int:
    import importlib

    args = build_parser().parse_args(argv)
    _check_output(args)
    args.start = START  # process start: start-up counts against --deadline
    module, function = COMMANDS[command_key(args)].split(":")
    try:
        return getattr(importlib.import_module(module), function)(args)
    except MpilayerError as err:
        print(f"mpilayer: error: {err}", file=sys.stderr)
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
    sys.exit(code)
