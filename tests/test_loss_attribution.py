"""Loss attribution (auditors/attribution.py): what a user reads off the model-based verdict."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spike_audit.auditors.loss_attribution import AttributionConfig, attribute, midmean, step_attribution, baseline_stats

CFG = AttributionConfig(n_boot=300)


def _baseline(rng, n_steps=16, n=256, loc=3.0, scale=0.5):
    return [rng.normal(loc, scale, n) for _ in range(n_steps)]


@pytest.mark.parametrize("seed", range(5))
def test_a_few_hot_rows_are_named_as_the_carriers(seed):
    rng = np.random.default_rng(seed)
    base = _baseline(rng)
    w = rng.normal(3.0, 0.5, 256)
    hot = rng.choice(256, size=6, replace=False)
    w[hot] += 8.0
    flags = np.zeros(256, bool)
    flags[hot] = True
    a = attribute([40], [w], [flags], base, CFG)
    s = a.chosen
    assert a.verdict == "data", a.reason
    assert s.breadth < 0.5
    # the planted rows carry all of the planted excess: the interval holds 1 (the point estimate moves
    # with the other rows' natural batch-to-batch noise)
    assert s.flagged_share_ci[0] <= 1.0 <= s.flagged_share_ci[1]
    assert s.flagged_share_ci[0] <= s.flagged_share <= s.flagged_share_ci[1]
    assert s.flagged_share_ci[0] > 0.5
    assert set(s.outliers.tolist()) == set(hot.tolist())
    assert s.precision == 1.0 and s.recall == 1.0


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("kind", ["shift", "scale"])
def test_a_rise_on_every_row_is_not_data(seed, kind):
    rng = np.random.default_rng(seed)
    base = _baseline(rng)
    w = rng.normal(3.0, 0.5, 256)
    w = w + 0.4 if kind == "shift" else w * 1.15
    flags = np.zeros(256, bool)
    flags[:3] = True  # a few rows flagged by the signals anyway
    a = attribute([40], [w], [flags], base, CFG)
    assert a.verdict == "not_data", a.reason
    assert "all rows alike" in a.reason
    assert a.chosen.breadth_ci[0] > 0.5
    assert a.chosen.flagged_share < 0.1


@pytest.mark.parametrize("seed", range(4))
def test_the_model_names_the_carriers_when_the_signals_miss_them(seed):
    """A quarter of the rows far above the rest, none of them flagged: still data, carried by the
    loss outliers, and the reason says the signals missed them."""
    rng = np.random.default_rng(seed)
    base = _baseline(rng, n=32, scale=0.8)
    w = rng.normal(3.0, 0.8, 32)
    hot = rng.choice(32, size=8, replace=False)
    w[hot] += 5.0
    flags = np.zeros(32, bool)
    flags[[i for i in range(32) if i not in hot][0]] = True  # the signals flagged some other row
    a = attribute([40], [w], [flags], base, CFG)
    assert a.verdict == "data", a.reason
    assert set(a.chosen.outliers.tolist()) == set(hot.tolist())
    assert a.chosen.outlier_share_ci[0] >= 0.5 and a.chosen.precision == 0.0
    assert "did not flag" in a.reason


def test_an_unremarkable_window_is_not_data_with_no_rise():
    rng = np.random.default_rng(0)
    base = _baseline(rng)
    a = attribute([40, 41], [rng.normal(3.0, 0.5, 256), rng.normal(3.0, 0.5, 256)],
                  [np.zeros(256, bool)] * 2, base, CFG)
    assert a.verdict == "not_data"
    assert "normal" in a.reason


def test_first_window_step_that_rose_is_judged():
    """A data spike at step 10 whose update then lifts every row at step 11: judged at step 10."""
    rng = np.random.default_rng(3)
    base = _baseline(rng)
    w10 = rng.normal(3.0, 0.5, 256)
    w10[:8] += 9.0
    w11 = rng.normal(3.0, 0.5, 256) + 1.0
    flags = np.zeros(256, bool)
    flags[:8] = True
    a = attribute([11, 10], [w11, w10], [np.zeros(256, bool), flags], base, CFG)
    assert a.step == 10 and a.verdict == "data"
    assert [s.step for s in a.steps] == [10, 11]


def test_too_few_baseline_steps_is_inconclusive():
    rng = np.random.default_rng(0)
    a = attribute([5], [rng.normal(size=32)], [np.zeros(32, bool)], _baseline(rng, n_steps=2), CFG)
    assert a.verdict == "inconclusive" and "baseline" in a.reason
    a = attribute([5], [np.full(32, np.nan)], [np.zeros(32, bool)], _baseline(rng), CFG)
    assert a.verdict == "inconclusive"


def test_nan_losses_are_counted_and_left_out():
    rng = np.random.default_rng(1)
    base = _baseline(rng)
    w = rng.normal(3.0, 0.5, 256)
    w[:6] += 8.0
    flags = np.zeros(256, bool)
    flags[:6] = True
    ref = attribute([9], [w[:200]], [flags[:200]], base, CFG).chosen
    w2 = w.copy()
    w2[200:] = np.nan
    got = attribute([9], [w2], [flags], base, CFG).chosen
    assert got.n_nan == 56 and got.n_rows == 256
    assert got.flagged_share == pytest.approx(ref.flagged_share)
    assert got.breadth == pytest.approx(ref.breadth)
    assert np.isnan(got.z[200:]).all()


# ---------------------------------------------------------------------------------- properties

# Losses are normal floats: a subnormal (5e-324) loses relative precision when scaled (doubling it is not exact in
# its spread), so "units do not matter" cannot hold for it bit for bit; CI found such a case.
losses = st.lists(st.floats(0.0, 12.0, allow_nan=False, allow_subnormal=False), min_size=8, max_size=80)


@st.composite
def cases(draw):
    w = np.asarray(draw(losses))
    flags = np.asarray(draw(st.lists(st.booleans(), min_size=len(w), max_size=len(w))))
    nb = draw(st.integers(3, 8))
    base = [np.asarray(draw(st.lists(st.floats(0.0, 12.0, allow_nan=False, allow_subnormal=False), min_size=4,
                                     max_size=30)))
            for _ in range(nb)]
    return w, flags, base


def _stats(w, flags, base, cfg=CFG):
    means, mids, sig = baseline_stats(base)
    return step_attribution(7, w, flags, means, mids, sig, cfg)


@settings(max_examples=60, deadline=None)
@given(cases(), st.randoms(use_true_random=False))
def test_row_order_does_not_matter(case, rnd):
    w, flags, base = case
    perm = np.arange(len(w))
    rnd.shuffle(perm)
    a, b = _stats(w, flags, base), _stats(w[perm], flags[perm], base)
    for f in ("flagged_share", "breadth", "excess", "outlier_share", "precision", "recall"):
        x, y = getattr(a, f), getattr(b, f)
        assert (np.isnan(x) and np.isnan(y)) or x == pytest.approx(y, rel=1e-9, abs=1e-9), f
    assert a.flagged_share_ci == pytest.approx(b.flagged_share_ci, nan_ok=True)
    assert a.breadth_ci == pytest.approx(b.breadth_ci, nan_ok=True)
    assert sorted(perm[b.outliers].tolist()) == sorted(a.outliers.tolist())


@settings(max_examples=60, deadline=None)
@given(cases(), st.floats(-5, 5), st.floats(0.2, 5))
def test_units_do_not_matter(case, shift, scale):
    """Losses in other units (a constant offset, a positive factor) give the same attribution."""
    w, flags, base = case
    a = _stats(w, flags, base)
    b = _stats(w * scale + shift, flags, [x * scale + shift for x in base])
    for f in ("flagged_share", "breadth", "outlier_share"):
        x, y = getattr(a, f), getattr(b, f)
        if np.isfinite(x) and abs(a.excess) > 1e-6:
            assert y == pytest.approx(x, rel=1e-6, abs=1e-6), f
    assert a.n_outliers == b.n_outliers or abs(a.excess) < 1e-6 or np.any(np.isclose(a.z, 3.0))


@settings(max_examples=60, deadline=None)
@given(cases())
def test_flagged_and_unflagged_shares_add_up_to_one(case):
    w, flags, base = case
    a, b = _stats(w, flags, base), _stats(w, ~flags, base)
    if flags.any() and (~flags).any() and np.isfinite(a.flagged_share) and abs(a.excess) > 1e-9:
        assert a.flagged_share + b.flagged_share == pytest.approx(1.0, abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(cases())
def test_same_seed_same_answer_and_intervals_hold_the_estimate_or_are_undefined(case):
    w, flags, base = case
    a, b = _stats(w, flags, base), _stats(w, flags, base)
    assert a.flagged_share_ci == pytest.approx(b.flagged_share_ci, nan_ok=True)
    assert a.breadth_ci == pytest.approx(b.breadth_ci, nan_ok=True)
    other = _stats(w, flags, base, AttributionConfig(n_boot=300, seed=1))
    # the seed moves intervals, never estimates
    assert other.flagged_share == a.flagged_share or (np.isnan(other.flagged_share) and np.isnan(a.flagged_share))
    assert 0 <= a.precision <= 1 or np.isnan(a.precision)
    assert 0 <= a.recall <= 1 or np.isnan(a.recall)


@given(st.lists(st.floats(-100, 100, allow_nan=False), min_size=1, max_size=50))
def test_midmean_is_the_mean_of_the_middle_half(xs):
    x = np.asarray(xs)
    s = np.sort(x)
    q = len(x) // 4
    assert midmean(x) == pytest.approx(s[q:len(x) - q].mean())
    assert s[0] <= midmean(x) <= s[-1]
