"""Per-spike verdict statistics: is the data a spike consumed unusual compared with normal steps?

The test, for one spike with window steps ``W`` (the spike's own steps plus a lookback) and ``n``
control steps ``C`` (a seeded sample of normal steps away from any spike), over ``K`` signals:

1. **Leave-one-out robust z.** Pool the ``n`` controls with one window step. For every member ``i``
   of the pool and signal ``j``, take the median ``m`` and robust sigma ``s`` of the *other* ``n``
   members (1.4826 * MAD; if the MAD is 0, 1.2533 * mean absolute deviation; if that is 0 too, a
   floor of ``1e-9 + 1e-6 * |m|``) and ``z_ij = (x_ij - m) / s``. Leaving the member out keeps an
   extreme value from inflating the scale it is judged by; doing it for every member keeps the
   statistic symmetric, so the members stay exchangeable under the null.
2. **Max-T statistic.** ``T_i = max_j |z_ij|`` for the window step and for every control. Taking
   the maximum over signals *is* the multiple-comparison correction (Westfall-Young single-step
   max-T): the null distribution of the maximum is estimated from the controls themselves, so
   dependence between signals and heavy-tailed signals are accounted for.
3. **Empirical p-value** from ranks: ``p_i = (1 + #{c : T_c >= T_i}) / (n + 1)``. Under the null the
   window step is exchangeable with the controls, so ``p_i`` is exactly valid. The smallest attainable
   value is ``1 / (n + 1)``.
4. **Window correction.** The spike's p-value is the smallest ``p_i`` over the ``m`` window steps,
   Sidak-corrected: ``p = 1 - (1 - min_i p_i) ** m``.
   Signals listed in :data:`auditors.scales.LOG_SCALE` (maxima, lengths) are compared on
   ``log1p(value)``.
5. **Effect size** of the top signal (the ``j`` and window step attaining the maximum): ``(x - median(C))
   / sigma(C)`` against the controls alone.
6. **Margin** (practical significance): ``T_window / max_c T_c``, how far the window's max-T lies
   beyond the most extreme control step. By construction about ``alpha`` of normal steps reach
   ``p <= alpha``; the margin is what separates "the most unusual normal step" from "unlike any
   normal step". Its null distribution is checked on the controls themselves
   (:func:`pipelines.run.control_false_alarms` judges each control against the others).
7. **Verdict.** ``inconclusive`` when there are fewer than ``min_controls`` controls, no window step
   has data, or the smallest attainable ``p`` exceeds ``alpha`` (more controls are needed);
   ``data`` when ``p <= alpha``, ``|effect| >= min_effect`` and ``margin >= min_margin``;
   otherwise ``not_data``.

Per-signal adjusted p-values (max-T adjusted: ``(1 + #{c : T_c >= |z_j|}) / (n + 1)``) are also
returned for the report.

:class:`BottomK` is a deterministic, mergeable sample (the ``k`` items with the smallest seeded hash
of their key) used for row-level baselines; merging in any order gives the same sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from spike_audit.auditors.scales import to_scoring_scale

MAD_TO_SIGMA = 1.4826
MEANAD_TO_SIGMA = 1.2533


IQR_TO_SIGMA = 1.0 / 1.349
Q1090_TO_SIGMA = 1.0 / 2.5631


def robust_center_scale(x: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Median and robust sigma along ``axis``. NaNs are ignored (a signal that is NaN for some
    entities is judged on the others).

    The scale is the largest of three estimates, each consistent with the sigma of a normal
    distribution: 1.4826 * MAD, IQR / 1.349, and the 10-90% range / 2.563. On clean normal data they
    agree; on a heavy-tailed signal (a maximum run length, a mean row length of mostly-full rows) the
    wider ranges keep ordinary tail values from looking like many-sigma outliers, while still
    ignoring the top 10% (where the anomalies being looked for live). When all three are 0 (more than
    80% of the values are identical), 1.2533 * mean absolute deviation; when that is 0 too, a floor
    of ``1e-9 + 1e-6 * |median|``."""
    x = np.asarray(x, dtype=np.float64)
    import warnings

    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(x, axis=axis)
        dev = np.abs(x - np.expand_dims(med, axis))
        mad = np.nanmedian(dev, axis=axis) * MAD_TO_SIGMA
        q10, q25, q75, q90 = np.nanquantile(x, [0.10, 0.25, 0.75, 0.90], axis=axis)
        spread = np.fmax(np.fmax(mad, (q75 - q25) * IQR_TO_SIGMA), (q90 - q10) * Q1090_TO_SIGMA)
        meanad = np.nanmean(dev, axis=axis) * MEANAD_TO_SIGMA
    sigma = np.where(spread > 0, spread, meanad)
    floor = 1e-9 + 1e-6 * np.abs(np.nan_to_num(med))
    sigma = np.where(np.isfinite(sigma) & (sigma > floor), sigma, floor)
    return med, sigma


def robust_z(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """z of ``values`` (..., K) against the per-column median/robust sigma of ``reference`` (n, K)."""
    med, sigma = robust_center_scale(reference, axis=0)
    return (np.asarray(values, dtype=np.float64) - med) / sigma


@dataclass(frozen=True)
class VerdictConfig:
    alpha: float = 0.05
    min_effect: float = 5.0
    min_margin: float = 2.0
    min_controls: int = 20


@dataclass
class Verdict:
    verdict: str
    p_value: float | None
    effect_size: float | None
    top_signal: str | None
    top_step: int | None
    n_controls: int
    n_window_steps: int
    reason: str
    margin: float | None = None
    signal_p: dict[str, float] = field(default_factory=dict)
    signal_effect: dict[str, float] = field(default_factory=dict)


def _loo_q(s: np.ndarray, r: np.ndarray, q: float) -> np.ndarray:
    """q-quantile (numpy's linear method) of the sorted array ``s`` without its element at rank
    ``r``, for every rank in ``r`` at once."""
    m = len(s) - 1  # companions
    pos = q * (m - 1)
    lo = int(np.floor(pos))
    hi = min(lo + 1, m - 1)
    frac = pos - lo
    v_lo = s[lo + (lo >= r)]
    v_hi = s[hi + (hi >= r)]
    return v_lo + frac * (v_hi - v_lo)


def _loo_column(col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each element of ``col``: ``robust_center_scale`` of all the *other* elements, exactly,
    in O(N log N) instead of O(N^2 log N). NaN elements are judged against every finite one."""
    n_all = len(col)
    med = np.full(n_all, np.nan)
    sig = np.full(n_all, np.nan)
    idx = np.flatnonzero(~np.isnan(col))
    x = col[idx]
    n = len(x)
    missing = np.isnan(col)
    if missing.any():  # a NaN element's companions: every finite value
        med[missing], sig[missing] = robust_center_scale(x if n else np.array([np.nan]))
    if n < 2:  # a lone finite element has only NaN companions
        med[idx], sig[idx] = robust_center_scale(np.array([np.nan]))
        return med, sig
    order = np.argsort(x, kind="stable")
    srt = x[order]
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    mloo = _loo_q(srt, rank, 0.5)
    q10, q25, q75, q90 = (_loo_q(srt, rank, q) for q in (0.10, 0.25, 0.75, 0.90))
    mad = np.empty(n)
    meanad = np.empty(n)
    for mval in np.unique(mloo):  # the leave-one-out median takes at most 3 distinct values
        who = np.flatnonzero(mloo == mval)
        d = np.abs(x - mval)
        dord = np.argsort(d, kind="stable")
        drank = np.empty(n, dtype=np.int64)
        drank[dord] = np.arange(n)
        mad[who] = _loo_q(d[dord], drank[who], 0.5)
        meanad[who] = (d.sum() - d[who]) / (n - 1)
    with np.errstate(invalid="ignore"):
        spread = np.fmax(np.fmax(mad * MAD_TO_SIGMA, (q75 - q25) * IQR_TO_SIGMA), (q90 - q10) * Q1090_TO_SIGMA)
        s_ = np.where(spread > 0, spread, meanad * MEANAD_TO_SIGMA)
        floor = 1e-9 + 1e-6 * np.abs(np.nan_to_num(mloo))
        s_ = np.where(np.isfinite(s_) & (s_ > floor), s_, floor)
    med[idx], sig[idx] = mloo, s_
    return med, sig


def loo_center_scale(pooled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) -> median and robust sigma of every row's N-1 companions, per column (exact)."""
    pooled = np.asarray(pooled, dtype=np.float64)
    med = np.empty_like(pooled)
    sig = np.empty_like(pooled)
    for k in range(pooled.shape[1]):  # a loop over signals, each column vectorised
        med[:, k], sig[:, k] = _loo_column(pooled[:, k])
    return med, sig


def loo_z(pooled: np.ndarray) -> np.ndarray:
    """Leave-one-out robust z of every row of ``pooled`` (N, K) against the other N-1 rows."""
    med, sigma = loo_center_scale(pooled)
    return (np.asarray(pooled, dtype=np.float64) - med) / sigma


def _maxt(pooled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """|z| matrix and max-T per row for a pooled (n+1, K) matrix (NaN signals contribute nothing)."""
    absz = np.abs(loo_z(pooled))
    absz = np.where(np.isfinite(absz), absz, 0.0)
    return absz, absz.max(axis=1) if absz.shape[1] else np.zeros(len(absz))


def judge(
    signals: Sequence[str],
    window: np.ndarray,
    window_steps: Sequence[int],
    controls: np.ndarray,
    config: VerdictConfig = VerdictConfig(),
) -> Verdict:
    """Verdict for one spike. ``window`` is (m, K) signal values of the window steps that had data,
    ``controls`` is (n, K), columns in the order of ``signals``."""
    signals = list(signals)
    window = to_scoring_scale(signals, np.asarray(window, dtype=np.float64).reshape(-1, len(signals)))
    controls = to_scoring_scale(signals, np.asarray(controls, dtype=np.float64).reshape(-1, len(signals)))
    m, n = len(window), len(controls)
    if n < config.min_controls:
        return Verdict("inconclusive", None, None, None, None, n, m,
                       f"only {n} control steps had data (need {config.min_controls})")
    if m == 0:
        return Verdict("inconclusive", None, None, None, None, n, m, "no step of the spike window had data")
    p_floor = 1.0 - (1.0 - 1.0 / (n + 1)) ** m
    if p_floor > config.alpha:
        return Verdict("inconclusive", None, None, None, None, n, m,
                       f"{n} controls cannot reach p <= {config.alpha} over {m} window steps; add controls")

    best = None  # (p, T, i, j, margin)
    signal_p = {s: 1.0 for s in signals}
    for i in range(m):
        pooled = np.vstack([controls, window[i : i + 1]])
        absz, maxt = _maxt(pooled)
        t_win, t_ctrl = maxt[-1], maxt[:-1]
        p = (1.0 + np.count_nonzero(t_ctrl >= t_win)) / (n + 1.0)
        j = int(np.argmax(absz[-1])) if len(signals) else 0
        # per-signal max-T adjusted p-values (smallest over window steps)
        pj = (1.0 + (t_ctrl[None, :] >= absz[-1][:, None]).sum(axis=1)) / (n + 1.0)
        for s, v in zip(signals, pj):
            signal_p[s] = min(signal_p[s], float(v))
        top_ctrl = float(t_ctrl.max()) if n else 0.0
        margin = float(t_win / top_ctrl) if top_ctrl > 0 else float("inf")
        if best is None or (p, -t_win) < (best[0], -best[1]):
            best = (p, t_win, i, j, margin)
    assert best is not None
    p_min, _, i_top, j_top, margin = best
    p_spike = float(1.0 - (1.0 - p_min) ** m)
    signal_p = {s: float(1.0 - (1.0 - v) ** m) for s, v in signal_p.items()}
    cmed, csig = robust_center_scale(controls, axis=0)
    effects = (window - cmed) / csig
    signal_effect = {}
    for jj, s in enumerate(signals):
        col = effects[:, jj]
        col = col[np.isfinite(col)]
        signal_effect[s] = float(col[np.argmax(np.abs(col))]) if len(col) else float("nan")
    effect = float(effects[i_top, j_top])
    top = signals[j_top]
    step = int(window_steps[i_top])
    if p_spike <= config.alpha and abs(effect) >= config.min_effect and margin >= config.min_margin:
        verdict = "data"
        reason = (f"step {step}: {top} is {_sig(effect)} robust sigmas from {n} control steps, "
                  f"{_times(margin)} the most extreme control (p={p_spike:.3g}, max-T over {len(signals)} signals, "
                  f"{m} window steps)")
    else:
        verdict = "not_data"
        why = ("p > alpha" if p_spike > config.alpha else f"|effect| < {config.min_effect:g}"
               if abs(effect) < config.min_effect else f"only {_times(margin)} the most extreme control step")
        reason = (f"the window's data looks like the {n} control steps ({why}: most unusual is {top} at "
                  f"step {step}, {_sig(effect)} sigmas, p={p_spike:.3g}); look at the optimizer or hardware")
    return Verdict(verdict, p_spike, effect, top, step, n, m, reason, margin, signal_p, signal_effect)


def _sig(z: float) -> str:
    return f"{z:+.1f}" if abs(z) < 1e4 else ("> +1e4" if z > 0 else "< -1e4")


def _times(r: float) -> str:
    return f"{r:.2f}x" if r < 1e4 else ">1e4x"


def hash64(keys: np.ndarray, seed: int = 0) -> np.ndarray:
    """Deterministic 64-bit mix (splitmix64 finaliser) of integer keys, vectorised."""
    x = np.asarray(keys).astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        x += np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


class BottomK:
    """Deterministic mergeable sample: keeps the ``k`` items with the smallest hash of their key.

    Accumulator: ``(hashes uint64[<=k], values float64[<=k, d])``. The sample depends only on the set
    of (key, value) pairs added, never on order or grouping."""

    def __init__(self, k: int = 4096, dims: int = 1, seed: int = 0):
        self.k, self.dims, self.seed = k, dims, seed

    def create(self):
        return (np.zeros(0, np.uint64), np.zeros((0, self.dims), np.float64))

    def _trim(self, h, v):
        order = np.lexsort((v[:, 0] if v.shape[1] else h, h)) if len(h) else np.zeros(0, np.int64)
        h, v = h[order], v[order]
        if len(h) > self.k:
            h, v = h[: self.k], v[: self.k]
        return h, v

    def add(self, acc, keys: np.ndarray, values: np.ndarray):
        values = np.asarray(values, dtype=np.float64).reshape(len(keys), self.dims)
        h = hash64(keys, self.seed)
        return self._trim(np.concatenate([acc[0], h]), np.vstack([acc[1], values]))

    def merge(self, accs: Iterable):
        accs = list(accs)
        if not accs:
            return self.create()
        return self._trim(np.concatenate([a[0] for a in accs]), np.vstack([a[1] for a in accs]))

    def result(self, acc) -> np.ndarray:
        return acc[1]

