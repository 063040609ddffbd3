"""``mpilayer scaling``: its arguments; the work is in mpilayer.jobs.scaling."""
from __future__ import annotations

import os

from mpilayer.cli.options import add_dtype, add_output, add_product_options, add_shape, add_tile, seconds

NAME = "scaling"
HELP = "strong/weak scaling sweep of matmul, with CSV, JSON and plots"


def register(sub) -> None:
    """Add ``scaling`` to the subparsers ``sub``."""
    p = sub.add_parser(NAME, help=HELP,
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
    p.add_argument("--timeout", type=seconds, default=3600.0, metavar="SECONDS",
                   help="kill a run that takes longer than this and record it as failed (default: 3600)")
    p.add_argument("--keep-files", action="store_true",
                   help="keep the generated inputs and each run's result file in DIR/work")
    p.set_defaults(_run="mpilayer.jobs.scaling:run")
