"""``mpilayer infer``: its arguments; the work is in mpilayer.jobs.infer."""
from __future__ import annotations

from mpilayer.cli.options import add_component_bits, add_output

NAME = "infer"
HELP = "adaptive layered inference of an MLP with certified predictions (mpiexec)"


def register(sub) -> None:
    """Add ``infer`` to the subparsers ``sub``."""
    p = sub.add_parser(NAME, help=HELP,
                       description="Every layer through layered products with certified bounds propagated through "
                                   "the layers; a sample stops as soon as its prediction is certified equal to the "
                                   "exact one-shot quantised prediction, the others are refined. Rank 0 reads the "
                                   "inputs and hands a block of samples to every rank. Prints a table per "
                                   "resolution and writes /predictions, /resolution (0-based; attribute "
                                   "resolutions_total), "
                                   "/predictions_one_shot and /per_resolution.")
    p.add_argument("model", help="model file written by 'mpilayer example-model' (or the same layout)")
    p.add_argument("data", help="inputs as FILE:/DATASET, samples x features (default dataset: /X)")
    add_output(p, "FILE", "output HDF5 file", quiet="only the last line on stdout")
    p.add_argument("--bits", type=int, default=8,
                   help="fixed-point bits of weights and activations, 2..16 (default: 8)")
    add_component_bits(p, default=None, auto=False,
                   help="widths of the resolution components, most significant first, summing to --bits; a single "
                        "W means W-bit components, e.g. 1 for 1-bit upgrades (default: 2,B-3,1, i.e. 2,5,1 for 8 "
                        "bits: measured on the digits MLP, the gap rule stops 98%% of samples at 2 bits, the "
                        "certificate settles 92%% at 7 bits, the rest is exact; see README)")
    p.add_argument("--rule", default="certified", metavar="certified|gap[:T]",
                   help="certified (default): a sample stops only when its prediction is proved equal to the exact "
                        "one-shot quantised prediction; gap[:T]: NOT certified, the paper's rule: stop when the top-2 "
                        "gap of the estimated logits exceeds T times the largest |logit| (default T 0.05); the job "
                        "counts how many predictions then differ from one-shot")
    p.add_argument("--check-from", type=int, default=None, metavar="R",
                   help="first resolution (0-based) at which the rule is tried (default: certified, the first keeping "
                        "min(bits-1, 7) bits: certificates need layer 0 nearly exact; gap, the first keeping 2 bits)")
    p.add_argument("--full", action="store_true",
                   help="compute every sample to the final resolution (the one-shot quantised result) instead of "
                        "stopping settled samples; the table still shows where each would have been certified")
    p.add_argument("--y", default=None, metavar="FILE:/DATASET",
                   help="labels (1-D integers), to report accuracy per resolution (default: none)")
    p.add_argument("--repeat", type=int, default=3, metavar="N",
                   help="time each inference N times on every rank and keep the fastest (default: 3)")
    p.set_defaults(_run="mpilayer.jobs.infer:run")
