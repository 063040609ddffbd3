"""``mpilayer bench accuracy``: what every resolution is worth, on five kinds of data.

For each data set (Gaussian, uniform int8, ReLU activations x Gaussian, a photograph x its
transpose, scikit-learn's digits x a weight matrix), the layered product with 1-bit
components is run twice in this process: with the truncated operands as the estimate (as
mpilayer did before estimates.py: ``zero_point=False`` and the truncated accumulator) and
with the reported estimate. Printed per resolution: the measured relative Frobenius error
``|C_r - C|_F / |C|_F`` against the exact product of the quantised operands (an all-zero
answer scores 1), the run's statistical estimate of it, and the certified bound relative to
``max |C|``. Then the default schedule (``--component-bits auto``) on the same data, with its
first resolution's predicted and measured time over a float64 product of the same operands
(one thread, timed in turn, best of 5: issue 11's cost budget).
"""
from __future__ import annotations

import numpy as np

import time

from mpilayer.core.layered import layered_matmul, prepare, relative_error
from mpilayer.core.schedule import first_resolution_cost, resolve_split


def data_sets(seed: int = 2026) -> dict:
    from sklearn.datasets import load_digits, load_sample_image
    rng = np.random.default_rng(seed)
    g = lambda *s: rng.standard_normal(s)  # noqa: E731
    photo = load_sample_image("china.jpg").astype(np.float64).mean(axis=2)
    return {
        "gaussian 300x700 @ 700x200": (g(300, 700), g(700, 200)),
        "uniform int8": (rng.integers(-128, 128, (300, 700)).astype(np.int8),
                         rng.integers(-128, 128, (700, 200)).astype(np.int8)),
        "relu(gaussian) @ gaussian": (np.maximum(g(300, 700), 0), g(700, 200)),
        "photo @ photo.T (china.jpg)": (photo, np.ascontiguousarray(photo.T)),
        "digits @ weights": (load_digits().data, g(64, 100) / 8),
    }


def truncated_errors(A, B, bits: int, component_bits) -> list:
    """Relative error of the plain truncated product ``T_A T_B`` (the estimate before estimates.py)."""
    product, _ = prepare(A, B, bits, component_bits, zero_point=False)
    out, accs = [], []
    while not product.done:
        product.increment()
        accs.append(product.acc.copy())
    exact = accs[-1]
    sa, sb = product.sa, product.sb
    for acc in accs:
        scale = 1.0 if sa is None else sa[:, None] * sb[None, :]
        out.append(relative_error(acc * scale, exact * scale))
    return out


def first_resolution_ratio(A, B, bits: int, widths, repeat: int = 5) -> float:
    """Measured time to the first resolution (validation and quantisation included) over a
    float64 product of the same operands, each the best of ``repeat`` runs timed in turn."""
    A64, B64 = np.asarray(A, dtype=np.float64), np.asarray(B, dtype=np.float64)

    def first():
        next(iter(layered_matmul(A, B, bits=bits, component_bits=widths)))

    best = [float("inf"), float("inf")]
    for i in range(repeat + 1):  # the first round warms up
        for j, fn in enumerate((first, lambda: A64 @ B64)):
            t0 = time.perf_counter()
            fn()
            if i:
                best[j] = min(best[j], time.perf_counter() - t0)
    return best[0] / best[1]


def run(args) -> int:
    bits = args.bits
    print(f"mpilayer bench accuracy: {bits}-bit operands, 1-bit components; relative error = "
          "|C_r - C|_F / |C|_F against the exact quantised product (0 = exact, 1 = no better than zeros)")
    for name, (A, B) in data_sets(args.seed).items():
        res = list(layered_matmul(A, B, bits=bits, component_bits=1))
        exact = res[-1].estimate
        scale = float(np.abs(exact).max()) or 1.0
        before = truncated_errors(A, B, bits, 1)
        print(f"\n{name}")
        print(f"  {'bits kept':>9} {'truncated (before)':>19} {'estimate':>9} {'estimated':>10} {'ratio':>6} "
              f"{'bound / max|C|':>15}")
        prev = None
        for r, b in zip(res, before):
            err = r.relative_error(exact)
            ratio = f"{err / prev:6.2f}" if prev else "      "
            print(f"  {r.index + 1:>9} {b:>19.4g} {err:>9.4f} {r.error_estimate:>10.4f} {ratio} "
                  f"{r.error_bound / scale:>15.4g}")
            prev = err if err else None
        m, k = np.shape(A)
        n = np.shape(B)[1]
        widths = resolve_split(bits, "auto", m, n, k, args.budget).widths
        auto = list(layered_matmul(A, B, bits=bits, component_bits=widths))
        print(f"  default schedule (auto): components {'+'.join(map(str, widths))}, first resolution "
              f"predicted at {first_resolution_cost(widths, bits, m, n, k):.3f}x a float64 product, "
              f"measured {first_resolution_ratio(A, B, bits, widths):.3f}x; relative error per resolution: "
              + ", ".join(f"{r.relative_error(exact):.3g} (est. {r.error_estimate:.3g})" for r in auto))
    return 0
