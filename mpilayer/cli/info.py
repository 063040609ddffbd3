"""``mpilayer info``: a result file described (by mpilayer.io.result_info), and optionally gathered."""
from __future__ import annotations

NAME = "info"
HELP = "human summary of a result file"


def register(sub) -> None:
    """Add ``info`` to the subparsers ``sub``."""
    p = sub.add_parser(NAME, help=HELP,
                       description="Prints what a result file of matmul (or scaling's work files) holds: shape, "
                                   "resolution reached (numbered from 0), exactness, certified error bound, why "
                                   "the run stopped, every attribute of /C, how many tiles reached each "
                                   "resolution and the timeline; for the outputs of stream, infer and adaptive, "
                                   "their attributes, datasets and tables. Writes nothing (except with --gather and --plot).")
    p.add_argument("path", help="HDF5 file written by mpilayer matmul, stream, infer or adaptive")
    p.add_argument("--plot", default=None, metavar="IMAGE",
                   help="also draw a matmul result's timeline (estimated relative error and certified bound of "
                        "each resolution against time) to IMAGE (.png, .svg or .pdf)")
    p.add_argument("--gather", default=None, metavar="FILE",
                   help="also copy a result (a distributed one: its index and part files) into FILE, one ordinary "
                        "result file")
    p.set_defaults(_run="mpilayer.cli.info:run")


def run(args) -> int:
    from mpilayer.io.result_info import describe_result
    print(describe_result(args.path))
    if args.plot:
        from mpilayer.io.timeline_plot import plot_timeline
        plot_timeline(args.path, args.plot)
        print(f"timeline plot -> {args.plot}")
    if args.gather:
        from mpilayer.io.distributed_store import gather
        gather(args.path, args.gather)
        print(f"gathered -> {args.gather}")
    return 0
