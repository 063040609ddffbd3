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

from .errors import MpilayerError  # noqa: E402

START = time.monotonic()  # a run's deadline counts from here: the start of the program
DEFAULT_MEMORY = 2 * 2**30

EPILOG = """\
examples:
  mpilayer example a.h5 b.h5 --shape 2048,2048,2048 --dtype int8
  mpiexec -n 4 mpilayer matmul a.h5:/A b.h5:/B -o c.h5 --deadline 30
  mpilayer info c.h5
  mpilayer bench kernels --n 2048
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
    from .service_time import parse_service_time
    try:
        return parse_service_time(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--service-time").strip(" :"))


def add_product_options(p) -> None:
    """Options of the layered product shared by matmul, bench and the other jobs."""
    p.add_argument("--bits", type=int, default=8,
                   help="fixed-point bits per operand element, 2..16 (default: 8); integer inputs must fit")
    p.add_argument("--component-bits", type=_component_bits, default="auto", metavar="auto|W[,W...]",
                   help="widths of the resolution components, most significant first, summing to --bits, "
                        "e.g. 1,1,2,4; a single W means W-bit components. auto (default): the widest first "
                        "component whose predicted time on this CPU stays within --budget, then the cheapest "
                        "split of the rest")
    p.add_argument("--budget", type=float, default=0.15, metavar="F",
                   help="with --component-bits auto: the first resolution's predicted time as a fraction of a "
                        "one-shot float64 product of the same shape (default: 0.15)")
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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("mpilayer")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="mpilayer", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Layered-resolution matrix multiplication: a coarse, certified C = A @ B first, "
                    "refined to the exact product of the quantised operands, under MPI with a deadline.")
    parser.add_argument("--version", action="version", version=f"mpilayer {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("matmul", help="layered product of two HDF5 matrices (run under mpiexec/srun)",
                       description="C = A @ B resolution by resolution; rank 0 is the master, the other ranks "
                                   "workers. The output holds every tile at the best resolution it reached, "
                                   "published atomically after each resolution, so it stays readable even if "
                                   "the run is killed.")
    p.add_argument("a", help="A as FILE:/DATASET (M x K; float32/64 or int8/16/32, uint8/16)")
    p.add_argument("b", help="B as FILE:/DATASET (K x N)")
    p.add_argument("-o", "--output", required=True, help="output HDF5 file (C in /C)")
    add_product_options(p)
    p.add_argument("--deadline", type=_seconds, default=None, metavar="SECONDS",
                   help="wall-clock seconds from the start of the run; at the deadline the run stops and "
                        "writes the best resolution of every tile (default: none)")
    p.add_argument("--tile", type=lambda t: _ints(t, 2, "--tile"), default=None, metavar="ROWS,COLS",
                   help="tile of C per mini-job (default: 512,512, smaller for small matrices)")
    p.add_argument("--k-panel", type=int, default=None, metavar="K",
                   help="split the inner dimension into panels of K (default: all of K unless the memory "
                        "budget needs panels)")
    p.add_argument("--keep", choices=("latest", "all"), default="latest",
                   help="'all' also stores each resolution in /resolutions/<r> (default: latest)")
    p.add_argument("--memory", type=_bytes, default=DEFAULT_MEMORY, metavar="BYTES",
                   help="memory budget per rank for operand blocks and caches, e.g. 512M, 4G (default: 2G)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress lines; only the final line on stdout")
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

    p = sub.add_parser("example", help="write random test matrices A and B to HDF5",
                       description="Random A (M x K) in A_FILE:/A and B (K x N) in B_FILE:/B, written block "
                                   "by block. Integers cover their dtype's full range; floats are normal.")
    p.add_argument("a_file")
    p.add_argument("b_file")
    p.add_argument("--shape", type=lambda t: _ints(t, 3, "--shape"), required=True, metavar="M,K,N")
    p.add_argument("--dtype", default="int8",
                   choices=("int8", "int16", "int32", "uint8", "uint16", "float32", "float64"),
                   help="element type (default: int8)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")

    p = sub.add_parser("info", help="human summary of a result file")
    p.add_argument("path")

    p = sub.add_parser("cleanup", help="remove the scratch files and lock a killed run left beside an output",
                       description="Removes .OUTPUT.work.h5, .OUTPUT.acc.h5, .OUTPUT.tmp-PID.h5 and OUTPUT.lock "
                                   "left by a run that was killed (SIGKILL, node crash); refuses while a live run "
                                   "holds OUTPUT.lock. The next matmul run on OUTPUT does the same by itself.")
    p.add_argument("output")

    sub.add_parser("selftest", help="check every SIMD kernel path of this CPU against the portable one, bit for bit",
                   description="Runs each SIMD path this CPU supports (AVX2, AVX-512 VPOPCNTDQ, AVX512-VNNI, "
                               "AVX-VNNI) on random, extreme and odd-sized operands against the portable C path; "
                               "prints one line per path (ok/FAIL, rate) and exits 1 on any mismatch.")

    p = sub.add_parser("bench", help="benchmarks (kernels: one process; mpi: under mpiexec)")
    bench = p.add_subparsers(dest="bench", metavar="WHICH")
    bench.required = True
    pk = bench.add_parser("kernels", help="layered product vs numpy float64/float32 matmul, one core",
                          description="Times, side by side in one process with one BLAS thread, numpy float64 "
                                      "and float32 matmul and the layered product of int8 operands, and prints "
                                      "time per resolution, ratios, kernel rates (with each path's instruction peak), bound vs true "
                                      "error and the relative error of every resolution.")
    pk.add_argument("--n", type=int, default=2048, help="matrix size n x n (default: 2048)")
    pk.add_argument("--repeat", type=int, default=3, help="timed repetitions, best kept (default: 3)")
    pk.add_argument("--schedules", default="auto;1;4,4",
                    help="component splits to time, ';'-separated: auto (the command line's default), "
                         "default (1,7), or widths (default: 'auto;1;4,4')")
    pk.add_argument("--json", default=None, help="also write the results as JSON to this file")
    pm = bench.add_parser("mpi", help="one process vs 1 master + 2 workers on the same problem",
                          description="Runs mpilayer matmul with 1 and with 3 ranks under mpiexec on a generated "
                                      "int8 problem and prints the throughput ratio, time and bytes per "
                                      "resolution, the master's CPU share and the deadline overshoot.")
    pm.add_argument("--n", type=int, default=3072, help="matrix size n x n (default: 3072)")
    pm.add_argument("--repeat", type=int, default=3, help="runs per configuration, best kept (default: 3)")
    pm.add_argument("--component-bits", default=None, help="component split (default: the default schedule)")
    pa = bench.add_parser("accuracy", help="relative error of every resolution on five kinds of data",
                          description="Per resolution (1-bit components): measured relative Frobenius error of "
                                      "the truncated product and of the reported estimate, the run's statistical "
                                      "estimate, and the certified bound; then the default schedule.")
    pa.add_argument("--bits", type=int, default=8, help="fixed-point bits (default: 8)")
    pa.add_argument("--budget", type=float, default=0.15, help="budget of the default schedule (default: 0.15)")
    pa.add_argument("--seed", type=int, default=2026, help="random seed of the generated data (default: 2026)")
    pd = bench.add_parser("vs-dask", help="float32 HDF5 end to end: Dask vs mpiexec -n 3 mpilayer matmul",
                          description="Generates float32 Gaussian A, B in HDF5 and times whole processes, "
                                      "alternating, best of R: Dask (float32, 2 threads, da.from_array on h5py, "
                                      "to_hdf5), mpilayer matmul --bits 8, --bits 16, and --bits 8 with a deadline "
                                      "of a fraction of Dask's time; prints wall time, ratio to Dask, resolutions "
                                      "reached and the relative error against the float64 product. Needs dask[array].")
    pd.add_argument("--n", type=int, default=4096, help="matrix size n x n (default: 4096)")
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
                                      "result is bit-identical.")
    ps.add_argument("--n", type=int, default=768, help="matrix size n x n (default: 768)")
    ps.add_argument("--tile", type=int, default=128, help="square tile of C per mini-job (default: 128)")
    ps.add_argument("--component-bits", default="1,1,2,4", help="component split (default: 1,1,2,4)")
    ps.add_argument("--ranks", type=int, default=6, help="MPI ranks, 1 master + the workers (default: 6)")
    ps.add_argument("--service-time", default="exp:0.02", metavar="MODEL",
                    help="service-time model of every worker, as matmul's --service-time (default: exp:0.02)")
    ps.add_argument("--factor", type=float, default=10.0, help="the straggler (rank 1) takes FACTOR x (default: 10)")
    ps.add_argument("--repeat", type=int, default=3, help="runs per configuration, median kept (default: 3)")
    ps.add_argument("--code", default="parity", metavar="CODE",
                    help="the --code of the coded runs (default: parity, i.e. K = workers - 1)")

    p = sub.add_parser("scaling", help="strong/weak scaling sweep of matmul, with CSV, JSON and plots",
                       description="Launches one 'mpilayer matmul' per rank count (and repeat) with mpiexec "
                                   "or srun on generated int/float inputs, and writes DIR/scaling.csv (run x "
                                   "resolution), DIR/ranks.csv (run x rank), DIR/scaling.json (everything, "
                                   "with the machine) and PNG plots; prints a table. Run it directly, not under "
                                   "mpiexec/srun. 'mpilayer scaling merge DIR [DIR ...] --out DIR' pools the "
                                   "reports of separate sweeps of the same problem (e.g. one Slurm job per "
                                   "node count) into one; only --out, --pick, --max-background and --force "
                                   "apply to merge.")
    p.add_argument("merge", nargs="*", metavar="merge DIR",
                   help="'merge' followed by report directories (or their scaling.json) to pool")
    p.add_argument("--ranks", default="1,2,3", metavar="R[,R...]",
                   help="rank counts to run; 1 = one process doing everything, R > 1 = 1 master + R-1 "
                        "workers (default: 1,2,3)")
    p.add_argument("--mode", choices=("strong", "weak", "both"), default="strong",
                   help="strong: the fixed problem --shape; weak: M scaled by the number of workers, "
                        "--shape being the problem of one worker; both: the two sweeps (default: strong)")
    p.add_argument("--shape", type=lambda t: _ints(t, 3, "--shape"), default=(2048, 2048, 2048), metavar="M,K,N",
                   help="problem A (M x K) @ B (K x N); for weak scaling the one-worker problem "
                        "(default: 2048,2048,2048)")
    p.add_argument("--dtype", default="int8",
                   choices=("int8", "int16", "int32", "uint8", "uint16", "float32", "float64"),
                   help="element type of the generated inputs (default: int8)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the generated inputs (default: 0)")
    add_product_options(p)
    p.add_argument("--tile", type=lambda t: _ints(t, 2, "--tile"), default=None, metavar="ROWS,COLS",
                   help="tile of C per mini-job, passed to matmul (default: matmul's)")
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
    p.add_argument("--out", default=os.path.join("results", "scaling"), metavar="DIR",
                   help="report directory (default: results/scaling)")
    p.add_argument("--launcher", choices=("auto", "mpiexec", "srun"), default="auto",
                   help="auto: srun when SLURM_JOB_ID is set (and srun exists), else mpiexec; srun runs "
                        "'srun -n R --mpi=pmi2 --kill-on-bad-exit=1'; mpiexec is $MPIEXEC or the one on PATH "
                        "(default: auto)")
    p.add_argument("--timeout", type=_seconds, default=3600.0, metavar="SECONDS",
                   help="kill a run that takes longer than this and record it as failed (default: 3600)")
    p.add_argument("--keep-files", action="store_true",
                   help="keep the generated inputs and each run's result file in DIR/work")
    p.add_argument("--force", action="store_true", help="overwrite a report already in --out")

    p = sub.add_parser("example-model", help="train a small ReLU MLP on a bundled scikit-learn dataset, for infer",
                       description="Trains an MLP (ReLU hidden layers, linear output) with scikit-learn on a dataset "
                                   "bundled with it (no download) and writes MODEL (/layer0, /layer1, ... each with W "
                                   "(inputs x outputs), b, attributes activation and the activation calibration "
                                   "input_min/input_max from the training split) and DATA (/X: test split, samples x "
                                   "features; /y: labels).")
    p.add_argument("model", help="output model file (HDF5)")
    p.add_argument("data", help="output data file (HDF5) with /X and /y")
    p.add_argument("--seed", type=int, default=0, help="random seed of the split and the training (default: 0)")
    p.add_argument("--hidden", type=lambda t: _ints(t, len(t.split(",")), "--hidden"), default=(64, 32),
                   metavar="H[,H...]", help="hidden layer sizes (default: 64,32)")
    p.add_argument("--dataset", choices=("digits", "wine", "breast_cancer"), default="digits",
                   help="scikit-learn bundled dataset (default: digits)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")

    p = sub.add_parser("infer", help="adaptive layered inference of an MLP with certified predictions (mpiexec)",
                       description="Every layer through layered products with certified bounds propagated through "
                                   "the layers; a sample stops as soon as its prediction is certified equal to the "
                                   "exact one-shot quantised prediction, the others are refined. Rank 0 reads the "
                                   "inputs and hands a block of samples to every rank. Prints a table per "
                                   "resolution and writes /predictions, /resolution (attribute resolutions_total), "
                                   "/predictions_one_shot and /per_resolution.")
    p.add_argument("model", help="model file written by 'mpilayer example-model' (or the same layout)")
    p.add_argument("data", help="inputs as FILE:/DATASET, samples x features (default dataset: /X)")
    p.add_argument("-o", "--output", required=True, help="output HDF5 file")
    p.add_argument("--bits", type=int, default=8,
                   help="fixed-point bits of weights and activations, 2..16 (default: 8)")
    p.add_argument("--component-bits", type=_component_bits, default=None, metavar="W[,W...]",
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
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")

    p = sub.add_parser("stream", help="fixed A times a stream of items, each with a deadline (mpiexec)",
                       description="A (M x K, HDF5) stays resident on the workers; the items X_t (an HDF5 dataset "
                                   "of shape (T, K, B), or (T, K) for vectors) arrive one by one, item t at t/RATE "
                                   "seconds after the stream starts (all at once without --rate), and each must be "
                                   "done DEADLINE seconds after its arrival. Items are served earliest deadline "
                                   "first, each in resolution order; at an item's deadline its pending work is "
                                   "dropped and every tile keeps its best resolution with a certified bound. The "
                                   "output holds /estimates, /items (arrival, deadline, latency, resolution, bound, "
                                   "met, bytes) and, with --compare one-shot, the same for a one-shot pass over the "
                                   "same items, deadlines and ranks in /one_shot, plus /comparison; it is replaced "
                                   "atomically as items finish.")
    p.add_argument("a", help="A as FILE:/DATASET (M x K; float32/64 or int8/16/32, uint8/16)")
    p.add_argument("x", help="the items as FILE:/DATASET, shape (T, K, B) or (T, K)")
    p.add_argument("-o", "--output", required=True, help="output HDF5 file")
    add_product_options(p)
    p.add_argument("--rate", type=float, default=None, metavar="ITEMS_PER_S",
                   help="items arrive at this rate from the start of the stream (default: all at the start)")
    p.add_argument("--deadline", type=_seconds, default=None, metavar="SECONDS",
                   help="each item's deadline, in seconds after its arrival (default: none)")
    p.add_argument("--compare", choices=("one-shot", "none"), default="none",
                   help="one-shot: afterwards run the same stream (items, arrivals, deadlines, ranks) with a "
                        "single --bits-bit component and print the comparison (default: none)")
    p.add_argument("--tile", type=lambda t: _ints(t, 2, "--tile"), default=None, metavar="ROWS,COLS",
                   help="tile of A X_t per mini-job (default: rows M/(2 workers), at least 16, at most 512; "
                        "columns all of B up to 512)")
    p.add_argument("--k-panel", type=int, default=None, metavar="K",
                   help="split the inner dimension into panels of K (default: all of K unless the memory "
                        "budget needs panels)")
    p.add_argument("--memory", type=_bytes, default=DEFAULT_MEMORY, metavar="BYTES",
                   help="memory budget per rank, e.g. 512M, 4G; A is resident on a worker within half of it, "
                        "else split over the workers (default: 2G)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no line per item; only the summary table on stdout")

    p = sub.add_parser("example-stream", help="write a random A and a stream of items X to HDF5, for stream",
                       description="Random A (M x K) in A_FILE:/A and the items X (T x K x B, or T x K with "
                                   "--shape M,K) in X_FILE:/X, one item per chunk. Integers cover their dtype's "
                                   "full range; floats are standard normals.")
    p.add_argument("a_file")
    p.add_argument("x_file")
    p.add_argument("--shape", type=lambda t: _ints(t, len(t.split(",")) if len(t.split(",")) in (2, 3) else 3,
                                                   "--shape"),
                   required=True, metavar="M,K[,B]")
    p.add_argument("--items", type=int, required=True, metavar="T", help="number of items")
    p.add_argument("--dtype", default="int8",
                   choices=("int8", "int16", "int32", "uint8", "uint16", "float32", "float64"),
                   help="element type (default: int8)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p = sub.add_parser("adaptive", help="adaptive resolution: stop refining rows whose decision is certified",
                       description="Rows of A are items. After each resolution, a row whose decision is certified "
                                   "by the bounds (top1: the argmax of its output row; threshold:T: every output "
                                   "against T) stops; the others are refined. Prints the fraction settled and the "
                                   "work per resolution, and checks every decision against the exact product. "
                                   "Run under mpiexec to split the rows over ranks.")
    p.add_argument("a", help="A as FILE:/DATASET (rows are the items)")
    p.add_argument("b", help="B as FILE:/DATASET")
    p.add_argument("-o", "--output", required=True, help="output HDF5: /decisions, /resolution, /per_resolution")
    p.add_argument("--rule", default="top1", help="top1 or threshold:T (default: top1)")
    add_product_options(p)
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p = sub.add_parser("deadline-experiment",
                       help="the paper's deadline experiment: a Poisson stream of jobs, layered vs one-shot (mpiexec)",
                       description="Jobs A @ B_t (int8, generated from --seed) arrive at --rate per second; each is "
                                   "split into mini-jobs per layer (component pairs (i, j) with i + j = layer, m "
                                   "components per operand -> 2m - 1 layers) or run one-shot (one layer holding all "
                                   "the work), on the same ranks, arrivals and service-time seed, layered first. "
                                   "Workers compute every mini-job exactly, then sleep an emulated service time "
                                   "scaled by its share of the work. Reports per layer the mean delay and "
                                   "P(delay <= deadline); writes delays.csv, summary.csv, success_vs_deadline.csv and "
                                   "two PNG plots to --out. See jobs/deadline_experiment.py.")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    p.add_argument("--jobs", type=int, default=200, metavar="N", help="jobs per mode (default: 200)")
    p.add_argument("--rate", type=float, default=15.0, metavar="JOBS_PER_S",
                   help="Poisson arrival rate of jobs, per second (default: 15)")
    p.add_argument("--service-time", type=_service_time, default="exp:0.2", metavar="MODEL",
                   help="emulated service time of a WHOLE job (exp:MEAN, shifted-exp:SHIFT,MEAN, plus "
                        "straggler:RANK:FACTOR clauses; see matmul --help); a mini-job sleeps its share of the work "
                        "times a fresh draw (default: exp:0.2)")
    p.add_argument("--components", type=int, default=2, metavar="M",
                   help="components per operand, of (nearly) equal width of the 8 bits; 2M-1 layers (default: 2: "
                        "4+4 bits, layers of 1, 2, 1 quarter-products)")
    p.add_argument("--tiles", type=int, default=1, metavar="T",
                   help="also split every mini-job (layered and one-shot) into T row blocks of A (default: 1)")
    p.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                   help="deadline after arrival for the P(meet) column (default: 10 x the mean service time of "
                        "one component pair of a job, i.e. 10 x MEAN/M**2)")
    p.add_argument("--order", choices=("layer", "job"), default="layer",
                   help="layered scheduling: layer = lowest layer of any arrived job first, then arrival; "
                        "job = FIFO by job arrival, then layer (default: layer)")
    p.add_argument("--redundancy", type=float, default=0.0, metavar="R",
                   help="a worker with nothing ready takes a copy of the most urgent outstanding mini-job, up to "
                        "R x the mini-jobs issued (e.g. 0.2 = 20%% extra); the first result wins (default: 0)")
    p.add_argument("--shape", type=lambda t: _ints(t, 3, "--shape"), default=(128, 256, 128), metavar="M,K,N",
                   help="A is M x K, every B_t is K x N (default: 128,256,128)")
    p.add_argument("--seed", type=int, default=0, help="seed of operands, arrivals and service times (default: 0)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "matmul":
            from .jobs import matmul
            return matmul.run(args, START)
        if args.command == "example":
            from .example_data import write_example
            a, b = write_example(args.a_file, args.b_file, args.shape, args.dtype, args.seed, force=args.force)
            print(f"wrote {a} and {b}")
            return 0
        if args.command == "selftest":
            from .jobs import selftest
            return selftest.run(args)
        if args.command == "info":
            from .result_info import describe_result
            print(describe_result(args.path))
            return 0
        if args.command == "cleanup":
            from .run_guard import cleanup
            print(cleanup(args.output))
            return 0
        if args.command == "adaptive":
            from .jobs import adaptive
            return adaptive.run(args)
        if args.command == "bench":
            if args.bench == "mpi":
                from .jobs import bench_mpi
                return bench_mpi.run(args)
            if args.bench == "accuracy":
                from .jobs import bench_accuracy
                return bench_accuracy.run(args)
            if args.bench == "vs-dask":
                from .jobs import bench_vs_dask
                return bench_vs_dask.run(args)
            if args.bench == "stragglers":
                from .jobs import bench_stragglers
                return bench_stragglers.run(args)
            from .jobs import bench_kernels
            return bench_kernels.run(args)
        if args.command == "example-model":
            from .jobs import example_model
            return example_model.run(args)
        if args.command == "infer":
            from .jobs import infer
            return infer.run(args)
        if args.command == "scaling":
            from .jobs import scaling
            return scaling.run(args)
        if args.command == "stream":
            from .jobs import stream
            return stream.run(args, START)
        if args.command == "example-stream":
            from .jobs import example_stream
            return example_stream.run(args)
        if args.command == "deadline-experiment":
            from .jobs import deadline_experiment
            return deadline_experiment.run(args, START)
    except MpilayerError as err:
        print(f"mpilayer: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mpilayer: interrupted", file=sys.stderr)
        return 130
    return 0


def entry_point() -> None:
    """Console script: a crash on any rank aborts the whole MPI job instead of hanging it."""
    try:
        code = main()
    except SystemExit:
        raise
    except BaseException:
        import traceback
        traceback.print_exc()
        mpi = sys.modules.get("mpi4py.MPI")
        if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized() and mpi.COMM_WORLD.Get_size() > 1:
            mpi.COMM_WORLD.Abort(1)
        sys.exit(1)
    sys.exit(code)
