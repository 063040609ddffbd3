"""Layered, adaptive inference of a ReLU MLP with certified predictions.

The model
---------
An MLP of layers ``z_l = h_l @ W_l + b_l``, ``h_{l+1} = f_l(z_l)`` with ``f_l`` ReLU or the
identity ("linear"); the prediction is ``argmax_j f_{L-1}(z_{L-1})``, ties to the lowest index.

Exact one-shot quantised inference (the reference every prediction is certified against)
----------------------------------------------------------------------------------------
With ``bits`` b, ``qmax = 2**(b-1) - 1``:

* **Weights**: ``Wq_l = clip(rint(W_l / w_j), -qmax, qmax)`` with one scale per output column,
  ``w_j = max_k |W_l[k, j]| / qmax`` (1 for an all-zero column).
* **Activations** (the input of every layer, including the data) use a FIXED scale per layer,
  calibrated once (``input_min``/``input_max`` attributes of the layer, written by
  ``mpilayer example-model`` from the training data; without them, from the data being
  inferred, on rank 0). A layer whose calibrated input is non-negative (the data with
  ``input_min >= 0``, or any layer after a ReLU) is *unsigned*: ``H = clip(rint(f(v) / s), 0, U)``
  with ``U = 2**b - 1``, ``s = input_max / U``, and is fed to the b-bit signed product as
  ``H - 2**(b-1)`` (an exact shift: the product gains ``2**(b-1) * colsum(Wq)`` back). Otherwise
  it is *signed*: ``H = clip(rint(v / s), -qmax, qmax)``, ``s = input_max / qmax``. Values beyond
  the calibrated range are clipped. ``v`` is the previous layer's ``z`` (``f`` its activation) or
  the data (``f`` the identity).
* **Pre-activation**: ``acc_l = H_l @ Wq_l`` exactly (integers), and
  ``z_l = fl(fl(acc_l * c_l) + b_l)`` in float64 with ``c_l = fl(s_l * w)`` (per column).
* ``H_{l+1} = Q_{l+1}(z_l)`` as above; prediction ``argmax_j f_{L-1}(z_{L-1}[j])``.

Every map after the integer product -- ``acc -> z`` (multiplication by a positive number and
addition, each correctly rounded), ``f``, division by ``s > 0``, ``rint``, ``clip`` -- is
monotone non-decreasing. So an integer interval ``[acc_lo, acc_hi]`` containing ``acc_l``
gives ``H_{l+1} in [Q(z(acc_lo)), Q(z(acc_hi))]`` *exactly*, with no rounding allowance.

Resolution r keeps the top r+1 components of layer 0's input (the only product whose input is
fixed; the gap rule truncates its weights too); the hidden layers' products follow from it.

Certified rule (default)
------------------------
*Layer 0* is layered in its input only: ``acc = T_r(H) @ Wq`` with the weights whole (at the
resolutions where a certificate can succeed the int8 kernel costs the same for any width up to
8 bits, and leaving the weights whole removes half of the error: measured on the digits MLP at
8 bits with exact box products, 4.8% instead of 23% of the samples need the final resolution).
The error ``dA @ Wq``, ``dA = H - T_r(H)`` in ``[0, delta]``, lies in the intersection of
(:meth:`QuantizedMLP.input_interval`)

* the knapsack bounds given each row's sum of ``dA`` (delta on the largest weights first), and
* ``mu_i colsum_j +- |dA_i - mu_i|_2 |Wq_j - nu_j|_2`` (Cauchy-Schwarz on centred vectors),

and the estimate puts the dropped bits at their row mean ``mu_i``. Going from resolution p to r
adds the new input bits times the weights or recomputes ``T_r(H) @ Wq`` in one term, whichever
the kernel cost model says is cheaper.

*Hidden layers*: the exact input ``H_l`` lies in the box ``[H_lo, H_hi] = [Q(z(lo)), Q(z(hi))]``.
The pass computes ``Ht @ Wq`` exactly (``Ht = Q(z(estimate))``, inside the box) and bounds
``(H - Ht) @ Wq`` by Hölder norms (no second product, :meth:`QuantizedMLP.holder_product`). A
linear last layer is certified on the logit *differences*, in which the shared input error
largely cancels: by Hölder norms first (:meth:`QuantizedMLP.top1_by_norms`), then, for the
samples these leave, by float64 matmuls (:meth:`QuantizedMLP.top1_by_differences`); otherwise
:class:`mpilayer.apps.adaptive.Top1` on the output intervals. With ``tight=True`` the samples still
open get a second pass with the exact box ``[H_lo @ Wq + w @ Wq^-, H_lo @ Wq + w @ Wq^+]``
(``w = H_hi - H_lo``; two exact int8 products, the second on ``[Wq^+ | Wq^-]``): on the digits
MLP it cuts the samples needing the final resolution from 8.3% to 4.8% but costs more per
sample than the exact product it avoids, so it is off by default.

A certificate needs layer 0 nearly exact (digits at 8 bits: none settles with 3 input bits
dropped, 56% with 2, 92% with 1) and every attempt costs a pass through the hidden layers, so
by default it is tried from the first resolution keeping ``min(bits - 1, 7)`` bits
(``check_from``); earlier resolutions compute nothing.

Gap rule (``gap[:T]``) -- NOT certified, the paper's rule
--------------------------------------------------------
Layer 0 at resolution r with both operands truncated (cheap binary planes) and the unbiased
affine-fit estimate of mpilayer.core.estimates (zero point per row), the hidden layers exactly on
``Q(z(estimate))``; a sample stops when the top-2 gap of its estimated logits exceeds ``T``
times its largest ``|logit|`` (default T = 0.05), by default from the first resolution keeping
2 bits (with 1 bit the digits estimate is right for 81% of the samples only). Its
predictions can differ from the one-shot ones; the job counts how often.

At the last resolution every interval is a point and every estimate exact, so the decision is
the one-shot one. Adaptive: after each checked resolution, settled samples stop; only the
others are computed at the next one. With ``adaptive=False`` (``--full``) every sample runs to
the final resolution while still recording where it would have settled.

Work is the kernel cost model (products.term_cost, seconds on one core) of every integer
product actually computed (binary-plane and int8 terms, including the int8 kernel's digit
preparation, which dominates at these sizes) plus the float64 matmuls of the logit-difference
certificate at ``F64_RATE``. Not counted: elementwise work (norms, sorting for the knapsack
bounds, zero points and per-row sums behind the estimates, quantisers, interval bookkeeping).
The one-shot baseline is one full-width exact product per layer. A certificate needs layer 0
nearly exact (digits: at least 6 of 8 input bits) plus a pass through the hidden layers, and
every sample pays that first check (:func:`check_pass_cost`). Where the int8 kernel's digits hold 8 bits (AVX-512
VNNI) an 8-bit operand is one digit, so no input width is cheaper than the exact product and
the check costs exactly the one-shot work: the certified rule cannot do less than one-shot
there, whatever the bounds (the gap rule can, on two-bit planes of both operands). With 7-bit
digits (AVX2) the 8-bit product takes two digits and a 7-bit input one, so the check is
cheaper than one-shot (modelled: 0.79x in all on the digits MLP); at 12 bits likewise (8 input
bits are one digit instead of two).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from mpilayer.apps.adaptive import Top1, one_shot_cost, terms_cost
from mpilayer.core.components import BitField, make_split
from mpilayer.core.estimates import SideStats, tile_estimate, zero_points_of
from mpilayer.core.products import (DIGIT_BITS, DIGIT_PREP_COST, OperandBlock, add_terms, choose_kernel, int8_rate,
                                    integer_matmul, n_b_digits)
from mpilayer.core.quantization import scale_for, storage_dtype
from mpilayer.errors import InputError, one_line

ACTIVATIONS = ("relu", "linear")
# Single-core float64 BLAS rate (MAC/s) charged for the logit-difference certificate.
F64_RATE = 20e9
_TOP1 = Top1()


def default_infer_split(bits: int):
    """The default components of ``mpilayer infer`` (measured, README): 2 bits on the binary-plane
    kernel (where the gap rule stops most samples), then all but the last bit (where the
    certificate is tried), then the exact end."""
    return (2, bits - 3, 1) if bits >= 5 else 1


# --------------------------------------------------------------------------- the model

@dataclass
class Layer:
    """One dense layer ``z = h @ W + b`` followed by ``activation``."""

    W: np.ndarray  # float64 (inputs x outputs)
    b: np.ndarray  # float64 (outputs,)
    activation: str = "relu"
    input_min: float | None = None  # calibration of this layer's input (training data)
    input_max: float | None = None  # max |input|


def activate(z: np.ndarray, activation: str) -> np.ndarray:
    return np.maximum(z, 0.0) if activation == "relu" else z


def float_forward(layers: Sequence[Layer], X: np.ndarray, collect: bool = False):
    """Float64 forward pass; returns the output (and the inputs of every layer if ``collect``)."""
    h = np.asarray(X, dtype=np.float64)
    inputs = []
    for layer in layers:
        inputs.append(h)
        h = activate(h @ layer.W + layer.b, layer.activation)
    return (h, inputs) if collect else h


def calibrate(layers: Sequence[Layer], X: np.ndarray) -> list:
    """Layers with ``input_min``/``input_max`` set from a float forward pass of ``X``."""
    _, inputs = float_forward(layers, X, collect=True)
    out = []
    for layer, h in zip(layers, inputs):
        out.append(Layer(layer.W, layer.b, layer.activation, float(h.min()), float(np.abs(h).max())))
    return out


def truncate(q: np.ndarray, shift: int) -> np.ndarray:
    return (q >> shift) << shift


@dataclass
class QLayer:
    """A layer of the quantised model (see the module docstring)."""

    Wq: np.ndarray        # int8/int16 (k x n)
    w_scale: np.ndarray   # float64 (n,)
    b: np.ndarray         # float64 (n,)
    activation: str
    unsigned: bool        # input encoded as H in [0, U], fed as H - 2**(bits-1)
    in_scale: float       # s: the fixed scale of this layer's input
    in_lo: int            # range of H
    in_hi: int
    c: np.ndarray         # fl(s * w_scale), float64 (n,)
    offset: int           # 2**(bits-1) if unsigned else 0
    offset_acc: np.ndarray  # offset * colsum(Wq), int64 (n,)
    block: OperandBlock   # Wq as the B operand of every product (zero point 0: already centred)
    pm_block: OperandBlock  # [Wq^+ | Wq^-] (k x 2n): the interval term's B operand
    stats: SideStats      # estimates.py's sums of Wq, per column
    norms: tuple          # |Wq_j|_2, |Wq_j|_1, max_k |Wq_kj| per column (float64)


class QuantizedMLP:
    """The exact one-shot quantised model and its layered evaluation (module docstring)."""

    def __init__(self, layers: Sequence[Layer], bits: int = 8, component_bits=None):
        if not layers:
            raise ValueError("a model needs at least one layer")
        self.split = make_split(bits, component_bits)
        self.bits = self.split.bits
        self.qmax = (1 << (self.bits - 1)) - 1
        self.layers = []
        for i, layer in enumerate(layers):
            if layer.input_max is None or layer.input_min is None:
                raise ValueError(f"layer {i} is not calibrated (input_min/input_max missing)")
            prev_relu = i > 0 and layers[i - 1].activation == "relu"
            unsigned = prev_relu or (i == 0 and layer.input_min >= 0)
            self.layers.append(self._quantize_layer(layer, unsigned))
        self.n_features = self.layers[0].Wq.shape[0]
        self.n_outputs = self.layers[-1].Wq.shape[1]
        self._knapsack_tables = None
        self.diff_norms = _difference_norms(self.layers[-1].Wq.astype(np.float64), self.layers[-1].c)

    def _quantize_layer(self, layer: Layer, unsigned: bool) -> QLayer:
        bits, qmax, split = self.bits, self.qmax, self.split
        W = np.asarray(layer.W, dtype=np.float64)
        w_scale = scale_for(np.abs(W).max(axis=0) if W.size else np.zeros(W.shape[1]), bits)
        dtype = storage_dtype(bits)
        Wq = np.ascontiguousarray(np.clip(np.rint(W / w_scale[None, :]), -qmax, qmax).astype(dtype))
        levels = (1 << bits) - 1 if unsigned else qmax
        in_scale = float(layer.input_max) / levels if layer.input_max > 0 else 1.0
        in_lo, in_hi = (0, levels) if unsigned else (-qmax, qmax)
        offset = 1 << (bits - 1) if unsigned else 0
        W64 = Wq.astype(np.int64)
        stats = SideStats(split, np.zeros(W.shape[1], dtype=np.int64), W.shape[0])
        stats.add(Wq.T)  # the transpose of a C-contiguous block is read in place
        return QLayer(
            Wq=Wq, w_scale=w_scale, b=np.asarray(layer.b, dtype=np.float64),
            activation=layer.activation, unsigned=unsigned, in_scale=in_scale, in_lo=in_lo, in_hi=in_hi,
            c=in_scale * w_scale, offset=offset, offset_acc=offset * W64.sum(axis=0),
            block=OperandBlock(Wq, "B", bits),
            pm_block=OperandBlock(np.hstack([np.maximum(Wq, 0), np.minimum(Wq, 0)]), "B", bits),
            stats=stats, norms=_column_norms(np.abs(W64).astype(np.float64)))

    # ---- the exact one-shot maps (all monotone non-decreasing)

    def quantize_values(self, l: int, v: np.ndarray, activation: str = "linear") -> np.ndarray:
        """``H_l = clip(rint(f(v) / s_l), lo, hi)`` as int64."""
        q = self.layers[l]
        h = np.rint(activate(v, activation) / q.in_scale)
        np.clip(h, q.in_lo, q.in_hi, out=h)
        return h.astype(np.int64)

    def quantize_input(self, X: np.ndarray) -> np.ndarray:
        return self.quantize_values(0, np.asarray(X, dtype=np.float64))

    def preactivation(self, l: int, acc: np.ndarray) -> np.ndarray:
        """``z_l = fl(fl(acc * c_l) + b_l)``."""
        q = self.layers[l]
        return acc.astype(np.float64) * q.c + q.b

    def next_input(self, l: int, acc: np.ndarray) -> np.ndarray:
        """``H_{l+1} = Q_{l+1}(z_l)`` from layer l's exact/bound accumulator."""
        return self.quantize_values(l + 1, self.preactivation(l, acc), self.layers[l].activation)

    def output(self, acc: np.ndarray) -> np.ndarray:
        """``f_{L-1}(z_{L-1})``: the logits the prediction is the argmax of."""
        return activate(self.preactivation(len(self.layers) - 1, acc), self.layers[-1].activation)

    def signed(self, l: int, H: np.ndarray) -> np.ndarray:
        """The b-bit signed operand fed to the product: ``H - offset``."""
        return np.ascontiguousarray(H - self.layers[l].offset, dtype=storage_dtype(self.bits))

    # ---- exact products

    def exact(self, l: int, H: np.ndarray, kernel: str | None = None):
        """``(H @ Wq_l, model seconds)`` exactly: one full-width term."""
        q, full = self.layers[l], self.split.truncated(self.split.n_resolutions - 1)
        a = OperandBlock(self.signed(l, H), "A", self.bits)
        acc, kernels = add_terms(None, a, q.block, [(full, full)], kernel)
        acc += q.offset_acc
        return acc, terms_cost(a.length, q.block.length, a.k, [(full, full)], kernels)[0]

    def one_shot(self, X: np.ndarray, kernel: str | None = None):
        """Exact one-shot quantised inference with the exact integer kernels (one full-width
        term per layer). Returns ``(predictions, logits, accumulators, model seconds)``."""
        H = self.quantize_input(X)
        accs, work = [], 0.0
        for l, q in enumerate(self.layers):
            acc, _ = self.exact(l, H, kernel)
            accs.append(acc)
            work += one_shot_cost(H.shape[0], q.Wq.shape[1], q.Wq.shape[0], self.split)
            if l < len(self.layers) - 1:
                H = self.next_input(l, acc)
        logits = self.output(accs[-1])
        return np.argmax(logits, axis=1), logits, accs, work

    def box_product(self, l: int, H_lo: np.ndarray, H_hi: np.ndarray, kernel: str | None = None):
        """``(lo, hi, model seconds)``: the tightest int64 bounds of ``H @ Wq_l`` over
        ``H_lo <= H <= H_hi``: ``H_lo @ Wq + w @ Wq^-`` and ``H_lo @ Wq + w @ Wq^+``, ``w = H_hi - H_lo``,
        both parts exact integer products (the second one int8 call on ``[Wq^+ | Wq^-]``)."""
        q = self.layers[l]
        base, work = self.exact(l, H_lo, kernel)
        width = H_hi - H_lo
        cols = np.flatnonzero(width.any(axis=0))
        n = q.Wq.shape[1]
        if cols.size == 0:
            return base, base.copy(), work
        b = q.pm_block if cols.size == width.shape[1] else OperandBlock(q.pm_block.values[cols], "B", self.bits)
        full = self.split.truncated(self.split.n_resolutions - 1)
        part = integer_matmul(np.ascontiguousarray(width[:, cols]), b, full)
        work += _integer_matmul_cost(width.shape[0], 2 * n, cols.size, int(width.max()), full)
        return base + part[:, n:], base + part[:, :n], work

    def holder_product(self, l: int, Ht: np.ndarray, H_lo: np.ndarray, H_hi: np.ndarray, kernel=None):
        """``(lo, hi, estimate, model seconds)``: bounds of ``H @ Wq_l`` over ``H_lo <= H <= H_hi``
        from ``Ht @ Wq`` (exact, ``Ht`` in the box) and ``|(H - Ht) @ Wq_j| <= sum_k v_k |Wq_kj|``,
        ``v = max(Ht - H_lo, H_hi - Ht)``, bounded by Hölder (``|v|_2 |Wq_j|_2``, ``|v|_inf |Wq_j|_1``,
        ``|v|_1 max|Wq_j|``): no second product, looser than :meth:`box_product`."""
        est, work = self.exact(l, Ht, kernel)
        v = np.maximum(Ht - H_lo, H_hi - Ht).astype(np.float64)
        radius = _holder(v, self.layers[l].norms)
        r = np.where(radius > 0, np.ceil(radius * (1 + 1e-12)) + 1, 0).astype(np.int64)
        return est - r, est + r, est, work

    def top1_by_norms(self, est: np.ndarray, v: np.ndarray, magnitude: np.ndarray):
        """``(settled, candidate)``: the logit-difference certificate of :meth:`top1_by_differences`
        with ``|D @ V_j|`` bounded by Hölder norms of ``V_j`` (precomputed per pair of outputs)
        instead of matmuls; ``|D| <= v`` elementwise."""
        q = self.layers[-1]
        m, n = est.shape
        if m == 0 or n < 2:
            return np.zeros(m, dtype=bool), np.zeros(m, dtype=np.int64)
        z_est = est * q.c + q.b
        cand = np.argmax(z_est, axis=1)
        rows = np.arange(m)
        base = (est[rows, cand] * q.c[cand])[:, None] - est * q.c + (q.b[cand][:, None] - q.b[None, :])
        v = v.astype(np.float64)
        norms = [nrm[cand] for nrm in self.diff_norms]  # (m, n) each: l2, l1, max of V_{c j}
        spread = np.minimum.reduce([np.sqrt((v * v).sum(axis=1))[:, None] * norms[0],
                                    v.max(axis=1, initial=0.0)[:, None] * norms[1],
                                    v.sum(axis=1)[:, None] * norms[2]]) * (1 + 1e-12)
        lower = base - spread - 1e-12 * (spread + magnitude + magnitude[rows, cand][:, None])
        lower[rows, cand] = np.inf
        return np.all(lower > 0, axis=1), cand

    # ---- top-1 certificate from logit differences (last layer linear)

    def top1_by_differences(self, est: np.ndarray, d_lo: np.ndarray, d_hi: np.ndarray,
                            magnitude: np.ndarray):
        """``(settled, candidate, model seconds)``: samples whose argmax is certified by bounding
        the logit *differences* of the last (linear) layer directly.

        Its exact input is ``Ht + D`` with ``d_lo <= D <= d_hi``; the same ``D`` moves every
        logit, so ``z_c - z_j = (est_c c_c - est_j c_j) + (b_c - b_j) + D @ V_j`` with
        ``V_j = c_c Wq[:, c] - c_j Wq[:, j]`` is bounded far more tightly than ``lo_c - hi_j``
        from separate logit intervals. ``c`` is the current estimate's argmax. The float64
        evaluation and the two roundings of every one-shot logit (``fl(fl(acc c) + b)``) are
        covered by a relative allowance of ``1e-12`` of the magnitudes involved (``magnitude``:
        an upper bound of ``|acc| c + |b|`` per logit; over 1000x what k float64 operations can
        lose); the difference must stay strictly positive, so exact ties are only ever settled
        at the last resolution.
        """
        q = self.layers[-1]
        m, n = est.shape
        if m == 0 or n < 2:
            return np.zeros(m, dtype=bool), np.zeros(m, dtype=np.int64), 0.0
        z_est = est * q.c + q.b
        cand = np.argmax(z_est, axis=1)
        rows = np.arange(m)
        center_d, width_d = (d_lo + d_hi).astype(np.float64), (d_hi - d_lo).astype(np.float64)
        W = q.Wq.astype(np.float64)
        settled = np.zeros(m, dtype=bool)
        for c in np.unique(cand):  # one (k, n) matrix V per candidate
            rows = np.flatnonzero(cand == c)
            V = q.c[c] * W[:, [c]] - q.c[None, :] * W          # column c is zero
            base = (est[rows, c] * q.c[c])[:, None] - est[rows] * q.c + (q.b[c] - q.b)
            spread = (center_d[rows] @ V - width_d[rows] @ np.abs(V)) / 2
            spread_max = (np.abs(center_d[rows]) + width_d[rows]).sum(axis=1)[:, None] * np.abs(V).max(axis=0)
            scale = spread_max + magnitude[rows] + magnitude[rows, [c]][:, None]
            lower = base + spread - 1e-12 * scale
            lower[:, c] = np.inf
            settled[rows] = np.all(lower > 0, axis=1)
        return settled, cand, 2 * m * q.Wq.size / F64_RATE

    # ---- layer-0 bounds

    def input_interval(self, r: int, H: np.ndarray, acc: np.ndarray):
        """``(lo, hi, estimate)`` int64 for ``H @ Wq_0`` from ``acc = T_r(H) @ Wq_0`` (the input's
        bits truncated, the weights whole): the error ``dA @ Wq`` with dropped parts ``dA`` in
        ``[0, delta]`` lies in the intersection of

        * the knapsack bounds given each row's sum of ``dA`` (:func:`_knapsack`), and
        * ``mu_i colsum_j + [-rho, rho]`` with ``mu_i = sum_k dA_ik / k`` and, by Cauchy-Schwarz
          on the centred vectors (``sum_k (dA_ik - mu_i) = 0``),
          ``rho = |dA_i - mu_i|_2 |Wq_j - nu_j|_2`` (``nu_j`` the column mean);

        the estimate is ``acc + mu_i colsum_j`` (the dropped bits at their row mean) clipped into
        the interval. The squared norms are exact integers over k; the float products carry a
        relative allowance of 1e-9 and one unit.
        """
        split, q = self.split, self.layers[0]
        s, delta = split.shift(r), split.max_dropped(r)
        if delta == 0:
            return acc, acc, acc
        W = q.Wq.astype(np.int64)
        k = W.shape[0]
        dA = H - truncate(H, s)
        S = dA.sum(axis=1)
        if self._knapsack_tables is None:  # the weights' sorted prefix sums, once per model
            self._knapsack_tables = _knapsack_tables(W.T)
        klo, khi = _knapsack(self._knapsack_tables, S, delta)
        colsum = W.sum(axis=0)
        na = (k * np.einsum("ij,ij->i", dA, dA) - S * S).astype(np.float64)      # k^2 |dA_i - mu_i|^2
        nw = (k * np.einsum("ij,ij->j", W, W) - colsum * colsum).astype(np.float64)
        rho = np.sqrt(np.multiply.outer(na, nw)) / k
        shift = np.multiply.outer(S.astype(np.float64), colsum.astype(np.float64)) / k
        slack = 1e-9 * (rho + np.abs(shift)) + 1.0
        lo = acc + np.maximum(klo.T, np.ceil(shift - rho - slack).astype(np.int64))
        hi = acc + np.minimum(khi.T, np.floor(shift + rho + slack).astype(np.int64))
        est = np.clip(acc + np.rint(shift).astype(np.int64), lo, hi)
        return lo, hi, est


def _column_norms(Wa: np.ndarray) -> tuple:
    """``|W_j|_2, |W_j|_1, max_k |W_kj|`` (float64, rounded up by a relative 1e-12)."""
    up = 1 + 1e-12
    return (np.sqrt((Wa * Wa).sum(axis=0)) * up, Wa.sum(axis=0) * up, Wa.max(axis=0, initial=0.0))


def _difference_norms(W: np.ndarray, c: np.ndarray) -> tuple:
    """The norms of ``V_cj = c_c W[:, c] - c_j W[:, j]`` for every pair (c, j), (n, n) each."""
    n = W.shape[1]
    out = [np.zeros((n, n)) for _ in range(3)]
    for i in range(n):  # one (k, n) matrix at a time
        V = np.abs(c[i] * W[:, [i]] - c[None, :] * W)
        out[0][i], out[1][i], out[2][i] = np.sqrt((V * V).sum(axis=0)), V.sum(axis=0), V.max(axis=0, initial=0.0)
    return out[0] * (1 + 1e-12), out[1] * (1 + 1e-12), out[2]


def _holder(v: np.ndarray, norms: tuple) -> np.ndarray:
    """``min(|v|_2 |W_j|_2, |v|_inf |W_j|_1, |v|_1 max|W_j|)`` per row of v and column j."""
    l2, l1, top = norms
    return np.minimum.reduce([np.sqrt((v * v).sum(axis=1))[:, None] * l2[None, :],
                              v.max(axis=1, initial=0.0)[:, None] * l1[None, :],
                              v.sum(axis=1)[:, None] * top[None, :]]) * (1 + 1e-12)


def _integer_matmul_cost(m: int, n: int, k: int, x_max: int, fb: BitField) -> float:
    """Kernel cost model of :func:`mpilayer.core.products.integer_matmul` (non-negative ``x``)."""
    da = max(1, math.ceil(max(x_max, 1).bit_length() / DIGIT_BITS))
    db = n_b_digits(fb)
    return da * db * m * n * k / int8_rate(min(x_max, (1 << DIGIT_BITS) - 1)) + DIGIT_PREP_COST * k * (m * da + n * db)


def _knapsack_tables(v: np.ndarray) -> list:
    """Per row of v: its entries in ascending and in descending order, each with prefix sums
    (int64), for :func:`_knapsack`."""
    out = []
    for order in (np.sort(v, axis=1), -np.sort(-v, axis=1)):
        padded = np.hstack([order, np.zeros((v.shape[0], 1), dtype=np.int64)])
        prefix = np.hstack([np.zeros((v.shape[0], 1), dtype=np.int64), np.cumsum(order, axis=1)])
        out.append((padded, prefix))
    return out


def _knapsack(tables: list, budget: np.ndarray, delta: int):
    """``(lo, hi)`` int64 (rows of v x len(budget)): the least and the largest ``sum_k d_k v_ik``
    over ``0 <= d_k <= delta`` with ``sum_k d_k = budget_j`` (``tables`` from
    :func:`_knapsack_tables`): delta on the smallest (largest) entries first, the remainder on
    the next one -- a fractional knapsack with unit weights, exact for integer d too."""
    q, rem = budget // delta, budget % delta
    out = []
    for padded, prefix in tables:
        t = np.minimum(q, padded.shape[1] - 1)
        out.append(delta * prefix[:, t] + rem[None, :] * padded[:, t])
    return out[0], out[1]


# --------------------------------------------------------------------------- rules

@dataclass(frozen=True)
class Certified:
    """Settle a sample only when its prediction is proved equal to the one-shot one."""

    name = "certified"
    certified = True

    def __str__(self):
        return "certified"


@dataclass(frozen=True)
class Gap:
    """NOT certified (the paper's rule): settle when the top-2 gap of the estimated logits
    exceeds ``threshold`` times the sample's largest ``|logit|``."""

    threshold: float = 0.05
    name = "gap"
    certified = False

    def settled(self, logits: np.ndarray) -> np.ndarray:
        if logits.shape[1] < 2 or not np.isfinite(self.threshold):
            return np.full(logits.shape[0], logits.shape[1] < 2)
        top2 = np.sort(logits, axis=1)[:, -2:]
        return top2[:, 1] - top2[:, 0] > self.threshold * np.abs(logits).max(axis=1)

    def __str__(self):
        return f"gap:{self.threshold:g}"


def parse_rule(rule) -> Certified | Gap:
    """``"certified"`` (or None), ``"gap"`` or ``"gap:T"``, or a rule object."""
    if rule is None:
        return Certified()
    if isinstance(rule, (Certified, Gap)):
        return rule
    text = str(rule).strip()
    if text == "certified":
        return Certified()
    if text == "gap" or text.startswith("gap:"):
        try:
            t = float(text[4:]) if text != "gap" else Gap.threshold
        except ValueError:
            t = -1.0
        if not t >= 0:
            raise ValueError(f"rule {text!r}: the gap threshold must be a number >= 0")
        return Gap(t)
    raise ValueError(f"rule {text!r}: expected 'certified', 'gap' or 'gap:T'")


def first_check(model: QuantizedMLP, rule, check_from=None) -> int:
    """The first resolution at which ``rule`` is evaluated: ``check_from`` if given; else 0 for the
    gap rule, and for the certified one the first resolution keeping ``min(bits - 1, 7)`` bits
    (module docstring: earlier certificates essentially never succeed)."""
    R = model.split.n_resolutions
    if check_from is not None:
        return min(max(int(check_from), 0), R - 1)
    need = min(model.bits - 1, 7) if parse_rule(rule).certified else 2
    return next(r for r in range(R) if model.bits - model.split.shift(r) >= need or r == R - 1)


# --------------------------------------------------------------------------- layered inference

@dataclass
class InferenceResult:
    """Result of :func:`layered_inference` on a block of samples.

    predictions : int64 (m,); with the certified rule equal to the one-shot quantised predictions
    resolution : int64 (m,), resolution at which each sample settled
    resolutions_total : int
    predictions_at : int64 (R, m), the prediction of every sample after each resolution
        (settled ones once settled, the argmax of the current estimate for those computed, the
        previous value otherwise; -1 before a sample's first computed resolution)
    active, work_s, macs, elapsed_s : per resolution: samples computed, model seconds of the
        work done, MACs of the integer products, wall seconds since the start
    rule : the rule's name (``certified``, ``gap:T``); checked : per resolution, was it evaluated
    """

    predictions: np.ndarray
    resolution: np.ndarray
    resolutions_total: int
    predictions_at: np.ndarray
    active: list = field(default_factory=list)
    work_s: list = field(default_factory=list)
    macs: list = field(default_factory=list)
    elapsed_s: list = field(default_factory=list)
    rule: str = "certified"
    checked: list = field(default_factory=list)


def _advance(model: QuantizedMLP, acc, p: int, r: int, a: OperandBlock, kernel, whole_weights: bool):
    """``(T_r(A) T_r(B), model seconds, MACs)`` for layer 0 (``T_r(A) B`` with ``whole_weights``):
    the cross terms of the bits between resolutions p and r added to ``acc``, or one fresh term,
    whichever the cost model prefers."""
    split, b = model.split, model.layers[0].block
    m, n, k = a.length, b.length, a.k
    full = split.truncated(split.n_resolutions - 1)
    tb = full if whole_weights else split.truncated(r)
    options = [(None, [(split.truncated(r), tb)])]
    if acc is not None and p >= 0:
        mid = BitField(split.shift(r), split.shift(p), split.bits)
        if whole_weights:
            options.append((acc, [(mid, full)]))
        else:
            options.append((acc, [(mid, split.truncated(r)), (split.truncated(p), mid)]))
    costs = [terms_cost(m, n, k, terms, [kernel or choose_kernel(m, n, k, fa, fb) for fa, fb in terms])
             for _, terms in options]
    best = min(range(len(options)), key=lambda i: costs[i][0])
    prev, terms = options[best]
    out, _ = add_terms(prev, a, b, terms, kernel)
    return out, costs[best][0], costs[best][1]


def check_pass_cost(model: QuantizedMLP, m: int, r: int) -> float:
    """Model seconds of the certified rule's first check of ``m`` samples at resolution r (nothing
    computed before it): layer 0 as one term ``T_r(input) Wq`` on its cheaper kernel, then one
    exact product per further layer (the Hölder pass). Every sample pays it, so the rule's
    cumulative work is at least this over one-shot's; where the int8 kernel's digits hold the
    whole operand (8 bits with VNNI), no width is cheaper than the exact product and this is
    the one-shot work itself (module docstring, README)."""
    split, q0 = model.split, model.layers[0]
    full, tr = split.truncated(split.n_resolutions - 1), split.truncated(r)
    k, n = q0.Wq.shape
    seconds = terms_cost(m, n, k, [(tr, full)], [choose_kernel(m, n, k, tr, full)])[0]
    return seconds + sum(one_shot_cost(m, q.Wq.shape[1], q.Wq.shape[0], split) for q in model.layers[1:])


def layered_inference(model: QuantizedMLP, X: np.ndarray, adaptive: bool = True, trace=None,
                      kernel: str | None = None, rule="certified", check_from: int | None = None,
                      tight: bool = False) -> InferenceResult:
    """Adaptive layered inference of ``X`` (samples x features); see the module docstring.

    ``rule``: ``"certified"`` (default), ``"gap"`` / ``"gap:T"`` (not certified) or a rule object;
    ``check_from``: first resolution at which the rule is evaluated (:func:`first_check`);
    ``tight``: certified rule, give the samples the cheap pass leaves the tight pass (exact box
    products) before they go on to the next resolution: fewer samples reach the end, but the
    pass costs more than the exact product (module docstring).
    ``trace``, if a list, receives (certified rule) one dict per (checked resolution, layer)
    with the global sample ``rows`` computed and the certified integer interval
    ``acc_lo``/``acc_hi`` of the layer's exact one-shot accumulator, for tests.
    """
    start = time.perf_counter()
    rule = parse_rule(rule)
    split, bits = model.split, model.bits
    R = split.n_resolutions
    first = first_check(model, rule, check_from)
    H0 = model.quantize_input(X)
    m, k = H0.shape
    if rule.certified:  # the input's bits only (module docstring); the weights stay whole
        A0, za = model.signed(0, H0), None
    else:
        za = zero_points_of(H0, bits, 1)
        A0 = np.ascontiguousarray((H0 - za[:, None]).astype(storage_dtype(bits)))
        a_stats = SideStats(split, za, k)
        a_stats.add(A0)
    q0 = model.layers[0]
    res = InferenceResult(np.full(m, -1, dtype=np.int64), np.full(m, -1, dtype=np.int64), R,
                          np.full((R, m), -1, dtype=np.int64), rule=str(rule))
    rows, acc, acc_r, a = np.arange(m), None, -1, None
    for r in range(R):
        if r > 0:
            res.predictions_at[r] = res.predictions_at[r - 1]
        if r < first or len(rows) == 0:  # nothing computed at this resolution
            for name, value in (("active", 0), ("work_s", 0.0), ("macs", 0), ("checked", False)):
                getattr(res, name).append(value)
            res.elapsed_s.append(time.perf_counter() - start)
            continue
        if a is None or a.length != len(rows):
            a = OperandBlock(A0[rows], "A", bits)
        acc, work, macs = _advance(model, acc, acc_r, r, a, kernel, rule.certified)
        acc_r = r
        if rule.certified:
            lo, hi, est = model.input_interval(r, H0[rows], acc + q0.offset_acc)
            settled, decided, current, w, c = _certify(model, r, lo, hi, est, rows, trace, kernel, tight)
        else:
            est = tile_estimate(acc, r, a_stats.part(rows), q0.stats, interval=False).estimate
            settled, decided, current, w, c = _gap(model, r, est, rule, kernel)
        work, macs = work + w, macs + c
        if r == R - 1:
            settled[:] = True
        new = settled & (res.resolution[rows] < 0)
        res.resolution[rows[new]] = r
        res.predictions[rows[new]] = decided[new]
        if r == R - 1 and not adaptive and rule.certified and np.any(decided != res.predictions[rows]):
            raise AssertionError("a certified prediction differs from the exact one (unsound bound)")
        res.predictions_at[r, rows] = np.where(res.resolution[rows] >= 0, res.predictions[rows], current)
        res.active.append(len(rows))
        res.work_s.append(work)
        res.macs.append(macs)
        res.checked.append(True)
        res.elapsed_s.append(time.perf_counter() - start)
        if adaptive and settled.any():
            keep = ~settled
            rows, acc = rows[keep], acc[keep]
            a = None
    return res


def _certify(model: QuantizedMLP, r: int, lo, hi, mid, rows, trace, kernel, tight: bool = False):
    """The certified rule at resolution r from layer 0's interval ``[lo, hi]`` and estimate
    ``mid``: ``(settled, decision, current estimate, seconds, MACs)``. The cheap pass (Hölder
    bounds, one product per hidden layer); with ``tight``, the samples it leaves get the tight
    pass (exact box products)."""
    settled, decided, current, work, macs = _certify_pass(model, r, lo, hi, mid, rows, trace, kernel, True)
    left = np.flatnonzero(~settled)
    if left.size and r < model.split.n_resolutions - 1 and tight:
        s2, d2, _, w, c = _certify_pass(model, r, lo[left], hi[left], mid[left], rows[left], trace, kernel, False)
        settled[left], decided[left] = s2, d2
        work, macs = work + w, macs + c
    return settled, decided, current, work, macs


def _certify_pass(model: QuantizedMLP, r: int, lo, hi, mid, rows, trace, kernel, cheap: bool):
    """One pass of the certified rule through layers 1.. (see :func:`_certify`)."""
    split, L = model.split, len(model.layers)
    final = r == split.n_resolutions - 1
    work = macs = 0
    if trace is not None:
        trace.append({"resolution": r, "layer": 0, "rows": rows.copy(), "acc_lo": lo, "acc_hi": hi,
                      "acc_est": mid, "pass": "cheap" if cheap else "tight"})
    by_diff = L > 1 and model.layers[-1].activation == "linear"
    for l in range(1, L):
        q = model.layers[l]
        H_lo, H_hi, Ht = np.split(model.next_input(l - 1, np.concatenate([lo, hi, mid])), 3)  # one pass
        macs += Ht.size * q.Wq.shape[1] * (1 if cheap or (l == L - 1 and by_diff) else 3)
        if l == L - 1 and by_diff:
            est, w = model.exact(l, Ht, kernel)
            work += w
            if trace is not None:  # for the tests only: not counted
                lo, hi, _ = model.box_product(l, H_lo, H_hi, kernel)
                trace.append({"resolution": r, "layer": l, "rows": rows.copy(), "acc_lo": lo, "acc_hi": hi,
                              "acc_est": est, "pass": "cheap" if cheap else "tight"})
            current = np.argmax(model.output(est), axis=1)
            if final:  # exact: the one-shot decision
                return np.ones(len(rows), dtype=bool), current, current, work, macs
            spread = np.maximum(Ht - H_lo, H_hi - Ht)
            magnitude = (np.abs(est) + np.multiply.outer(spread.sum(axis=1), q.norms[2])) * q.c + np.abs(q.b)
            settled, cand = model.top1_by_norms(est, spread, magnitude) if cheap else (np.zeros(len(rows), bool), None)
            left = np.flatnonzero(~settled)  # the difference matmuls for those the norms leave
            if left.size:
                s2, c2, w = model.top1_by_differences(est[left], (H_lo - Ht)[left], (H_hi - Ht)[left], magnitude[left])
                cand = c2 if cand is None else cand
                settled[left], cand[left] = s2, c2
                work, macs = work + w, macs + 2 * left.size * q.Wq.size
            return settled, cand, current, work, macs
        if cheap:
            lo, hi, mid, w = model.holder_product(l, Ht, H_lo, H_hi, kernel)
        else:
            lo, hi, w = model.box_product(l, H_lo, H_hi, kernel)
            mid = lo + (hi - lo) // 2
        work += w
        if trace is not None:
            trace.append({"resolution": r, "layer": l, "rows": rows.copy(), "acc_lo": lo, "acc_hi": hi,
                          "acc_est": mid, "pass": "cheap" if cheap else "tight"})
    out_lo, out_hi, out_mid = model.output(lo), model.output(hi), model.output(mid)
    settled = np.ones(len(rows), dtype=bool) if final else _TOP1.settled(out_mid, out_lo, out_hi)
    decided = np.argmax(out_lo, axis=1) if final else _TOP1.decide(out_mid, out_lo, out_hi)
    return settled, decided, np.argmax(out_mid, axis=1), work, macs


def _gap(model: QuantizedMLP, r: int, est, rule: Gap, kernel):
    """The gap rule at resolution r: layer 0's fitted estimate, then the hidden layers exactly
    on ``Q(z(estimate))``: ``(settled, decision, current estimate, seconds, MACs)``."""
    work = macs = 0
    for l in range(1, len(model.layers)):
        H = model.next_input(l - 1, est)
        est, w = model.exact(l, H, kernel)
        work, macs = work + w, macs + est.size * H.shape[1]
    logits = model.output(est)
    decided = np.argmax(logits, axis=1)
    return rule.settled(logits), decided, decided, work, macs


def estimate_predictions(model: QuantizedMLP, X: np.ndarray, kernel: str | None = None) -> np.ndarray:
    """int64 (R, m): the argmax of every sample's estimate at every resolution (what the gap rule
    looks at); a diagnostic, e.g. for the accuracy per resolution."""
    return layered_inference(model, X, adaptive=False, kernel=kernel, rule=Gap(np.inf), check_from=0).predictions_at

# --------------------------------------------------------------------------- model and data files

def write_model(path, layers: Sequence[Layer], attrs: dict | None = None) -> None:
    """Write ``/layer0``, ``/layer1``, ... each with ``W`` (inputs x outputs), ``b`` and attributes
    ``activation`` and (if known) ``input_min``/``input_max``."""
    import h5py

    with h5py.File(path, "w") as f:
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
        f.attrs["layers"] = len(layers)
        for i, layer in enumerate(layers):
            g = f.create_group(f"layer{i}")
            g.create_dataset("W", data=np.asarray(layer.W, dtype=np.float64))
            g.create_dataset("b", data=np.asarray(layer.b, dtype=np.float64))
            g.attrs["activation"] = layer.activation
            if layer.input_max is not None:
                g.attrs["input_min"] = float(layer.input_min)
                g.attrs["input_max"] = float(layer.input_max)


def _finite(array: np.ndarray, label: str) -> None:
    bad = ~np.isfinite(array)
    if bad.any():
        pos = np.argwhere(bad)[0]
        where = ", ".join(f"{name} {int(i)}" for name, i in zip(("row", "column"), pos)) if array.ndim == 2 \
            else f"index {int(pos[0])}"
        raise InputError(f"{label}: NaN or Inf at {where} (0-based)")


def _open(path, label):
    import os

    from mpilayer.io.h5io import open_h5

    if not os.path.exists(path):
        raise InputError(f"{label}: file {path} does not exist")
    if os.path.isdir(path):
        raise InputError(f"{label}: {path} is a directory, not an HDF5 file")
    try:
        return open_h5(path, "r")
    except OSError as err:
        raise InputError(f"{label}: cannot open {path} as HDF5 ({one_line(err)})") from err


def read_model(path) -> list:
    """Read and check a model file; raises InputError naming the file and dataset."""
    import h5py

    path = str(path)
    with _open(path, path) as f:
        names = sorted((k for k in f.keys() if k.startswith("layer") and k[5:].isdigit()), key=lambda k: int(k[5:]))
        if not names:
            raise InputError(f"{path}: no /layer0 group: not a model file (expected /layer0, /layer1, ...)")
        indices = [int(k[5:]) for k in names]
        for expect, got in zip(range(len(indices)), indices):
            if expect != got:
                raise InputError(f"{path}: model is missing /layer{expect} (found {', '.join('/' + k for k in names)})")
        layers = []
        for i, name in enumerate(names):
            g = f[name]
            if not isinstance(g, h5py.Group):
                raise InputError(f"{path}:/{name}: is not a group with W and b")
            arrays = {}
            for ds, ndim in (("W", 2), ("b", 1)):
                label = f"{path}:/{name}/{ds}"
                if ds not in g or not isinstance(g[ds], h5py.Dataset):
                    raise InputError(f"{label}: no such dataset in {path}")
                d = g[ds]
                if d.ndim != ndim or d.dtype.kind not in "iuf":
                    raise InputError(f"{label}: expected a {ndim}-D numeric dataset, found shape {d.shape} dtype {d.dtype}")
                arrays[ds] = np.asarray(d[...], dtype=np.float64)
                _finite(arrays[ds], label)
            W, b = arrays["W"], arrays["b"]
            if 0 in W.shape:
                raise InputError(f"{path}:/{name}/W: empty weight matrix (shape {W.shape})")
            if b.shape[0] != W.shape[1]:
                raise InputError(f"{path}:/{name}/b: has {b.shape[0]} values but /{name}/W has {W.shape[1]} outputs")
            if layers and layers[-1].W.shape[1] != W.shape[0]:
                raise InputError(f"{path}:/{name}/W: has {W.shape[0]} inputs but /{names[i - 1]}/W has "
                                 f"{layers[-1].W.shape[1]} outputs")
            act = g.attrs.get("activation", "relu" if i < len(names) - 1 else "linear")
            act = act.decode() if isinstance(act, bytes) else str(act)
            if act not in ACTIVATIONS:
                raise InputError(f"{path}:/{name}: activation {act!r} is not supported (relu or linear)")
            lo, hi = g.attrs.get("input_min"), g.attrs.get("input_max")
            if (lo is None) != (hi is None) or (hi is not None and not (np.isfinite(lo) and np.isfinite(hi) and hi >= 0)):
                raise InputError(f"{path}:/{name}: bad calibration attributes input_min={lo!r}, input_max={hi!r}")
            layers.append(Layer(W, b, act, None if lo is None else float(lo), None if hi is None else float(hi)))
    return layers


def read_inputs(spec) -> tuple:
    """Read ``FILE:/DATASET`` (default dataset ``/X``) as float64; returns ``(X, label)``."""
    from mpilayer.io.h5io import MatrixSource, parse_dataset_spec

    path, dataset = parse_dataset_spec(str(spec), "/X")
    with MatrixSource(path, dataset) as src:
        X = src.read(slice(None), slice(None)).astype(np.float64)
        src.check_finite(X, slice(None), slice(None))
        return X, src.label


def read_labels(spec, m: int, default="/y") -> np.ndarray:
    """Read a 1-D integer label dataset of length ``m``."""
    import h5py

    from mpilayer.io.h5io import parse_dataset_spec

    path, dataset = parse_dataset_spec(str(spec), default)
    label = f"{path}:{dataset}"
    with _open(path, label) as f:
        d = f.get(dataset)
        if not isinstance(d, h5py.Dataset):
            raise InputError(f"{label}: no such dataset in {path}")
        y = d[...]
    if y.ndim != 1 or y.dtype.kind not in "iuf":
        raise InputError(f"{label}: expected 1-D integer labels, found shape {y.shape} dtype {y.dtype}")
    if y.dtype.kind == "f":
        _finite(y, label)
        if np.any(y != np.rint(y)):
            raise InputError(f"{label}: labels must be integers")
    if y.shape[0] != m:
        raise InputError(f"{label}: has {y.shape[0]} labels but the inputs have {m} samples")
    return y.astype(np.int64)
