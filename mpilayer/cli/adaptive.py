"""``mpilayer adaptive``: its arguments; the work is in mpilayer.jobs.adaptive."""
from __future__ import annotations

from mpilayer.cli.options import add_output, add_product_options

NAME = "adaptive"
HELP = "adaptive resolution: stop refining rows whose decision is certified"


def register(sub) -> None:
    """Add ``adaptive`` to the subparsers ``sub``."""
    p = sub.add_parser(NAME, help=HELP,
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
    p.set_defaults(_run="mpilayer.jobs.adaptive:run")
