"""``mpilayer deadline-experiment``: its arguments; the work is in mpilayer.jobs.deadline_experiment."""
from __future__ import annotations

from mpilayer.cli.options import Deprecated, Renamed, add_component_bits, add_output, add_shape, service_time

NAME = "deadline-experiment"
HELP = "the paper's deadline experiment: a Poisson stream of jobs, layered vs one-shot (mpiexec)"


def register(sub) -> None:
    """Add ``deadline-experiment`` to the subparsers ``sub``."""
    p = sub.add_parser(NAME, help=HELP,
                       description="Jobs A @ B_t (int8, generated from --seed) arrive at --rate per second; each is "
                                   "split into mini-jobs per layer (component pairs (i, j) with i + j = layer, m "
                                   "components per operand -> 2m - 1 layers) or run one-shot (one layer holding all "
                                   "the work), on the same ranks, arrivals and service-time seed, layered first. "
                                   "Workers compute every mini-job exactly, then sleep an emulated service time "
                                   "scaled by its share of the work. Reports per layer the mean delay and "
                                   "P(delay <= --threshold); writes delays.csv, summary.csv, "
                                   "success_vs_deadline.csv and "
                                   "two PNG plots to -o DIR. Layers are numbered from 0, like resolutions. See "
                                   "jobs/deadline_experiment.py.")
    add_output(p, "DIR", "output directory (created if missing; refuses one holding a result without --force)",
               old="--out", quiet="only the summary table and the files written on stdout")
    p.add_argument("--jobs", type=int, default=200, metavar="N", help="jobs per mode (default: 200)")
    p.add_argument("--rate", type=float, default=15.0, metavar="JOBS_PER_S",
                   help="Poisson arrival rate of jobs, per second (default: 15)")
    p.add_argument("--service-time", type=service_time, default="exp:0.2", metavar="MODEL",
                   help="emulated service time of a WHOLE job (exp:MEAN, shifted-exp:SHIFT,MEAN, plus "
                        "straggler:RANK:FACTOR clauses; see matmul --help); a mini-job sleeps its share of the work "
                        "times a fresh draw (default: exp:0.2)")
    add_component_bits(p, default=4, auto=False,
                       help="widths of the M components per operand, an (almost) equal split of the 8 bits, widest "
                            "first; a single W means W-bit components, e.g. 4 = 4,4, 3 = 3,3,2, 2 = 2,2,2,2; "
                            "2M-1 layers (default: 4: layers of 1, 2, 1 quarter-products)")
    p.add_argument("--components", type=int, dest="components", action=Deprecated, new="--component-bits W")
    p.add_argument("--row-blocks", type=int, default=1, metavar="T",
                   help="also split every mini-job (layered and one-shot) into T row blocks of A (default: 1)")
    p.add_argument("--tiles", type=int, dest="row_blocks", action=Deprecated, new="--row-blocks T")
    p.add_argument("--threshold", type=float, default=None, metavar="SECONDS",
                   help="delay after arrival for the P(delay <= threshold) column; the runs have no deadline "
                        "(default: 10 x the mean service time of one component pair of a job, i.e. 10 x MEAN/M**2)")
    p.add_argument("--deadline", action=Renamed, new="--threshold SECONDS (the delay of the P(meet) column)")
    p.add_argument("--order", choices=("layer", "job"), default="layer",
                   help="layered scheduling: layer = lowest layer of any arrived job first, then arrival; "
                        "job = FIFO by job arrival, then layer (default: layer)")
    p.add_argument("--redundancy", type=float, default=0.0, metavar="R",
                   help="when nothing is ready, a free worker takes a copy of the most urgent straggling mini-job "
                        "(out for over 2 median turnarounds), up to R x the mini-jobs issued (e.g. 0.2 = 20%% "
                        "extra); the first result wins, the other copy is cancelled (default: 0)")
    add_shape(p, (128, 256, 128), "A is M x K, every B_t is K x N; a single N means N,N,N (default: 128,256,128)")
    p.add_argument("--seed", type=int, default=0, help="seed of operands, arrivals and service times (default: 0)")
    p.set_defaults(_run="mpilayer.jobs.deadline_experiment:run")
