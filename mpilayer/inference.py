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
  ``H - 2**(b-1)`` (an exact shift: the product gains ``2**(b-1) * colsum(Wq)`` back), so all b
  bits carry information and the top component is meaningful. Otherwise it is *signed*:
  ``H = clip(rint(v / s), -qmax, qmax)``, ``s = input_max / qmax``. Values beyond the
  calibrated range are clipped. ``v`` is the previous layer's ``z`` (``f`` its activation) or the
  data (``f`` the identity).
* **Pre-activation**: ``acc_l = H_l @ Wq_l`` exactly (integers), and
  ``z_l = fl(fl(acc_l * c_l) + b_l)`` in float64 with ``c_l = fl(s_l * w)`` (per column).
* ``H_{l+1} = Q_{l+1}(z_l)`` as above; prediction ``argmax_j f_{L-1}(z_{L-1}[j])``.

Every map after the integer product -- ``acc -> z`` (multiplication by a positive number and
addition, each correctly rounded), ``f``, division by ``s > 0``, ``rint``, ``clip`` -- is
monotone non-decreasing. So an integer interval ``[acc_lo, acc_hi]`` containing ``acc_l``
gives ``z_l in [z(acc_lo), z(acc_hi)]`` and ``H_{l+1} in [Q(z(acc_lo)), Q(z(acc_hi))]``
*exactly*, with no rounding allowance (int64 -> float64 is exact below 2**53).

Layered inference at resolution r
---------------------------------
Resolution r is set by the layer-0 product, the only one whose input is fixed.

* Layer 0: the layered product of ``H_0`` and ``Wq_0`` at resolution r (both operands
  truncated to their top r+1 components); going to r+1 only **adds the new cross terms** to
  the accumulator (mpilayer.layered's increments). Certified interval
  ``H_0 @ Wq_0 - est in [lo_t, hi_t]`` (bounds.error_interval). For an unsigned input the
  bound sums are taken on ``H >= 0`` itself, not on the shifted operand, so zero pixels and
  zero ReLU outputs add nothing to it (``T_r(H - 2**(b-1)) = T_r(H) - 2**(b-1)``: truncation
  only flips the top bit back).
* Layer l >= 1: the exact input ``H_l`` is only known to lie in ``[H_lo, H_hi]`` (from the
  layer before). We take a point estimate ``Ht = Q(z(acc_mid))`` (``acc_mid`` the middle of
  the previous interval, so ``Ht`` lies in ``[H_lo, H_hi]``) and compute ``Ht @ Wq`` exactly,
  i.e. its layered product at its final resolution (one full-width term through the exact
  integer kernel), recomputed at each resolution a sample goes through (its input changes as
  layer 0 is refined). Then ``H_l @ Wq = Ht @ Wq + (H_l - Ht) @ Wq``, and with
  ``D = H_l - Ht`` in ``[d_lo, d_hi]`` (``d_lo <= 0 <= d_hi``) the last term lies in
  ``[sum_k min(d_lo W, d_hi W), sum_k max(d_lo W, d_hi W)]``
  ``= ((d_lo + d_hi) @ W  -+  (d_hi - d_lo) @ |W|) / 2``: two float matmuls of integers whose
  partial sums all stay below 2**24 (float32) or 2**53 (float64), hence exact in any
  summation order; only the columns k where ``d_hi > d_lo`` for some sample enter them.
  (Truncating these products to resolution r as well was measured: it widens the intervals
  so much that at 8 bits only 7% instead of 52% of the digits test set settle before the
  final resolution.)
* The final logits interval ``[f(z(acc_lo)), f(z(acc_hi))]`` contains the exact one-shot
  logits; the rule :func:`mpilayer.adaptive.top1` certifies the argmax (ties to the lowest
  index, as the one-shot argmax). When the last layer is linear, the argmax is also certified
  from bounds on the logit differences (:meth:`QuantizedMLP.top1_by_differences`), in which
  the shared input error largely cancels. At the last resolution every interval is a point (the
  layer-0 product is exact, so ``H_1`` is, so layer 1's product is, ...), and the decision is
  the one-shot one.

Adaptive: after each resolution, samples whose prediction is certified stop; the others go on
to the next resolution (layer 0 adds its next terms for them only; layers >= 1 are recomputed
for them only). The intervals are plain interval arithmetic: their width grows roughly by
``||W_l||_1`` per layer, so certification needs a fine layer-0 resolution; at 8 bits about
half of the digits test samples need the exact end, at 10-12 bits (a finer reference) few do. With ``adaptive=False`` (``--full``) every sample runs to the final resolution,
while still recording where it would have been certified.

Work is the kernel cost model (products.term_cost, seconds on one core) of the integer terms
actually computed plus the interval matmuls at the measured float32/float64 BLAS rates;
elementwise work (bound sums, quantisers) is not counted. The one-shot baseline is one
full-width exact product per layer.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .adaptive import Top1, integer_interval, one_shot_cost, terms_cost
from .bounds import SideSums, error_interval
from .components import make_split
from .errors import InputError, one_line
from .products import OperandBlock, add_terms, resolution_terms
from .quantization import storage_dtype

ACTIVATIONS = ("relu", "linear")
# Single-core BLAS rates measured on this project's machine (AMD EPYC, one thread), MAC/s.
F32_RATE, F64_RATE = 40e9, 20e9
_TOP1 = Top1()


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
    Wf: np.ndarray        # Wq as float32/float64 for the interval term
    Wabs: np.ndarray      # |Wq| likewise
    offset_trunc: list    # offset * colsum(T_r(Wq)) per resolution r, int64 (n,)


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

    def _quantize_layer(self, layer: Layer, unsigned: bool) -> QLayer:
        bits, qmax = self.bits, self.qmax
        W = np.asarray(layer.W, dtype=np.float64)
        amax = np.abs(W).max(axis=0) if W.size else np.zeros(W.shape[1])
        w_scale = np.where(amax > 0, amax / qmax, 1.0)
        Wq = np.clip(np.rint(W / w_scale[None, :]), -qmax, qmax).astype(storage_dtype(bits))
        levels = (1 << bits) - 1 if unsigned else qmax
        in_scale = float(layer.input_max) / levels if layer.input_max > 0 else 1.0
        in_lo, in_hi = (0, levels) if unsigned else (-qmax, qmax)
        offset = 1 << (bits - 1) if unsigned else 0
        k = W.shape[0]
        # interval term: |partial sums| <= k * (in_hi - in_lo) * qmax; exact in float32 below 2**24
        peak = k * (in_hi - in_lo) * qmax
        if peak >= 2**52:
            raise ValueError(f"layer with {k} inputs is too wide for exact float64 interval products")
        dt = np.float32 if peak < 2**24 else np.float64
        return QLayer(
            Wq=np.ascontiguousarray(Wq), w_scale=w_scale, b=np.asarray(layer.b, dtype=np.float64),
            activation=layer.activation, unsigned=unsigned, in_scale=in_scale, in_lo=in_lo, in_hi=in_hi,
            c=in_scale * w_scale, offset=offset,
            offset_acc=offset * Wq.astype(np.int64).sum(axis=0),
            Wf=np.ascontiguousarray(Wq.astype(dt)), Wabs=np.ascontiguousarray(np.abs(Wq).astype(dt)),
            offset_trunc=[offset * ((Wq.astype(np.int64) >> self.split.shift(r)) << self.split.shift(r)).sum(axis=0)
                          for r in range(self.split.n_resolutions)])

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

    # ---- one-shot

    def one_shot(self, X: np.ndarray, kernel: str | None = None):
        """Exact one-shot quantised inference with the exact integer kernels (one full-width
        term per layer). Returns ``(predictions, logits, accumulators, model seconds)``."""
        H = self.quantize_input(X)
        full = self.split.truncated(self.split.n_resolutions - 1)
        accs, work = [], 0.0
        for l, q in enumerate(self.layers):
            a = OperandBlock(self.signed(l, H), "A", self.bits)
            b = OperandBlock(q.Wq, "B", self.bits)
            acc, _ = add_terms(None, a, b, [(full, full)], kernel)
            acc += q.offset_acc
            accs.append(acc)
            work += one_shot_cost(a.length, b.length, a.k, self.split)
            if l < len(self.layers) - 1:
                H = self.next_input(l, acc)
        logits = self.output(accs[-1])
        return np.argmax(logits, axis=1), logits, accs, work

    # ---- resolution r of one layer's product

    def truncation(self, l: int, r: int, prod: np.ndarray, a: OperandBlock, b: OperandBlock, H: np.ndarray):
        """``(est, lo, hi)``: the resolution-r estimate ``T_r(H) @ T_r(Wq)`` of ``H @ Wq`` from the
        signed product ``prod = T_r(H - offset) @ T_r(Wq)``, and int64 bounds of ``H @ Wq - est``.

        For an unsigned input the bounds use the row sums of ``H >= 0`` itself (bounds.py with
        ``neg = 0``), not of the shifted operand: a zero activation then adds nothing to them.
        Truncation commutes with the shift by ``2**(b-1)`` (it flips the top bit only), so
        ``T_r(H) = T_r(H - offset) + offset``.
        """
        q = self.layers[l]
        if not q.unsigned:
            lo, hi = integer_interval(self.split, r, a, b)
            return prod, lo, hi
        est = prod + q.offset_trunc[r]
        delta = self.split.max_dropped(r)
        if delta == 0:
            return est, np.zeros_like(est), np.zeros_like(est)
        s = self.split.shift(r)
        zeros = np.zeros(H.shape[0], dtype=np.int64)
        a_full = SideSums(H.sum(axis=1, dtype=np.int64), zeros)
        a_trunc = SideSums(((H >> s) << s).sum(axis=1, dtype=np.int64), zeros)
        lo, hi = error_interval(delta, a_full, a_trunc, b.side_sums(0), b.side_sums(s))
        return est, lo, hi

    # ---- interval term

    def interval_term(self, l: int, d_lo: np.ndarray, d_hi: np.ndarray):
        """``(lo, hi, model seconds, MACs)``: int64 bounds of ``D @ Wq_l`` for ``d_lo <= D <= d_hi``."""
        q = self.layers[l]
        m, n = d_lo.shape[0], q.Wq.shape[1]
        width = d_hi - d_lo
        cols = np.flatnonzero(width.any(axis=0))
        if m == 0 or cols.size == 0:
            z = np.zeros((m, n), dtype=np.int64)
            return z, z.copy(), 0.0, 0
        dt = q.Wf.dtype
        if cols.size == width.shape[1]:
            s, w, Wf, Wabs = (d_lo + d_hi).astype(dt), width.astype(dt), q.Wf, q.Wabs
        else:
            s, w = (d_lo[:, cols] + d_hi[:, cols]).astype(dt), width[:, cols].astype(dt)
            Wf, Wabs = q.Wf[cols], q.Wabs[cols]
        center = (s @ Wf).astype(np.int64)
        radius = (w @ Wabs).astype(np.int64)
        macs = 2 * m * n * cols.size
        seconds = macs / (F32_RATE if dt == np.float32 else F64_RATE)
        return (center - radius) // 2, (center + radius) // 2, seconds, macs


    # ---- top-1 certificate from logit differences (last layer linear)

    def top1_by_differences(self, est: np.ndarray, d_lo: np.ndarray, d_hi: np.ndarray,
                            acc_lo: np.ndarray, acc_hi: np.ndarray):
        """``(settled, candidate)``: samples whose argmax is certified by bounding the logit
        *differences* of the last (linear) layer directly.

        Its exact input is ``Ht + D`` with ``d_lo <= D <= d_hi``; the same ``D`` moves every
        logit, so ``z_c - z_j = (est_c c_c - est_j c_j) + (b_c - b_j) + D @ V_j`` with
        ``V_j = c_c Wq[:, c] - c_j Wq[:, j]`` is bounded far more tightly than ``lo_c - hi_j``
        from separate logit intervals. ``c`` is the current estimate's argmax. The float64
        evaluation and the two roundings of every one-shot logit (``fl(fl(acc c) + b)``) are
        covered by a relative allowance of ``1e-12`` of the magnitudes involved (over 1000x
        what k float64 operations can lose); the difference must stay strictly positive, so
        exact ties are only ever settled at the last resolution.
        """
        q = self.layers[-1]
        m, n = est.shape
        if m == 0 or n < 2:
            return np.zeros(m, dtype=bool), np.zeros(m, dtype=np.int64)
        W = q.Wq.astype(np.float64)
        z_est = est * q.c + q.b
        cand = np.argmax(z_est, axis=1)
        settled = np.zeros(m, dtype=bool)
        center_d, width_d = (d_lo + d_hi).astype(np.float64), (d_hi - d_lo).astype(np.float64)
        magnitude = np.maximum(np.abs(acc_lo), np.abs(acc_hi)) * q.c + np.abs(q.b)
        for c in np.unique(cand):
            rows = np.flatnonzero(cand == c)
            V = q.c[c] * W[:, [c]] - q.c[None, :] * W          # (k, n), column c is zero
            base = (est[rows, c] * q.c[c])[:, None] - est[rows] * q.c + (q.b[c] - q.b)
            spread = (center_d[rows] @ V - width_d[rows] @ np.abs(V)) / 2
            scale = (np.abs(center_d[rows]) + width_d[rows]) @ np.abs(V) + magnitude[rows] + magnitude[rows, [c]][:, None]
            lower = base + spread - 1e-12 * scale
            lower[:, c] = np.inf
            settled[rows] = np.all(lower > 0, axis=1)
        return settled, cand


# --------------------------------------------------------------------------- layered inference

@dataclass
class InferenceResult:
    """Result of :func:`layered_inference` on a block of samples.

    predictions : int64 (m,), certified; equal to the one-shot quantised predictions
    resolution : int64 (m,), resolution at which each sample's prediction was certified
    resolutions_total : int
    predictions_at : int64 (R, m), the prediction of every sample after each resolution
        (certified ones once settled, the argmax of the current logits estimate otherwise)
    active, work_s, macs, elapsed_s : per resolution: samples computed, model seconds and
        MACs of the work done, wall seconds since the start
    """

    predictions: np.ndarray
    resolution: np.ndarray
    resolutions_total: int
    predictions_at: np.ndarray
    active: list = field(default_factory=list)
    work_s: list = field(default_factory=list)
    macs: list = field(default_factory=list)
    elapsed_s: list = field(default_factory=list)


def layered_inference(model: QuantizedMLP, X: np.ndarray, adaptive: bool = True, trace=None,
                      kernel: str | None = None) -> InferenceResult:
    """Adaptive layered inference of ``X`` (samples x features); see the module docstring.

    ``trace``, if a list, receives one dict per (resolution, layer) with the global sample
    ``rows`` computed and the certified integer interval ``acc_lo``/``acc_hi`` of the layer's
    exact one-shot accumulator (and ``acc_est``, the estimate), for tests.
    """
    start = time.perf_counter()
    split, bits = model.split, model.bits
    R, L = split.n_resolutions, len(model.layers)
    m = X.shape[0]
    H0u = model.quantize_input(X)
    H0 = model.signed(0, H0u)
    bblocks = [OperandBlock(q.Wq, "B", bits) for q in model.layers]
    res = InferenceResult(np.full(m, -1, dtype=np.int64), np.full(m, -1, dtype=np.int64), R,
                          np.full((R, m), -1, dtype=np.int64))
    rows = np.arange(m)
    full = split.truncated(R - 1)
    a0 = OperandBlock(H0, "A", bits)
    acc0 = None
    for r in range(R):
        if len(rows) == 0:  # every sample settled: nothing left to compute
            res.predictions_at[r] = res.predictions
            res.active.append(0)
            res.work_s.append(0.0)
            res.macs.append(0)
            res.elapsed_s.append(time.perf_counter() - start)
            continue
        b0 = bblocks[0]
        terms = resolution_terms(split, r)
        acc0, kernels = add_terms(acc0, a0, b0, terms, kernel)
        work, macs = terms_cost(a0.length, b0.length, a0.k, terms, kernels)
        est, lo_t, hi_t = model.truncation(0, r, acc0, a0, b0, H0u[rows])
        lo, hi, mid = est + lo_t, est + hi_t, est + (lo_t + hi_t) // 2
        if trace is not None:
            trace.append({"resolution": r, "layer": 0, "rows": rows.copy(), "acc_lo": lo, "acc_hi": hi, "acc_est": est})
        for l in range(1, L):
            b = bblocks[l]
            H_lo, H_hi, H_t = model.next_input(l - 1, lo), model.next_input(l - 1, hi), model.next_input(l - 1, mid)
            a = OperandBlock(model.signed(l, H_t), "A", bits)
            prod, kernels = add_terms(None, a, b, [(full, full)], kernel)
            w, c = terms_cost(a.length, b.length, a.k, [(full, full)], kernels)
            work, macs = work + w, macs + c
            est = prod + model.layers[l].offset_acc  # = H_t @ Wq exactly
            d_lo, d_hi, w, c = model.interval_term(l, H_lo - H_t, H_hi - H_t)
            work, macs = work + w, macs + c
            lo, hi, mid = est + d_lo, est + d_hi, est + (d_lo + d_hi) // 2
            if trace is not None:
                trace.append({"resolution": r, "layer": l, "rows": rows.copy(), "acc_lo": lo, "acc_hi": hi, "acc_est": est})
        out_lo, out_hi, out_mid = model.output(lo), model.output(hi), model.output(mid)
        settled = np.ones(len(rows), dtype=bool) if r == R - 1 else _TOP1.settled(out_mid, out_lo, out_hi)
        decided = _TOP1.decide(out_mid, out_lo, out_hi)
        if L > 1 and model.layers[-1].activation == "linear" and r < R - 1:
            by_diff, cand = model.top1_by_differences(est, H_lo - H_t, H_hi - H_t, lo, hi)
            decided = np.where(by_diff & ~settled, cand, decided)
            settled |= by_diff
        new = settled & (res.resolution[rows] < 0)
        res.resolution[rows[new]] = r
        res.predictions[rows[new]] = decided[new]
        if r == R - 1 and not adaptive:  # every sample ends exact: the one-shot decision
            if np.any(decided != res.predictions[rows]):
                raise AssertionError("a certified prediction differs from the exact one (unsound bound)")
        res.predictions_at[r] = res.predictions  # settled samples (-1 for the others) ...
        current = np.where(res.resolution[rows] >= 0, res.predictions[rows], np.argmax(out_mid, axis=1))
        res.predictions_at[r, rows] = current    # ... and the current estimate of the rest
        res.active.append(len(rows))
        res.work_s.append(work)
        res.macs.append(macs)
        res.elapsed_s.append(time.perf_counter() - start)
        if adaptive and settled.any():
            keep = ~settled
            rows, acc0 = rows[keep], acc0[keep]
            a0 = OperandBlock(H0[rows], "A", bits)
    return res


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
    from .h5io import open_h5
    import os

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
    from .h5io import MatrixSource, parse_dataset_spec

    path, dataset = parse_dataset_spec(str(spec), "/X")
    with MatrixSource(path, dataset) as src:
        X = src.read(slice(None), slice(None)).astype(np.float64)
        src.check_finite(X, slice(None), slice(None))
        return X, src.label


def read_labels(spec, m: int, default="/y") -> np.ndarray:
    """Read a 1-D integer label dataset of length ``m``."""
    import h5py

    from .h5io import parse_dataset_spec

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
