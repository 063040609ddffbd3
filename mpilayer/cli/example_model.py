"""``mpilayer example-model``: its arguments; the work is in mpilayer.jobs.example_model."""
from __future__ import annotations

from mpilayer.cli.options import add_output, ints

NAME = "example-model"
HELP = "train a small ReLU MLP on a bundled scikit-learn dataset, for infer"


def register(sub) -> None:
    """Add ``example-model`` to the subparsers ``sub``."""
    p = sub.add_parser(NAME, help=HELP,
                       description="Trains an MLP (ReLU hidden layers, linear output) with scikit-learn on a dataset "
                                   "bundled with it (no download) and writes MODEL (/layer0, /layer1, ... each with W "
                                   "(inputs x outputs), b, attributes activation and the activation calibration "
                                   "input_min/input_max from the training split) and DATA (/X: test split, samples x "
                                   "features; /y: labels).")
    add_output(p, ("MODEL", "DATA"), "the two output HDF5 files: the model, and the data with /X and /y", nargs=2,
               quiet="nothing on stdout")
    p.add_argument("--seed", type=int, default=0, help="random seed of the split and the training (default: 0)")
    p.add_argument("--hidden", type=lambda t: ints(t, len(t.split(",")), "--hidden"), default=(64, 32),
                   metavar="H[,H...]", help="hidden layer sizes (default: 64,32)")
    p.add_argument("--dataset", choices=("digits", "wine", "breast_cancer"), default="digits",
                   help="scikit-learn bundled dataset (default: digits)")
    p.set_defaults(_run="mpilayer.jobs.example_model:run")
