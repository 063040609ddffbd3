"""Adaptive resolution: decisions always equal the exact product's, ties included."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import exact_int_product

import mpilayer
from mpilayer.apps.adaptive import adaptive_matmul, callback, threshold, top1

SPLITS = [None, 1, (1, 1, 2, 4), (2, 3, 3), (4, 4)]


def int_matrix(rng, shape, bits):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1))
    return rng.integers(lo, hi, shape).astype(np.int8 if bits <= 8 else np.int16)


def check_top1(A, B, bits, split):
    C = exact_int_product(A, B)
    res = adaptive_matmul(A, B, top1(), bits=bits, component_bits=split)
    np.testing.assert_array_equal(res.decisions, np.argmax(C, axis=1))
    assert res.resolution.min() >= 0 and res.resolution.max() < res.resolutions_total
    assert np.all(res.lo <= C) and np.all(C <= res.hi)  # the interval each row settled with
    return res


def check_threshold(A, B, bits, split, t):
    C = exact_int_product(A, B)
    res = adaptive_matmul(A, B, threshold(t), bits=bits, component_bits=split)
    np.testing.assert_array_equal(res.decisions, C >= t)
    assert np.all(res.lo <= C) and np.all(C <= res.hi)
    return res


@pytest.mark.parametrize("split", SPLITS)
def test_random_int(split):
    rng = np.random.default_rng(1)
    A, B = int_matrix(rng, (120, 70), 8), int_matrix(rng, (70, 9), 8)
    check_top1(A, B, 8, split)
    check_threshold(A, B, 8, split, 0)
    check_threshold(A, B, 8, split, rng.integers(-3000, 3000, 9))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_hypothesis_ties_and_thresholds(data):
    bits = data.draw(st.integers(3, 9))
    widths = data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=bits))
    widths = [w for w in widths if w][:bits]
    split = tuple(widths) + ((bits - sum(widths),) if sum(widths) < bits else ())
    if sum(split) != bits:
        split = 1
    m, k, n = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 10)), data.draw(st.integers(1, 6))
    seed = data.draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    small = data.draw(st.booleans())  # few distinct values: many exact ties
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1))
    if small:
        A = rng.integers(-1, 2, (m, k)) * (hi - 1)
        B = rng.integers(-1, 2, (k, n))
    else:
        A, B = rng.integers(lo, hi, (m, k)), rng.integers(lo, hi, (k, n))
    if n > 1 and data.draw(st.booleans()):
        B[:, -1] = B[:, 0]  # duplicated column: an exact tie in every row
    dt = np.int8 if bits <= 8 else np.int16
    A, B = A.astype(dt), B.astype(dt)
    check_top1(A, B, bits, split)
    C = exact_int_product(A, B)
    t = C.ravel()[rng.integers(C.size)]  # a threshold equal to an exact value
    check_threshold(A, B, bits, split, t)


def test_adversarial_ties_at_exact_resolution():
    """Rows whose maximum is shared by several columns, and thresholds equal to exact values:
    strict inequalities can never settle them early, and the exact tie rule decides."""
    rng = np.random.default_rng(5)
    A = int_matrix(rng, (200, 40), 8)
    base = int_matrix(rng, (40, 3), 8)
    B = np.hstack([base, base[:, :1], base[:, 1:2], base]).astype(np.int8)  # every max tied
    for split in SPLITS:
        res = check_top1(A, B, 8, split)
        C = exact_int_product(A, B)
        tied = (C == C.max(axis=1, keepdims=True)).sum(axis=1) > 1
        assert tied.all()
        assert np.all(res.resolution[tied] == res.resolutions_total - 1)  # only the exact one settles
        check_threshold(A, B, 8, split, C[0])  # per-column threshold hit exactly by row 0... and
        check_threshold(A, B, 8, split, C[7])     # ... by row 7


def test_real_inputs_match_exact_resolution():
    rng = np.random.default_rng(2)
    A, B = rng.normal(size=(150, 60)), rng.normal(size=(60, 8))
    for scale in ("tensor", "axis"):
        exact = list(mpilayer.layered_matmul(A, B, bits=8, component_bits=1, scale=scale))[-1].estimate
        res = adaptive_matmul(A, B, top1(), bits=8, component_bits=1, scale=scale)
        np.testing.assert_array_equal(res.decisions, np.argmax(exact, axis=1))
        assert np.all(res.lo <= exact) and np.all(exact <= res.hi)
        t = exact[3, 2]
        res = adaptive_matmul(A, B, threshold(t), bits=8, component_bits=1, scale=scale)
        np.testing.assert_array_equal(res.decisions, exact >= t)


def test_callback_rule_and_work_saved_on_easy_data():
    rng = np.random.default_rng(3)
    m, k, n = 300, 64, 10
    labels = rng.integers(0, n, m)
    A = rng.integers(-2, 3, (m, k))
    A[:, :n] += 120 * np.eye(n, dtype=np.int64)[labels]  # one clear winner per row
    B = np.zeros((k, n), dtype=np.int64)
    B[:n] = np.eye(n, dtype=np.int64) * 120
    B[n:] = rng.integers(-1, 2, (k - n, n))
    A, B = A.astype(np.int8), B.astype(np.int8)
    res = check_top1(A, B, 8, (1, 1, 2, 4))
    np.testing.assert_array_equal(res.decisions, labels)
    assert res.resolution.max() < res.resolutions_total - 1  # every row settled early
    # the final resolution computed nothing: its work (a whole int8 pass) is saved
    assert res.work_s[-1] == 0 and res.full_work_s[-1] > 0 and sum(res.macs) < sum(res.full_macs)
    assert res.work_fraction == pytest.approx(1 - res.full_work_s[-1] / sum(res.full_work_s))
    assert res.work_fraction < 0.8 and res.settled_fraction[-1] == 1.0

    def sign_known(est, lo, hi):
        return np.all((lo >= 0) | (hi < 0), axis=1)

    C = exact_int_product(A, B)
    res = adaptive_matmul(A, B, callback(sign_known, decide=lambda e, lo, hi: lo >= 0), bits=8, component_bits=1)
    np.testing.assert_array_equal(res.decisions, C >= 0)
    res = adaptive_matmul(A, B, sign_known, bits=8, component_bits=1)  # a bare callable; decision = estimate
    settled = res.resolution < res.resolutions_total - 1
    assert np.all(np.sign(res.decisions[settled].clip(-1, 0) + (res.lo[settled] >= 0)) == (C[settled] >= 0))


def test_bad_rule_and_callback_shape():
    A = np.ones((4, 3), dtype=np.int8)
    with pytest.raises(TypeError):
        adaptive_matmul(A, A.T, "top1")
    with pytest.raises(ValueError):
        adaptive_matmul(A, A.T, lambda e, lo, hi: np.ones(2, dtype=bool), component_bits=1)
