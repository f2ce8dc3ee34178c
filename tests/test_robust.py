"""Robust location/scale with exact leave-one-out (shard ranking) and the BottomK sample."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from spike_audit.auditors.robust import robust_center_scale
from spike_audit.auditors.sampling import BottomK


def test_robust_center_scale_resists_outliers():
    x = np.r_[np.random.default_rng(0).normal(10, 2, 1000), [1e9] * 10]
    med, sig = robust_center_scale(x)
    assert abs(med - 10) < 0.3 and abs(sig - 2) < 0.3


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10**6), st.floats(-1e6, 1e6)), min_size=0, max_size=200,
                unique_by=lambda t: t[0]),
       st.integers(1, 50), st.randoms(use_true_random=False))
def test_bottomk_is_order_and_grouping_invariant(items, k, rnd):
    bk = BottomK(k=k, seed=3)
    keys = np.array([i for i, _ in items], dtype=np.int64)
    vals = np.array([v for _, v in items], dtype=np.float64)
    seq = bk.add(bk.create(), keys, vals)
    perm = list(range(len(items)))
    rnd.shuffle(perm)
    cuts = sorted(rnd.sample(range(len(items) + 1), min(3, len(items) + 1)))
    parts = np.split(np.array(perm, dtype=np.int64), cuts)
    accs = [bk.add(bk.create(), keys[p], vals[p]) for p in parts]
    rnd.shuffle(accs)
    merged = bk.merge([bk.merge(accs[:1]), bk.merge(accs[1:])])
    assert np.array_equal(seq[0], merged[0])
    assert np.array_equal(bk.result(seq), bk.result(merged))
    assert len(seq[0]) == min(k, len(items))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.floats(-1e3, 1e3), st.sampled_from([0.0, 1.0, 2.0]), st.just(float("nan"))),
                min_size=2, max_size=40))
def test_fast_leave_one_out_equals_the_definition(values):
    from spike_audit.auditors.robust import loo_center_scale

    col = np.array(values, dtype=np.float64)[:, None]
    med, sig = loo_center_scale(col)
    for i in range(len(col)):
        m_ref, s_ref = robust_center_scale(np.delete(col, i, axis=0), axis=0)
        np.testing.assert_allclose(med[i], m_ref, rtol=1e-9, atol=1e-9, equal_nan=True)
        np.testing.assert_allclose(sig[i], s_ref, rtol=1e-9, atol=1e-9, equal_nan=True)
