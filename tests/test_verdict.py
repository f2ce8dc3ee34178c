import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spike_audit.auditors.robust import robust_center_scale
from spike_audit.auditors.sampling import BottomK
from spike_audit.auditors.verdict import VerdictConfig, judge

SIGNALS = [f"s{j}" for j in range(12)]


def _controls(rng, n=100):
    return rng.normal(0.0, 1.0, size=(n, len(SIGNALS)))


def test_planted_anomaly_gives_data_naming_the_signal_and_step():
    rng = np.random.default_rng(1)
    ctrl = _controls(rng)
    window = rng.normal(0.0, 1.0, size=(3, len(SIGNALS)))
    window[1, 7] = 25.0
    v = judge(SIGNALS, window, [98, 99, 100], ctrl)
    assert v.verdict == "data"
    assert v.top_signal == "s7" and v.top_step == 99
    assert v.p_value <= 0.05 and v.effect_size > 20
    assert v.signal_p["s7"] == pytest.approx(v.p_value)


def test_negative_anomaly_is_found_too():
    rng = np.random.default_rng(2)
    ctrl = _controls(rng)
    window = rng.normal(size=(1, len(SIGNALS)))
    window[0, 3] = -30.0
    v = judge(SIGNALS, window, [5], ctrl)
    assert v.verdict == "data" and v.top_signal == "s3" and v.effect_size < -20


def test_normal_window_is_not_data():
    rng = np.random.default_rng(3)
    v = judge(SIGNALS, rng.normal(size=(3, len(SIGNALS))), [1, 2, 3], _controls(rng))
    assert v.verdict == "not_data"
    assert "optimizer" in v.reason


def test_false_alarm_rate_under_the_null_is_at_most_alpha():
    # p-values are exact under exchangeability: P(p <= alpha) <= alpha. Check the p-value itself
    # (no effect threshold) over many null trials, with heavy-tailed signals.
    rng = np.random.default_rng(4)
    cfg = VerdictConfig(alpha=0.1, min_effect=0.0, min_margin=0.0)
    hits = 0
    trials = 400
    for _ in range(trials):
        data = rng.standard_t(3, size=(61, len(SIGNALS)))
        v = judge(SIGNALS, data[:1], [0], data[1:], cfg)
        hits += v.verdict == "data"
    # Binomial(400, 0.1): mean 40, sd 6; allow 3 sd.
    assert hits <= 58


def test_the_most_extreme_normal_step_is_not_data_without_a_margin():
    # a heavy-tailed signal: a control-like window that is the most extreme of all (p = 1/(n+1))
    # and many sigmas out, but not clearly beyond the controls' own extremes
    rng = np.random.default_rng(11)
    ctrl = rng.standard_t(1.5, size=(100, len(SIGNALS)))
    window = np.zeros((1, len(SIGNALS)))
    top = np.abs(ctrl).max()
    window[0, 4] = 1.2 * top
    v = judge(SIGNALS, window, [7], ctrl)
    assert v.p_value <= 0.05 and abs(v.effect_size) >= 5
    assert v.verdict == "not_data" and v.margin < 2 and "most extreme control" in v.reason
    window[0, 4] = 10 * top
    assert judge(SIGNALS, window, [7], ctrl).verdict == "data"


def test_too_few_controls_is_inconclusive():
    rng = np.random.default_rng(5)
    v = judge(SIGNALS, rng.normal(size=(1, 12)), [1], rng.normal(size=(5, 12)))
    assert v.verdict == "inconclusive" and "control" in v.reason and v.p_value is None


def test_no_window_data_is_inconclusive():
    rng = np.random.default_rng(6)
    v = judge(SIGNALS, np.zeros((0, 12)), [], _controls(rng))
    assert v.verdict == "inconclusive" and "window" in v.reason


def test_unreachable_alpha_is_inconclusive_not_not_data():
    rng = np.random.default_rng(7)
    window = rng.normal(size=(3, 12))
    window[0, 0] = 100
    v = judge(SIGNALS, window, [1, 2, 3], _controls(rng, n=25), VerdictConfig(alpha=0.01))
    assert v.verdict == "inconclusive" and "add controls" in v.reason


def test_constant_control_signal_does_not_blow_up_or_mask_others():
    rng = np.random.default_rng(8)
    ctrl = _controls(rng)
    ctrl[:, 0] = 0.0  # e.g. a duplicate fraction that is always zero on normal steps
    window = rng.normal(size=(1, 12))
    window[0, 0] = 0.0
    window[0, 5] = 40.0
    v = judge(SIGNALS, window, [9], ctrl)
    assert v.verdict == "data" and v.top_signal == "s5"


def test_nan_signals_are_ignored():
    rng = np.random.default_rng(9)
    ctrl = _controls(rng)
    ctrl[:, 2] = np.nan  # a text signal on a token-only corpus
    window = rng.normal(size=(1, 12))
    window[0, 2] = np.nan
    v = judge(SIGNALS, window, [1], ctrl)
    assert v.verdict == "not_data"


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
