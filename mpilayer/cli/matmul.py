"""``mpilayer matmul``: its arguments; the work is in mpilayer.jobs.matmul."""
from __future__ import annotations

import argparse

from mpilayer.cli.options import (add_deadline, add_output, add_panel_and_memory, add_product_options,
                                  add_stragglers, add_tile, seconds)

NAME = "matmul"
HELP = "layered product of two HDF5 matrices (run under mpiexec/srun)"


def register(sub) -> None:
    """Add ``matmul`` to the subparsers ``sub``."""
    p = sub.add_parser(NAME, help=HELP,
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
    add_tile(p, "tile of C per mini-job (default: 512,512, smaller for small matrices; with a distributed result "
                "(--layout), S x S with S = sqrt(M N / (8 workers)) rounded to a multiple of 64, within 512..2048 "
                "and 1/8 of --memory at 32 bytes an element: 8 tiles per worker and resolution, few mini-jobs for "
                "the master)")
    p.add_argument("--progress-every", type=seconds, default=30.0, metavar="SECONDS",
                   help="when stdout is not a terminal (a batch job's log), a line with the tiles done in the "
                        "resolution under way at most this often, the first after this long (on a terminal: a "
                        "progress bar; -q: neither) (default: 30)")
    p.add_argument("--keep", choices=("latest", "all"), default="latest",
                   help="'all' also stores each resolution r in /resolutions/<r> (default: latest)")
    add_panel_and_memory(p, "memory budget per rank for operand blocks and caches, e.g. 512M, 4G (default: 2G)")
    p.add_argument("--prefetch", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--grace", type=seconds, default=0.0, metavar="SECONDS",
                   help="after the deadline, keep results arriving within this many seconds (default: 0)")
    add_stragglers(p, all_lost=", exit status 4")
    p.add_argument("--code", default="none", metavar="CODE",
                   help="exact coded redundancy over row blocks of A: every group of K row blocks (per tile "
                        "column, k-panel and resolution) gets N-K extra parity jobs on integer combinations of "
                        "the blocks, each row of a group on a different worker, and the first K results of a "
                        "group give all K exactly (decoded in integer arithmetic). 'parity:K' (N = K+1), "
                        "'parity' (K = worker ranks - 1), 'mds:N,K' (any N-K workers may fail to answer); "
                        "needs at least N worker ranks; costs (N-K)/K more work (default: none)")
    p.add_argument("--layout", choices=("auto", "single", "distributed"), default="auto",
                   help="single: C in OUTPUT, written by rank 0; distributed: each worker writes the tiles it "
                        "computes to OUTPUT.parts/ and OUTPUT is a small index (HDF5 virtual datasets) that "
                        "h5py and mpilayer read like a single file ('mpilayer info OUTPUT --gather FILE' makes "
                        "one); needs shared inputs and output directory, no --code; auto: "
                        "distributed when C is 64 MiB or more (as float64) and it can be (default: auto)")
    p.set_defaults(_run="mpilayer.jobs.matmul:run")
