"""The calibrated verdict (auditors.evidence + auditors.verdict): row-level evidence against the natural rate,
calibrated on control steps.

Synthetic steps are drawn from one generator with the oddities real batches have: heavy tails, zero-inflated
signals, a binary signal whose natural hits cluster within a step, and step-to-step variation (rows of a step
share an offset). A window drawn from the same generator is a null window."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spike_audit.auditors.evidence import Family, bin_matrix, binom_logsf, evidence_of, to_bins
from spike_audit.auditors.verdict import (Reference, VerdictConfig, control_evidence, judge, step_flags,
                                          window_evidence)

FAMS = (Family("xent", "high", "pos"), Family("xent", "low", "pos"), Family("rep", "high", "frac"),
        Family("dup", "high", "flag"), Family("len", "high", "pos"), Family("len", "low", "pos"))
NAMES = ("xent", "rep", "dup", "len")


def null_step(rng, n_rows=16, zero=0.92, cluster=0.08, shift=0.3):
    """``n_rows x 4`` natural rows: lognormal xent with a per-step shift, a zero-inflated repetition share, a
    binary duplicate flag whose hits come in clusters, heavy-tailed lengths."""
    xent = np.exp(rng.normal(2.2 + rng.normal(0, shift * 0.1), 0.12, n_rows))
    rep = np.where(rng.random(n_rows) < zero, 0.0, rng.beta(0.6, 4.0, n_rows))
    dup = np.zeros(n_rows)
    if rng.random() < cluster:
        dup[rng.choice(n_rows, size=int(rng.integers(2, 4)), replace=False)] = 1.0
    length = np.round(np.exp(rng.normal(5.0, 0.8 + shift, n_rows)))
    return np.column_stack([xent, rep, dup, length])


def bins_of(values):
    return bin_matrix(values, NAMES, FAMS)


def setup(rng, n=100, **kw):
    ref = Reference([(s, bins_of(null_step(rng, **kw))) for s in range(1000, 1000 + n)], len(FAMS))
    return ref, control_evidence(ref)


def test_binomial_tail_matches_the_sum():
    from fractions import Fraction
    from math import comb, log

    for n, p in ((16, 0.01), (32, 0.3), (200, 0.002)):
        q = Fraction(p)
        for k in range(0, n + 1, max(1, n // 16)):
            want = sum(comb(n, i) * q ** i * (1 - q) ** (n - i) for i in range(k, n + 1))  # exact
            got = binom_logsf(k, n, p)
            assert got == pytest.approx(log(want.numerator) - log(want.denominator), rel=1e-6, abs=1e-9), (n, p, k)
    assert binom_logsf(17, 16, 0.5) == -np.inf and binom_logsf(0, 16, 0.5) == 0.0


def test_bins_are_monotone_and_zero_and_nan_are_bin_zero():
    y = np.array([np.nan, 0.0, 1e-30, 1e-3, 0.5, 1.0, 2.0, 1e9, np.inf])
    b = to_bins(y).astype(int)
    assert b[0] == 0 and b[1] == 0 and b[2] >= 1
    assert np.all(np.diff(b[2:]) >= 0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                          st.floats(min_value=1e-12, max_value=1e12)), min_size=1, max_size=50))
def test_bins_hold_their_values_and_one_value_bins_as_an_array_of_it(values):
    """Every positive value lies in its bin (``bin_floor(b) <= y < bin_floor(b + 1)``, up to the 1e-9 guard, the
    first and last bins open-ended); zero, negative and NaN values are bin 0; one value bins like an array of it."""
    from spike_audit.auditors.evidence import NBINS, bin_floor

    y = np.array(values, dtype=np.float64)
    b = to_bins(y).astype(np.int64)
    assert b.shape == y.shape and b.min() >= 0 and b.max() <= NBINS - 1
    assert (b[~(y > 0)] == 0).all()
    pos = np.flatnonzero(y > 0)
    for i in pos:
        lo, hi = float(bin_floor(b[i])), float(bin_floor(b[i] + 1))
        assert b[i] >= 1
        assert b[i] == 1 or y[i] >= lo * (1 - 1e-8), (y[i], b[i], lo)
        assert b[i] == NBINS - 1 or y[i] < hi * (1 + 1e-8), (y[i], b[i], hi)
        assert int(to_bins(float(y[i]))) == b[i]


def test_planted_anomaly_gives_data_with_the_row_count_and_flags_exactly_its_rows():
    rng = np.random.default_rng(1)
    ref, ctrl = setup(rng)
    w = null_step(rng)
    w[[2, 5, 11, 14], 0] = 60.0  # 4 rows of 16 far beyond every natural xent
    bins = bins_of(w)
    v = judge(FAMS, [7], window_evidence([bins], ref), ref, ctrl)
    assert v.verdict == "data", v.reason
    assert v.top_signal == "xent" and v.top_step == 7 and v.anomalous_rows == 4 and v.n_rows == 16
    assert v.control_max_rows == 0 and v.effect_size == 4.0
    assert "4 of 16 rows anomalous on xent at step 7" in v.reason
    rows, _ = step_flags(bins, v.step_findings[7])
    assert rows.tolist() == [2, 5, 11, 14]


def test_low_tail_anomaly_is_found_too():
    rng = np.random.default_rng(2)
    ref, ctrl = setup(rng)
    w = null_step(rng)
    w[:8, 3] = 1.0  # 8 rows of one token
    v = judge(FAMS, [3], window_evidence([bins_of(w)], ref), ref, ctrl)
    assert v.verdict == "data" and v.top_signal == "len:low", v.reason


def test_zero_inflated_controls_with_natural_oddities_do_not_mask_a_full_batch_anomaly():
    rng = np.random.default_rng(3)
    steps = [null_step(rng, cluster=0.0) for _ in range(100)]
    steps[10][:3, 2] = 1.0  # natural duplicates in two controls
    steps[40][:2, 2] = 1.0
    steps[60][0, 1] = 0.99  # and one extreme natural repetition
    ref = Reference([(s, bins_of(x)) for s, x in enumerate(steps)], len(FAMS))
    ctrl = control_evidence(ref)
    w = null_step(rng)
    w[:, 0] = 90.0  # 16 of 16 random-token rows
    v = judge(FAMS, [500, 501, 502], window_evidence([bins_of(null_step(rng)), bins_of(w), bins_of(null_step(rng))],
                                                     ref), ref, ctrl)
    assert v.verdict == "data" and v.top_step == 501 and v.anomalous_rows == 16, v.reason
    assert v.p_value == pytest.approx(1 - (1 - 1 / 101) ** 3)


def _null_bound(draws: int, alpha: float, false_alarm: float = 1e-6) -> int:
    """The largest count of ``p <= alpha`` a calibrated test reaches in ``draws`` null windows but with probability
    ``false_alarm``: the binomial tail, so the property test below fails by chance about once in a million examples
    (at 120 draws and mean + 3 sd it failed once in about 50 runs of the suite, on a calibrated setting: 4,000 draws of
    that setting gave 0.1005 at alpha 0.1)."""
    k = np.arange(draws + 2)
    return int(k[np.flatnonzero(binom_logsf(k, draws, alpha) <= np.log(false_alarm))[0]] - 1)


@settings(max_examples=4, deadline=None)
@given(st.integers(0, 2**31), st.floats(0.6, 0.98), st.floats(0.0, 0.3), st.integers(1, 3))
def test_p_is_calibrated_on_null_windows(seed, zero, cluster, m):
    # a null window is a draw of the same generator: P(p <= alpha) must be at most alpha (+ Monte Carlo noise),
    # and `data` verdicts no more frequent
    rng = np.random.default_rng(seed)
    cfg = VerdictConfig(alpha=0.1)
    hits = data = 0
    draws = 600
    for _ in range(draws):
        ref, ctrl = setup(rng, n=60, zero=zero, cluster=cluster)
        win = [bins_of(null_step(rng, zero=zero, cluster=cluster)) for _ in range(m)]
        v = judge(FAMS, list(range(m)), window_evidence(win, ref), ref, ctrl, cfg)
        hits += v.p_value <= cfg.alpha
        data += v.verdict == "data"
    # binomial(600, 0.1): mean 60, sd 7.3; the bound (98, a rate of 0.163) is exceeded by chance with probability 1e-6,
    # and a test that is `data` at twice alpha (mean 120) never passes it
    assert hits <= _null_bound(draws, cfg.alpha), hits
    assert data <= hits


def test_the_null_bound_is_the_binomial_tail():
    b = _null_bound(600, 0.1)
    assert 90 <= b <= 100  # mean 60, sd 7.35: about 4.8 sd
    assert binom_logsf(b + 1, 600, 0.1) <= np.log(1e-6) < binom_logsf(b, 600, 0.1)


def test_controls_judged_as_windows_are_data_about_alpha_of_the_time():
    rng = np.random.default_rng(5)
    ref, ctrl = setup(rng, n=200)
    cfg = VerdictConfig(alpha=0.05)
    vs = [judge(FAMS, [int(ref.steps[i])], ctrl.take([i]), ref, ctrl, cfg, skip=i) for i in range(ref.n)]
    p = np.array([v.p_value for v in vs])
    assert (p <= 0.05).mean() <= 0.05 + 1e-9  # exact: the p's of n exchangeable members are ranks
    assert sum(v.verdict == "data" for v in vs) <= (p <= 0.05).sum()


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31), st.floats(0.05, 1.0))
def test_evidence_is_monotone_in_the_dose(seed, level):
    # k rows of a batch made anomalous on one signal (the repetition share, anomalous in its high tail only),
    # one more each time: its evidence, the statistic and the p-value never go the wrong way
    rng = np.random.default_rng(seed)
    ref, ctrl = setup(rng)
    base = null_step(rng)
    order = rng.permutation(16)
    prev_e, prev_p = -1.0, 2.0
    for k in range(17):
        w = base.copy()
        w[order[:k], 1] = np.maximum(w[order[:k], 1], level)
        ev = window_evidence([bins_of(w)], ref)
        e = float(ev.e[0, 2])
        v = judge(FAMS, [1], ev, ref, ctrl)
        assert e >= prev_e - 1e-9, (k, e, prev_e)
        if v.p_value is not None:
            assert v.p_value <= prev_p + 1e-12
            prev_p = v.p_value
        prev_e = e


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**31), st.randoms(use_true_random=False))
def test_verdict_is_invariant_to_the_order_of_controls(seed, rnd):
    rng = np.random.default_rng(seed)
    items = [(s, bins_of(null_step(rng))) for s in range(100, 160)]
    w = null_step(rng)
    w[:3, 1] = 0.9
    win = [bins_of(w), bins_of(null_step(rng))]
    out = []
    for perm in (items, rnd.sample(items, len(items))):
        ref = Reference(perm, len(FAMS))
        v = judge(FAMS, [9, 10], window_evidence(win, ref), ref, control_evidence(ref))
        out.append((v.verdict, v.p_value, v.top_signal, v.top_step, v.anomalous_rows, v.reason))
    assert out[0] == out[1]


def test_too_few_controls_or_no_window_is_inconclusive_and_a_window_too_long_for_the_controls_is_cut():
    rng = np.random.default_rng(6)
    ref, ctrl = setup(rng, n=10)
    w = window_evidence([bins_of(null_step(rng))], ref)
    assert judge(FAMS, [1], w, ref, ctrl).verdict == "inconclusive"
    ref, ctrl = setup(rng, n=30)
    v = judge(FAMS, [], window_evidence([], ref), ref, ctrl)
    assert v.verdict == "inconclusive" and "no step" in v.reason
    win = [bins_of(null_step(rng)) for _ in range(3)]
    w = null_step(rng)
    w[:4, 0] = 60.0
    win[0] = bins_of(w)
    v = judge(FAMS, [1, 2, 3], window_evidence(win, ref), ref, ctrl)  # 1 - (1 - 1/31)^3 > 0.05: one step only
    assert v.n_window_steps == 1 and "last 2 steps left out" in v.reason and v.verdict == "data", v.reason


def test_a_normal_window_is_not_data_and_names_the_control_as_extreme():
    rng = np.random.default_rng(8)
    ref, ctrl = setup(rng)
    v = judge(FAMS, [1, 2], window_evidence([bins_of(null_step(rng)) for _ in range(2)], ref), ref, ctrl)
    assert v.verdict == "not_data" and "look at the optimizer" in v.reason


def test_evidence_of_counts():
    assert evidence_of(0, 16, 0.01) == 0.0
    assert evidence_of(16, 16, 0.5) == pytest.approx(16 * np.log10(2))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31))
def test_bin_matrix_equals_orient_then_bins_column_by_column(seed):
    from spike_audit.auditors.evidence import BIN_DTYPE, orient

    rng = np.random.default_rng(seed)
    fams = FAMS + (Family("rep", "low", "frac"), Family("absent", "high", "pos"))
    v = rng.standard_normal((30, len(NAMES))) * rng.choice([1e-6, 1.0, 1e6])
    v[rng.random(v.shape) < 0.2] = 0.0
    v[rng.random(v.shape) < 0.1] = np.nan
    v[rng.random(v.shape) < 0.05] = np.inf
    want = np.zeros((30, len(fams)), dtype=BIN_DTYPE)
    for f, fam in enumerate(fams):
        if fam.signal in NAMES:
            want[:, f] = to_bins(orient(v, NAMES.index(fam.signal), fam))
    assert np.array_equal(bin_matrix(v, NAMES, fams), want)


def test_copies_in_a_batch_count_once_per_group_and_the_skip_list_names_every_copy():
    # a pair of identical rows is one duplicate: only the later copy is counted (so a natural pair in a control
    # weighs as one odd row, not two), and its flag brings the first copy along
    from spike_audit.auditors.base import TokenBatch
    from spike_audit.auditors.rows import FAMILY_NAMES, PAIRED_SIGNALS, SIGNAL_ORDER, FAMILIES, RowScorer

    rng = np.random.default_rng(0)
    docs = [rng.integers(2, 5000, 300) for _ in range(5)]
    near = docs[1].copy()
    near[rng.choice(300, 18, replace=False)] = rng.integers(2, 5000, 18)  # 6% of tokens substituted
    rows = [docs[0], docs[1], docs[2], docs[0], near, docs[3], docs[0], docs[4]]
    tb = TokenBatch(np.concatenate(rows), np.r_[0, np.cumsum([len(r) for r in rows])])
    sc = RowScorer().score(tb)
    assert sc.values["dup_in_batch"].tolist() == [0, 0, 0, 1, 0, 0, 1, 0]
    nd = sc.values["near_dup_jaccard"]
    assert nd[[0, 1, 2, 5, 7]].tolist() == [0, 0, 0, 0, 0] and nd[3] == nd[6] == 1.0 and 0.3 < nd[4] < 0.9
    assert sc.partner.tolist() == [-1, -1, -1, 0, 1, -1, 0, -1]
    bins = bin_matrix(sc.matrix(), SIGNAL_ORDER, FAMILIES)
    f = FAMILY_NAMES.index("dup_in_batch")
    from spike_audit.auditors.verdict import Finding

    x = Finding(f, 1, 2, 8, int(bins[3, f]), 9.0, 0.001, 0, None, True)
    paired = [i for i, fam in enumerate(FAMILIES) if fam.signal in PAIRED_SIGNALS]
    assert step_flags(bins, [x])[0].tolist() == [3, 6]
    assert step_flags(bins, [x], sc.partner, paired)[0].tolist() == [0, 3, 6]
    # documents too: a row whose documents copy earlier documents of the batch (not the first occurrence)
    a, b, c = [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]
    rows = [a + [0] + b, c, b + [0] + a + [0], [20, 21, 22]]
    tb = TokenBatch(np.concatenate(rows), np.r_[0, np.cumsum([len(r) for r in rows])])
    sc = RowScorer(eos_id=0).score(tb)
    assert sc.values["dup_doc_frac"].tolist() == [0, 0, 1, 0] and sc.partner.tolist() == [-1, -1, 0, -1]


def test_a_whole_batch_shift_is_not_row_evidence_but_rows_beyond_the_controls_are():
    # every control row has xent uniform over [8, 12]; a window whose 16 rows all sit at the 70% quantile is a
    # batch shifted as a whole: the binomial alone would give e > 6 (16 of 16 rows where 30% of rows are), but
    # no row is individually unusual (a normal batch expects 4.8 rows at that cut)
    rng = np.random.default_rng(7)

    def step(x):
        v = null_step(rng)
        v[:, 0] = x
        return bins_of(v)

    ref = Reference([(s, step(rng.uniform(8.0, 12.0, 16))) for s in range(100)], len(FAMS))
    shifted = step(np.full(16, 10.8))
    from spike_audit.auditors.evidence import candidates_from_rows, scan

    cand = candidates_from_rows(shifted, np.zeros(16, np.int64), ref.tail, loo=False)
    raw = scan([cand], np.array([16]), np.array([ref.rows]), len(FAMS))
    assert raw.e[0, 0] > 6  # what the binomial alone says
    ev = window_evidence([shifted], ref)
    assert ev.e[0, 0] == 0.0
    # 3 rows beyond every control row: a selective cut, full evidence
    x = rng.uniform(8.0, 12.0, 16)
    x[[1, 4, 9]] = 30.0
    ev2 = window_evidence([step(x)], ref)
    assert ev2.k[0, 0] == 3 and ev2.e[0, 0] > 6


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31), st.floats(0.1, 4.0))
def test_row_selective_cuts_keep_only_cuts_a_normal_batch_rarely_reaches(seed, bound):
    from spike_audit.auditors.evidence import candidates_from_rows, scan

    rng = np.random.default_rng(seed)
    ref, _ = setup(rng, n=40)
    steps = [bins_of(null_step(rng)) for _ in range(3)]
    allb = np.concatenate(steps)
    group = np.repeat(np.arange(3), 16)
    cand = candidates_from_rows(allb, group, ref.tail, loo=False)
    full = scan([cand], np.full(3, 16), np.full(3, ref.rows), len(FAMS))
    sel = scan([cand], np.full(3, 16), np.full(3, ref.rows), len(FAMS), bound)
    has = sel.e > 0
    assert np.all(16 * sel.rate[has] <= bound + 1e-12)  # every reported cut is row-selective
    assert np.all(sel.e <= full.e + 1e-12)  # a subset of the cuts: never more evidence
    # where the full scan's reported cut (within FLAG_TOLERANCE of its best) is selective, the selective scan
    # keeps that cut: at most the tolerance below
    from spike_audit.auditors.evidence import FLAG_TOLERANCE

    same = (full.e > 0) & (16 * np.nan_to_num(full.rate, nan=1.0) <= bound)
    assert np.all(sel.e[same] >= full.e[same] - FLAG_TOLERANCE - 1e-9)
