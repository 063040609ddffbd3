"""``mpilayer example``: random test matrices A and B in HDF5 (written by mpilayer.io.example_data)."""
from __future__ import annotations

from mpilayer.cli.options import add_dtype, add_output, add_shape

NAME = "example"
HELP = "write random test matrices A and B to HDF5"


def register(sub) -> None:
    """Add ``example`` to the subparsers ``sub``."""
    p = sub.add_parser(NAME, help=HELP,
                       description="Writes random A (M x K) in A_FILE:/A and B (K x N) in B_FILE:/B, block "
                                   "by block. Integers cover their dtype's full range; floats are normal.")
    add_output(p, ("A_FILE", "B_FILE"), "the two output HDF5 files (A in /A, B in /B)", nargs=2,
               quiet="nothing on stdout")
    add_shape(p, help="A is M x K, B is K x N; a single N means N,N,N")
    add_dtype(p)
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(_run="mpilayer.cli.example:run")


def run(args) -> int:
    from mpilayer.io.example_data import write_example
    a, b = write_example(*args.output, args.shape, args.dtype, args.seed, force=args.force)
    if not args.quiet:
        print(f"wrote {a} and {b}")
    return 0
