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
   (:func:`spike_audit.pipelines.run.outputs.control_false_alarms` judges each control against the others).
7. **Verdict.** ``inconclusive`` when there are fewer than ``min_controls`` controls, no window step
   has data, or the smallest attainable ``p`` exceeds ``alpha`` (more controls are needed);
   ``data`` when ``p <= alpha``, ``|effect| >= min_effect`` and ``margin >= min_margin``;
   otherwise ``not_data``.

Per-signal adjusted p-values (max-T adjusted: ``(1 + #{c : T_c >= |z_j|}) / (n + 1)``) are also
returned for the report.

The robust statistics are in :mod:`.robust`; the row-level baseline sample in :mod:`.sampling`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence
import numpy as np

from spike_audit.auditors.scales import to_scoring_scale
from spike_audit.auditors.robust import loo_z, robust_center_scale


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
