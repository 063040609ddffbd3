"""``mpilayer bench WHICH``: the benchmarks' arguments; the work is in mpilayer.jobs.bench_<which>."""
from __future__ import annotations

from mpilayer.cli.options import add_component_bits, add_dtype, add_output, add_shape, add_tile

NAME = "bench"
HELP = "benchmarks (kernels: one process; mpi: under mpiexec)"


TMPDIR_HELP = ("where a temporary directory holds the generated inputs and outputs, removed at the end "
               "(default: the system's temporary directory)")


def register(sub) -> None:
    """Add ``bench`` to the subparsers ``sub``."""
    p = sub.add_parser(NAME, help=HELP,
                       description="Benchmarks: each prints its table on stdout; they write only temporary files, "
                                   "except 'bench kernels -o FILE.json'. 'mpilayer bench WHICH --help' for each.")
    bench = p.add_subparsers(dest="bench", metavar="WHICH")
    bench.required = True
    pk = bench.add_parser("kernels", help="layered product vs numpy float64/float32 matmul, one core",
                          description="Times, side by side in one process with one BLAS thread, numpy float64 "
                                      "and float32 matmul and the layered product of int8 operands, and prints "
                                      "time per resolution, ratios, kernel rates (with each path's instruction "
                                      "peak), bound vs true error and the relative error of every resolution; "
                                      "with -o, also the results as JSON.")
    add_shape(pk, 2048, "times n x n x n products (default: 2048)", square=True, old_n=True)
    pk.add_argument("--repeat", type=int, default=3, help="timed repetitions, best kept (default: 3)")
    pk.add_argument("--schedules", default="auto;1;4,4",
                    help="component splits to time, ';'-separated: auto (the command line's default), "
                         "default (1,7), or widths (default: 'auto;1;4,4')")
    add_output(pk, "FILE.json", "also write the results as JSON to this file (default: none)", required=False,
               old="--json")
    pk.set_defaults(_run="mpilayer.jobs.bench_kernels:run")
    pm = bench.add_parser("mpi", help="one process vs 1 master + 2 workers on the same problem",
                          description="Runs mpilayer matmul with 1 and with 3 ranks under mpiexec on a generated "
                                      "int8 problem and prints the throughput ratio, time and bytes per "
                                      "resolution, the master's CPU share and the deadline overshoot. Writes only "
                                      "temporary files.")
    add_shape(pm, 3072, "times n x n x n products (default: 3072)", square=True, old_n=True)
    pm.add_argument("--repeat", type=int, default=3, help="runs per configuration, best kept (default: 3)")
    add_component_bits(pm, help="component split, as matmul's (default: auto, matmul's default schedule)")
    pm.set_defaults(_run="mpilayer.jobs.bench_mpi:run")
    pa = bench.add_parser("accuracy", help="relative error of every resolution on five kinds of data",
                          description="Per resolution (1-bit components): measured relative Frobenius error of "
                                      "the truncated product and of the reported estimate, the run's statistical "
                                      "estimate, and the certified bound; then the default schedule. Writes nothing.")
    pa.add_argument("--bits", type=int, default=8, help="fixed-point bits (default: 8)")
    pa.add_argument("--budget", type=float, default=0.15, help="budget of the default schedule (default: 0.15)")
    pa.add_argument("--seed", type=int, default=2026, help="random seed of the generated data (default: 2026)")
    pa.set_defaults(_run="mpilayer.jobs.bench_accuracy:run")
    pd = bench.add_parser("vs-dask", help="float32 HDF5 end to end: Dask vs mpiexec -n 3 mpilayer matmul",
                          description="Generates float32 Gaussian A, B in HDF5 and times whole processes, "
                                      "alternating, best of R: Dask (float32, 2 threads, da.from_array on h5py, "
                                      "to_hdf5), mpilayer matmul --bits 8, --bits 16, and --bits 8 with a deadline "
                                      "of a fraction of Dask's time; prints wall time, ratio to Dask, resolutions "
                                      "reached and the relative error against the float64 product. Writes only "
                                      "temporary files (in --tmpdir). Needs dask[array]: pip install "
                                      "'mpilayer[bench]'.")
    add_shape(pd, 4096, "times n x n x n products (default: 4096)", square=True, old_n=True)
    pd.add_argument("--repeat", type=int, default=3, help="runs per configuration, best kept (default: 3)")
    pd.add_argument("--dask-chunk", type=int, default=None, help="Dask chunk edge (default: n/2)")
    pd.add_argument("--deadline-fraction", type=float, default=0.3,
                    help="deadline of the last run, times the best Dask time (default: 0.3)")
    pd.add_argument("--seed", type=int, default=0, help="random seed of A and B (default: 0)")
    pd.add_argument("--tmpdir", default=None, help=TMPDIR_HELP)
    pd.set_defaults(_run="mpilayer.jobs.bench_vs_dask:run")
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
    ps.set_defaults(_run="mpilayer.jobs.bench_stragglers:run")
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
    pb.set_defaults(dtype="float32", _run="mpilayer.jobs.bench_master:run")
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
    pb.add_argument("--tmpdir", default=None, help=TMPDIR_HELP)
