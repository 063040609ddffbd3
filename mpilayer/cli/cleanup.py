"""``mpilayer cleanup``: what a killed run left beside its output removed (by mpilayer.io.run_guard)."""
from __future__ import annotations

NAME = "cleanup"
HELP = "remove the scratch files and lock a killed run left beside an output"


def register(sub) -> None:
    """Add ``cleanup`` to the subparsers ``sub``."""
    p = sub.add_parser(NAME, help=HELP,
                       description="Removes .OUTPUT.work.h5, .OUTPUT.acc.h5, .OUTPUT.tmp-PID.h5 and OUTPUT.lock "
                                   "left by a run that was killed (SIGKILL, node crash); refuses while a live run "
                                   "holds OUTPUT.lock. The next matmul run on OUTPUT does the same by itself.")
    p.add_argument("output", help="the OUTPUT given to the killed run's -o")
    p.set_defaults(_run="mpilayer.cli.cleanup:run")


def run(args) -> int:
    from mpilayer.io.run_guard import cleanup
    print(cleanup(args.output))
    return 0
