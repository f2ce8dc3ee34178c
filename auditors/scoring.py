"""Robust z-scores against a baseline, a combined anomaly score, and per-row attribution.

For a signal with baseline values ``x_1..x_m`` (NaNs ignored):

* ``median = median(x)``, ``MAD = median(|x - median|)``.
* ``sigma = 1.4826 * MAD`` (consistent with the standard deviation for normal data). When MAD is 0
  (more than half the baseline values are equal) the mean absolute deviation is used instead:
  ``sigma = 1.2533 * mean(|x - median|)`` (also consistent for normal data).
* Floor: ``sigma = max(sigma, abs_floor, rel_floor * |median|)`` with ``abs_floor = 1e-6`` and
  ``rel_floor = 0.01``, so a constant baseline (e.g. no duplicates at all) does not divide by zero;
  a departure of 1% of the median (or 1e-6 absolute) from such a baseline scores |z| = 1.
* ``z = (value - median) / sigma``. NaN when the value or the baseline is NaN/empty.

Combined anomaly score: ``max |z|`` over the signals with a finite z (NaN if none); optionally the
mean of the ``top_k`` largest ``|z|`` (:func:`top_k_mean`).

Attribution (:func:`attribute`): per row, ``score = max |z|`` over the row signals with a baseline,
where each row value is scored against the baseline of that signal's per-row values; rows are
ranked by score (ties by row index) and each is reported with the signals whose ``|z| >= z_flag``
(default 3), largest first.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

MAD_SCALE = 1.4826
MEANAD_SCALE = 1.2533
ABS_FLOOR = 1e-6
REL_FLOOR = 0.01


def robust_stats(values, abs_floor: float = ABS_FLOOR, rel_floor: float = REL_FLOOR) -> tuple[float, float]:
    """(median, floored robust sigma) of ``values`` (NaN ignored); (nan, nan) when empty."""
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if not len(x):
        return float("nan"), float("nan")
    med = float(np.median(x))
    dev = np.abs(x - med)
    sigma = MAD_SCALE * float(np.median(dev))
    if sigma == 0.0:
        sigma = MEANAD_SCALE * float(dev.mean())
    return med, max(sigma, abs_floor, rel_floor * abs(med))


def robust_z(value, median: float, sigma: float):
    """``(value - median) / sigma`` (scalar or array)."""
    with np.errstate(invalid="ignore"):
        return (np.asarray(value, dtype=np.float64) - median) / sigma


def baseline_stats(baseline: Mapping[str, object], **floors) -> dict[str, tuple[float, float]]:
    """``{signal: (median, sigma)}`` from ``{signal: baseline values}``."""
    return {k: robust_stats(v, **floors) for k, v in baseline.items()}


def _as_stats(baseline: Mapping[str, object]) -> dict[str, tuple[float, float]]:
    out = {}
    for k, v in baseline.items():
        if isinstance(v, tuple) and len(v) == 2 and np.isscalar(v[0]):
            out[k] = (float(v[0]), float(v[1]))
        else:
            out[k] = robust_stats(v)
    return out


def zscores(signals: Mapping[str, float], baseline: Mapping[str, object]) -> dict[str, float]:
    """Robust z of every signal that has a baseline (values or ``(median, sigma)``)."""
    stats = _as_stats(baseline)
    return {k: float(robust_z(v, *stats[k])) for k, v in signals.items() if k in stats}


def anomaly_score(z: Mapping[str, float]) -> float:
    """``max |z|`` over finite z values (NaN if none)."""
    a = np.abs(np.array([v for v in z.values() if np.isfinite(v)], dtype=np.float64))
    return float(a.max()) if len(a) else float("nan")


def top_signal(z: Mapping[str, float]) -> str | None:
    """Signal with the largest finite ``|z|`` (ties: alphabetical), or None."""
    items = sorted((k for k, v in z.items() if np.isfinite(v)), key=lambda k: (-abs(z[k]), k))
    return items[0] if items else None


def top_k_mean(z: Mapping[str, float], k: int = 3) -> float:
    """Mean of the ``k`` largest finite ``|z|`` (NaN if none)."""
    a = np.sort(np.abs(np.array([v for v in z.values() if np.isfinite(v)], dtype=np.float64)))[::-1]
    return float(a[:k].mean()) if len(a) else float("nan")


def attribute(row_signals: Mapping[str, np.ndarray], baseline_row_stats: Mapping[str, object],
              top: int | None = 20, z_flag: float = 3.0) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
    """Rank the rows of a batch by how anomalous they are.

    ``row_signals``: ``{signal: per-row values}`` (from an auditor's ``row_signals``).
    ``baseline_row_stats``: ``{signal: baseline per-row values}`` or ``{signal: (median, sigma)}``.
    Returns ``(row_idx, score, signal_names)`` for the ``top`` highest-scoring rows (all rows with
    a finite score when ``top`` is None): ``score`` is the row's ``max |z|``, ``signal_names`` the
    signals with ``|z| >= z_flag`` for that row, largest first.
    """
    stats = _as_stats(baseline_row_stats)
    names = sorted(k for k in row_signals if k in stats)
    if not names:
        return np.zeros(0, np.int64), np.zeros(0), []
    n = len(np.asarray(row_signals[names[0]]))
    z = np.full((len(names), n), np.nan)
    for i, k in enumerate(names):
        z[i] = np.abs(robust_z(row_signals[k], *stats[k]))
    zf = np.where(np.isfinite(z), z, -np.inf)
    score = zf.max(axis=0) if n else np.zeros(0)
    ok = np.flatnonzero(np.isfinite(score))
    order = ok[np.lexsort((ok, -score[ok]))]
    if top is not None:
        order = order[:top]
    flagged = []
    for r in order:  # only the reported rows (at most ``top``)
        col = zf[:, r]
        sel = np.flatnonzero(col >= z_flag)
        sel = sel[np.lexsort((sel, -col[sel]))]
        flagged.append([names[i] for i in sel])
    return order.astype(np.int64), score[order], flagged
