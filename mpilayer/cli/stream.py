"""``mpilayer stream``: its arguments; the work is in mpilayer.jobs.stream."""
from __future__ import annotations

from mpilayer.cli.options import (Renamed, add_output, add_panel_and_memory, add_product_options, add_stragglers,
                                  add_tile, seconds)

NAME = "stream"
HELP = "fixed A times a stream of items, each with a deadline (mpiexec)"


def register(sub) -> None:
    """Add ``stream`` to the subparsers ``sub``."""
    p = sub.add_parser(NAME, help=HELP,
                       description="A (M x K, HDF5) stays resident on the workers; the items X_t (an HDF5 dataset "
                                   "of shape (T, K, B), or (T, K) for vectors) arrive one by one, item t at t/RATE "
                                   "seconds after the stream starts (all at once without --rate), and each must be "
                                   "done --item-deadline seconds after its arrival. Items are served earliest deadline "
                                   "first, each in resolution order; at an item's deadline its pending work is "
                                   "dropped and every tile keeps its best resolution with a certified bound. The "
                                   "output holds /estimates, /items (arrival, deadline, latency, resolution, bound, "
                                   "met, bytes) and, with --compare one-shot, the same for a one-shot pass over the "
                                   "same items, deadlines and ranks in /one_shot, plus /comparison; it is replaced "
                                   "atomically as items finish.")
    p.add_argument("a", help="A as FILE:/DATASET (M x K; float32/64 or int8/16/32, uint8/16)")
    p.add_argument("x", help="the items as FILE:/DATASET, shape (T, K, B) or (T, K)")
    add_output(p, "FILE", "output HDF5 file", quiet="no line per item; only the summary table on stdout")
    add_product_options(p)
    p.add_argument("--rate", type=float, default=None, metavar="ITEMS_PER_S",
                   help="items arrive at this rate from the start of the stream (default: all at the start)")
    p.add_argument("--item-deadline", type=seconds, default=None, metavar="SECONDS",
                   help="each item's deadline, in seconds after its arrival (default: none)")
    p.add_argument("--deadline", action=Renamed, new="--item-deadline SECONDS (each item's deadline after its arrival)")
    p.add_argument("--compare", choices=("one-shot", "none"), default="none",
                   help="one-shot: afterwards run the same stream (items, arrivals, deadlines, ranks) with a "
                        "single --bits-bit component and print the comparison (default: none)")
    add_tile(p, "tile of A X_t per mini-job (default: rows M/(2 workers), at least 16, at most 512; "
                "columns all of B up to 512)")
    add_panel_and_memory(p, "memory budget per rank, e.g. 512M, 4G; A is resident on a worker within half of it, "
                            "else split over the workers (default: 2G)")
    add_stragglers(p)
    p.set_defaults(_run="mpilayer.jobs.stream:run")
