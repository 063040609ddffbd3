"""``mpilayer selftest``: its arguments; the work is in mpilayer.jobs.selftest."""
from __future__ import annotations

NAME = "selftest"
HELP = "check every SIMD kernel path of this CPU against the portable one, bit for bit"


def register(sub) -> None:
    """Add ``selftest`` to the subparsers ``sub``."""
    p = sub.add_parser(NAME, help=HELP,
                       description="Runs each SIMD path this CPU supports (AVX2, AVX-512 VPOPCNTDQ, AVX512-VNNI, "
                                   "AVX-VNNI) on random, extreme and odd-sized operands against the portable C path; "
                                   "prints one line per path (ok/FAIL, rate) and exits 1 on any mismatch. Writes "
                                   "nothing.")
    p.set_defaults(_run="mpilayer.jobs.selftest:run")
