"""Loss (and grad-norm) spike detection on a logged series, and cross-run alignment of spikes.

Pure numpy over ``(steps, values)`` arrays; windows count *logged values*, not step numbers, so a log
written every 10th step, or with gaps, is handled the same as a dense one.

Detectors (``DetectorConfig.method``)
-------------------------------------
``robust`` (default)
    For each value ``v_i`` let the *baseline window* be the last ``window`` (64) finite values before
    ``i`` that were not themselves flagged, and its *recent* part its last quarter (16 values; at least
    3; the whole window when it holds fewer than 8). With ``med`` the smaller of the window's and the
    recent part's medians and ``sigma = max(1.4826 * MAD, sigma_floor * |med|)``, MAD that of the window's
    residuals from its robust line (slope from the medians of its two halves; ``sigma_floor`` = 1e-3, so a
    perfectly flat curve has no zero-sigma blow-up), ``v_i`` is flagged iff

        v_i > med + k * sigma     (k = 6)   AND   v_i > med + min_rel_rise * |med|   (min_rel_rise = 0.05)

    and the window holds at least ``m`` values, ``m = min(min_window, max(3, n // 4))`` with
    ``min_window`` = 16 and ``n`` the number of finite values: a normal log needs 16 values of history;
    a short log (an excerpt of a few dozen lines) may use a quarter of its own length, but never fewer
    than 3 values (the smallest window whose median ignores one outlier).
    Flagged values never enter later baselines, so a spike (or a run of spikes) is measured against
    the level before it, and a loss that jumps and stays up keeps being flagged (a divergence). The
    recent quarter and the residual MAD are what keep early training honest: on a falling curve the
    window's median lags the trend by half a window and its plain MAD is inflated by the trend itself, so
    a spike back up to the level of 30 steps earlier (a jump of 25% early in a run) would go unseen; on a
    flat curve both are the plain trailing median and MAD.

    Because of that exclusion the flags depend sequentially on earlier flags. The implementation is
    exact and still vectorised: it evaluates a block of future positions at once assuming no new flag
    in the block (sliding-window medians via ``sliding_window_view``), accepts everything up to the
    first flag, and then follows the flagged run in one vectorised step (during a run the baseline
    is frozen, so the run ends at the first finite value back under that fixed threshold). The work
    is O(n * window) plus O(window^2) per event.
``olmo``
    OLMo-core's ``StabilityMonitorCallback`` rule: flag ``v_i > mean + 6 * std`` of the previous 128
    values (population std; no flag until 128 values exist or when std < 1e-10). Previous spikes stay
    in the window, as in OLMo-core. Non-finite values are left out of the window.
``metaseq``
    metaseq's trainer rule (``Trainer.skip_spike``): an exponentially weighted mean (span 9, i.e.
    alpha = 0.2) of previous losses, started at the first loss and *not updated* on flagged steps; flag
    when ``v_i / ewm > metaseq_ratio``. metaseq's own default for ``ewm_ratio_to_skip_batch`` is set
    per experiment; we use 1.2, i.e. a 20% jump over the smoothed loss (well beyond step-to-step noise
    of LM losses, ~1-3%). A sequential O(n) loop (the EWM is a recurrence that skips flagged values).

Events
------
Flagged positions separated by at most ``merge_gap`` (2) unflagged logged values form one event:
``start_step``/``end_step`` (first/last flagged), ``peak_step`` (largest value), ``baseline_value``
(the robust level of the ``window`` finite unflagged values before the start: the smaller of their
median and their recent quarter's median), ``severity`` =
``(peak - baseline) / sigma`` with the same MAD-sigma (for every detector, so severities compare),
``recovery_steps`` = steps from the peak to the first later finite value that is not flagged (null if
none). Kind ``divergence`` when it never recovers and the log continues for at least
``divergence_min_steps`` (50) *trainer steps* after the event start; else ``spike``. NaN/inf values
form ``nan`` events (consecutive ones merged the same way; severity inf; they never enter baselines).

Alignment
---------
``align`` pools the peaks of several runs (one metric), sorts them, and starts a new group wherever two
consecutive peaks are more than ``tolerance`` steps apart (single linkage). Groups with at least
``min_runs`` distinct runs become ``ALIGNED_SPIKES`` rows; the representative step is the most common
peak step of the group (smallest on ties) and each run contributes its peak closest to it.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
from numpy.lib.stride_tricks import sliding_window_view

from spike_audit.schemas import ALIGNED_SPIKES, SPIKES

METHODS = ("robust", "olmo", "metaseq")
_MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class DetectorConfig:
    method: str = "robust"
    window: int = 64
    min_window: int = 16
    k: float = 6.0
    min_rel_rise: float = 0.05
    merge_gap: int = 2
    divergence_min_steps: int = 50
    sigma_floor: float = 1e-3
    olmo_window: int = 128
    olmo_k: float = 6.0
    metaseq_ratio: float = 1.2
    metaseq_span: int = 9

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown spike detector {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.window < 1 or self.min_window < 1 or self.olmo_window < 2:
            raise ValueError("window sizes must be positive")
        if self.merge_gap < 0:
            raise ValueError("merge_gap must be >= 0")
        for name in ("k", "olmo_k", "min_rel_rise", "metaseq_ratio"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v!r}")

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# robust detector


def _median_rows(a: np.ndarray) -> np.ndarray:
    """Row medians (same values as ``np.median(a, axis=1)``, less per-call overhead)."""
    h = a.shape[1] // 2
    if a.shape[1] % 2:
        return np.partition(a, h, axis=1)[:, h]
    p = np.partition(a, (h - 1, h), axis=1)
    return (p[:, h - 1] + p[:, h]) / 2


def recent_len(w: int) -> int:
    """Values in the *recent* part of a baseline window of ``w`` values (its last quarter, at least 3)."""
    return max(3, w // 4) if w >= 8 else w


def _med_sigma(windows: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """Level and sigma of baseline windows (rows). Level: the smaller of the window's median and its recent
    quarter's median. Sigma: 1.4826 * MAD of the window's residuals from its robust line (through the
    window's median, slope from the medians of its two halves), floored at ``floor * |level|``: a trend
    does not inflate it, and on a flat curve it is the window's own MAD."""
    w = windows.shape[1]
    med = _median_rows(windows)
    q = recent_len(w)
    level = med
    if q < w:
        level = np.minimum(med, _median_rows(windows[:, -q:]))
    if w >= 4:
        h = w // 2
        slope = (_median_rows(windows[:, w - h:]) - _median_rows(windows[:, :h])) / (w - h)
        resid = windows - slope[:, None] * (np.arange(w) - (w - 1) / 2.0)[None, :]
    else:
        resid = windows
    rmed = _median_rows(resid)
    mad = _median_rows(np.abs(resid - rmed[:, None]))
    sigma = np.maximum(_MAD_TO_SIGMA * mad, floor * np.abs(level))
    return level, np.maximum(sigma, np.finfo(np.float64).tiny)


def _min_history(cfg: DetectorConfig, n_finite: int) -> int:
    return max(1, min(cfg.min_window, cfg.window, max(3, n_finite // 4)))


def _threshold(med, sigma, cfg):
    return np.maximum(med + cfg.k * sigma, med + cfg.min_rel_rise * np.abs(med))


def _robust_flags(values: np.ndarray, cfg: DetectorConfig) -> np.ndarray:
    n = len(values)
    finite = np.isfinite(values)
    flag = np.zeros(n, bool)
    w, m = cfg.window, _min_history(cfg, int(finite.sum()))
    small, large = 32, 1 << 14
    block = small
    j = 0
    while j < n:
        # the last w baseline values before j (finite, unflagged): look back far enough
        back = 2 * w
        while True:
            lo = max(0, j - back)
            ok = finite[lo:j] & ~flag[lo:j]
            if lo == 0 or np.count_nonzero(ok) >= w:
                break
            back *= 4
        hist = values[lo:j][ok][-w:]
        hi = min(n, j + block)
        seg = values[j:hi]
        seg_fin = finite[j:hi]
        cc = np.concatenate([hist, seg[seg_fin]])
        # number of baseline values before each position of the block (assuming no new flag in it)
        pos = len(hist) + np.cumsum(seg_fin) - seg_fin
        evaluated = seg_fin & (pos >= m)
        med = np.full(hi - j, np.nan)
        sig = np.full(hi - j, np.nan)
        full = evaluated & (pos >= w)
        if full.any():
            views = sliding_window_view(cc, w)  # views[p - w] = cc[p - w:p]
            fidx = np.flatnonzero(full)
            win = views[pos[fidx] - w]
            if cfg.min_rel_rise > 0:
                # Cheap exact pruning before the medians: with a positive window, a flag needs
                # v > med * (1 + r), i.e. med < t = v / (1 + r), which needs at least half of the
                # window below t (the lower middle order statistic is <= med). Skip the others.
                t = seg[fidx] / (1 + cfg.min_rel_rise) * (1 + 1e-9)
                below = np.count_nonzero(win < t[:, None], axis=1)
                q = recent_len(w)
                below_q = np.count_nonzero(win[:, -q:] < t[:, None], axis=1)
                keep = ~((win.min(axis=1) > 0) & (2 * below < w) & (2 * below_q < q))
                fidx, win = fidx[keep], win[keep]
            if len(fidx):
                med[fidx], sig[fidx] = _med_sigma(win, cfg.sigma_floor)
        for i in np.flatnonzero(evaluated & ~full):  # partial windows at the start of the series only
            mm, ss = _med_sigma(cc[: pos[i]][None, :], cfg.sigma_floor)
            med[i], sig[i] = mm[0], ss[0]
        with np.errstate(invalid="ignore"):
            hits = np.flatnonzero(evaluated & (seg > _threshold(med, sig, cfg)))
        if not len(hits):
            j = hi
            block = min(block * 4, large)
            continue
        first = j + int(hits[0])
        thr = _threshold(med[hits[0]], sig[hits[0]], cfg)
        # follow the flagged run: the baseline is frozen while values stay above thr
        end = first + 1
        while end < n:
            chunk = values[end:end + 4 * w]
            with np.errstate(invalid="ignore"):
                back_in = np.flatnonzero(np.isfinite(chunk) & (chunk <= thr))
            if len(back_in):
                end += int(back_in[0])
                break
            end += len(chunk)
        flag[first:end] = finite[first:end]
        j = end + 1  # the value at `end` is back within the threshold: unflagged, and in the baseline
        block = small
    return flag


# ----------------------------------------------------------------------------------------------
# OLMo-core and metaseq rules


def _olmo_flags(values: np.ndarray, cfg: DetectorConfig) -> np.ndarray:
    n = len(values)
    finite = np.isfinite(values)
    idx = np.flatnonzero(finite)
    c = values[idx]
    flag = np.zeros(n, bool)
    w = cfg.olmo_window
    if len(c) <= w:
        return flag
    views = sliding_window_view(c[:-1], w)  # views[q] = c[q:q+w], the window before c[q+w]
    mean = views.mean(axis=1)
    std = views.std(axis=1)
    v = c[w:]
    hit = (std >= 1e-10) & (v > mean + cfg.olmo_k * std)
    flag[idx[w:][hit]] = True
    return flag


def _metaseq_flags(values: np.ndarray, cfg: DetectorConfig) -> np.ndarray:
    # Sequential by nature: the EWM skips flagged values, so each step depends on all earlier flags.
    alpha = 2.0 / (cfg.metaseq_span + 1)
    ratio = cfg.metaseq_ratio
    flag = np.zeros(len(values), bool)
    ewm = None
    for i, v in enumerate(values.tolist()):
        if not math.isfinite(v):
            continue
        if ewm is None:
            ewm = v
            continue
        if ewm > 0 and v / ewm > ratio:
            flag[i] = True
        else:
            ewm = (1 - alpha) * ewm + alpha * v
    return flag


# ----------------------------------------------------------------------------------------------
# events


def _baseline_before(values, usable, i, window, floor) -> tuple[float, float]:
    idx = np.flatnonzero(usable[:i])[-window:]
    if not len(idx):
        return float("nan"), float("nan")
    med, sig = _med_sigma(values[idx][None, :], floor)
    return float(med[0]), float(sig[0])


def _groups(idx: np.ndarray, gap: int) -> list[np.ndarray]:
    if not len(idx):
        return []
    cuts = np.flatnonzero(np.diff(idx) > gap + 1) + 1
    return np.split(idx, cuts)


def spike_mask(values: np.ndarray, config: DetectorConfig = DetectorConfig()) -> np.ndarray:
    """Per-value flags of the configured rule (finite values only; NaN/inf are handled as events)."""
    values = np.asarray(values, dtype=np.float64)
    flags = {"robust": _robust_flags, "olmo": _olmo_flags, "metaseq": _metaseq_flags}[config.method](values, config)
    return flags & np.isfinite(values)


def detect(steps: np.ndarray, values: np.ndarray, config: DetectorConfig = DetectorConfig()) -> list[dict]:
    """Spike events of one series, as ``SPIKES`` rows without ``run``/``metric``/``spike_id``.

    ``steps`` need not be contiguous; they are sorted (with ``values``) if they are not.
    """
    steps = np.asarray(steps, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    if steps.shape != values.shape or steps.ndim != 1:
        raise ValueError("steps and values must be 1-D arrays of the same length")
    if len(steps) > 1 and np.any(np.diff(steps) < 0):
        order = np.argsort(steps, kind="stable")
        steps, values = steps[order], values[order]
    n = len(values)
    if n == 0:
        return []
    finite = np.isfinite(values)
    flags = spike_mask(values, config)
    usable = finite & ~flags
    window = config.window
    rows = []

    def recovery(after: int):
        nxt = np.flatnonzero(usable[after + 1:])
        return (after + 1 + int(nxt[0])) if len(nxt) else None

    for grp in _groups(np.flatnonzero(flags), config.merge_gap):
        start, end = int(grp[0]), int(grp[-1])
        peak = int(grp[np.argmax(values[grp])])
        base, sig = _baseline_before(values, usable, start, window, config.sigma_floor)
        rec = recovery(peak)
        kind = "spike"
        if rec is None and int(steps[-1] - steps[start]) >= config.divergence_min_steps:
            kind = "divergence"
        rows.append(dict(kind=kind, detector=config.method, start_step=int(steps[start]),
                         peak_step=int(steps[peak]), end_step=int(steps[end]), peak_value=float(values[peak]),
                         baseline_value=base, severity=(float(values[peak]) - base) / sig if sig == sig else None,
                         recovery_steps=None if rec is None else int(steps[rec] - steps[peak])))
    for grp in _groups(np.flatnonzero(~finite), config.merge_gap):
        start, end = int(grp[0]), int(grp[-1])
        base, _sig = _baseline_before(values, usable, start, window, config.sigma_floor)
        rec = recovery(start)
        rows.append(dict(kind="nan", detector=config.method, start_step=int(steps[start]),
                         peak_step=int(steps[start]), end_step=int(steps[end]), peak_value=float(values[start]),
                         baseline_value=base, severity=float("inf"),
                         recovery_steps=None if rec is None else int(steps[rec] - steps[start])))
    rows.sort(key=lambda r: (r["peak_step"], r["kind"]))
    return rows


def detect_table(loss: pa.Table, config: DetectorConfig = DetectorConfig(),
                 metrics=("train_loss", "grad_norm")) -> pa.Table:
    """``SPIKES`` for every run of a ``LOSS_SERIES`` table, on each of ``metrics`` it holds."""
    rows = []
    if loss.num_rows:
        t = loss.select(["run", "metric", "step", "value"]).sort_by(
            [("run", "ascending"), ("metric", "ascending"), ("step", "ascending")])
        run = np.asarray(t.column("run").to_pylist(), dtype=object)
        metric = np.asarray(t.column("metric").to_pylist(), dtype=object)
        step = t.column("step").to_numpy()
        value = t.column("value").to_numpy()
        change = np.flatnonzero((run[1:] != run[:-1]) | (metric[1:] != metric[:-1])) + 1
        bounds = np.concatenate([[0], change, [len(run)]])
        for a, b in zip(bounds[:-1], bounds[1:]):
            r, m = run[a], metric[a]
            if metrics is not None and m not in metrics:
                continue
            for ev in detect(step[a:b], value[a:b], config):
                ev.update(run=r, metric=m, spike_id=f"{r}/{m}/{ev['peak_step']}")
                rows.append(ev)
    return SPIKES.from_pylist(rows)


def align(spikes: pa.Table, tolerance: int = 0, min_runs: int = 2, metric="train_loss") -> pa.Table:
    """Steps where at least ``min_runs`` runs have a spike peak within ``tolerance`` steps."""
    if tolerance < 0 or min_runs < 1:
        raise ValueError("tolerance must be >= 0 and min_runs >= 1")
    if not spikes.num_rows:
        return ALIGNED_SPIKES.empty()
    runs = spikes.column("run").to_pylist()
    mets = spikes.column("metric").to_pylist()
    peaks = spikes.column("peak_step").to_pylist()
    pts = sorted((p, r) for r, m, p in zip(runs, mets, peaks) if metric is None or m == metric)
    if not pts:
        return ALIGNED_SPIKES.empty()
    p_arr = np.array([p for p, _ in pts], np.int64)
    cuts = np.flatnonzero(np.diff(p_arr) > tolerance) + 1
    rows = []
    for grp in np.split(np.arange(len(pts)), cuts):
        members = [pts[i] for i in grp]
        distinct = sorted({r for _, r in members})
        if len(distinct) < min_runs:
            continue
        counts = Counter(p for p, _ in members)
        rep = min(counts, key=lambda s: (-counts[s], s))
        own = {r: min((p for p, rr in members if rr == r), key=lambda p: (abs(p - rep), p)) for r in distinct}
        rows.append(dict(step=rep, n_runs=len(distinct), runs=distinct, peak_steps=[own[r] for r in distinct]))
    return ALIGNED_SPIKES.from_pylist(rows)
