"""``mpilayer example-stream``: its arguments; the work is in mpilayer.jobs.example_stream."""
from __future__ import annotations

from mpilayer.cli.options import add_dtype, add_output, ints

NAME = "example-stream"
HELP = "write a random A and a stream of items X to HDF5, for stream"


def register(sub) -> None:
    """Add ``example-stream`` to the subparsers ``sub``."""
    p = sub.add_parser(NAME, help=HELP,
                       description="Writes random A (M x K) in A_FILE:/A and the items X (T x K x B, or T x K with "
                                   "--shape M,K) in X_FILE:/X, one item per chunk. Integers cover their dtype's "
                                   "full range; floats are standard normals.")
    add_output(p, ("A_FILE", "X_FILE"), "the two output HDF5 files (A in /A, the items in /X)", nargs=2,
               quiet="nothing on stdout")
    p.add_argument("--shape", type=lambda t: ints(t, len(t.split(",")) if len(t.split(",")) in (2, 3) else 3,
                                                   "--shape"),
                   required=True, metavar="M,K[,B]", help="A is M x K, each item K x B (K without B: vectors)")
    p.add_argument("--items", type=int, required=True, metavar="T", help="number of items")
    add_dtype(p)
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(_run="mpilayer.jobs.example_stream:run")
