"""Loss attribution: which rows of a spike's batch carry its excess loss, from per-row losses.

The data verdict (:mod:`auditors.verdict`) predicts "these rows caused the spike". Per-row losses
(logged by the trainer, or recomputed by replaying the batches through a checkpoint) test that
prediction with the model itself. For one spike, with per-row losses ``L_i`` of every window step
(one value per sequence of the global batch: the mean token loss of that sequence) and of a set of
baseline steps (the steps just before the window, or the control steps):

* **Baseline.** ``b = median over baseline steps of the step's mean row loss`` (the batch loss the
  step would have logged) and ``b_mid = median over baseline steps of the step's interquartile mean
  row loss`` (the typical row). Both are robust to one odd baseline step.
* **Excess** of a window step: ``E = mean_i L_i - b`` (the rise of its batch loss), and ``excess_z
  = E / sigma`` with ``sigma`` the robust sigma of the baseline steps' mean losses. A window step
  *rose* when ``excess_z >= rise_z``. The model's verdict is judged at the first window step that
  rose (a later rise is the reaction to an earlier cause); when none rose, at the step with the
  largest ``excess_z``.
* **Flagged share**: ``S = sum_{i in F} (L_i - b) / sum_i (L_i - b)``, the part of the batch's
  excess the signal-flagged rows ``F`` carry (it can exceed 1 when the other rows sit below the
  baseline). ``S`` of ``F`` and of its complement add up to 1.
* **Breadth**: ``(midmean_i L_i - b_mid) / E``, how much of the excess is a rise of the typical row
  (the interquartile mean, unmoved while fewer than a quarter of the rows rise). About 1 when the
  loss rose on all rows alike (a multiplicative rise gives ``midmean / mean``, still near 1); about 0
  when a few rows carry it.
* **Loss outliers**: rows whose loss lies more than ``outlier_z`` robust sigmas above ``b_mid``,
  sigma being the robust sigma of the baseline steps' rows around their own step's interquartile
  mean (so a slow drift between baseline steps does not widen it). ``outlier_share`` is the excess
  they carry (with an interval like ``S``'s); **precision** = flagged rows that are outliers / flagged rows, **recall** = flagged outliers /
  outliers.
* **Intervals**: a percentile bootstrap (``n_boot`` replicates, seeded by ``(seed, step)``, so the
  result is deterministic): window rows are resampled with replacement (flagged and unflagged rows
  separately for ``S``, outliers and the rest for ``outlier_share``, so the group sizes stay fixed) and baseline steps are resampled
  as whole steps for ``b`` and ``b_mid``. Rows are put in a canonical order (flag, loss) first, so
  the result does not depend on the order the rows came in.
* **Model verdict.** ``inconclusive`` without losses at the window or with fewer than
  ``min_baseline_steps`` baseline steps. ``not_data`` when no window step rose (the model finds
  these batches normal: replayed from a checkpoint before the spike, a data-caused spike shows up
  again; one caused by the optimizer or the model's state does not). At the step that rose:
  ``data`` when a few rows carry the excess: the loss outliers are at most ``split`` of the rows,
  carry at least ``split`` of the excess (the lower end of its interval) and the breadth is below
  ``split``, or the whole breadth interval lies below ``split``; or when the flagged rows carry it
  (the lower end of ``S`` >= ``split`` and above their share of the rows);
  ``not_data`` when the breadth interval lies above ``split`` (the loss rose on all rows alike:
  look at the optimizer or the model's state); ``inconclusive`` otherwise.

NaN losses are left out (counted in ``n_nan``). Everything is vectorised numpy; nothing here knows
about manifests, shards or Beam.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from spike_audit.auditors.robust import robust_center_scale

VERDICTS = ("data", "not_data", "inconclusive")


@dataclass(frozen=True)
class AttributionConfig:
    n_boot: int = 1000
    seed: int = 0
    level: float = 0.95
    rise_z: float = 3.0
    outlier_z: float = 3.0
    split: float = 0.5
    min_baseline_steps: int = 3
    boot_block: int = 250  # replicates computed at once: bounds memory at boot_block x rows


@dataclass
class StepAttribution:
    """Attribution statistics of one window step (see the module docstring)."""

    step: int
    n_rows: int
    n_nan: int
    n_flagged: int
    mean_loss: float
    excess: float
    excess_z: float
    flagged_share: float
    flagged_share_ci: tuple[float, float]
    breadth: float
    breadth_ci: tuple[float, float]
    outlier_share: float
    outlier_share_ci: tuple[float, float]
    n_outliers: int
    precision: float
    recall: float
    outliers: np.ndarray = field(repr=False)  # indices (into the step's rows) of loss outliers, by loss desc
    z: np.ndarray = field(repr=False)  # every row's loss in robust sigmas above b_mid (NaN for NaN losses)


@dataclass
class Attribution:
    verdict: str
    reason: str
    step: int | None
    baseline: float
    baseline_typical: float  # b_mid: the typical baseline row (median of the steps' interquartile means)
    baseline_sigma: float
    n_baseline_steps: int
    steps: list[StepAttribution]

    @property
    def chosen(self) -> StepAttribution | None:
        return next((s for s in self.steps if s.step == self.step), None)


def _nan() -> float:
    return float("nan")


def _ratio(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b != 0, a / np.where(b != 0, b, 1.0), np.nan)


def _ci(samples: np.ndarray, level: float) -> tuple[float, float]:
    s = samples[np.isfinite(samples)]
    if len(s) < max(10, len(samples) // 2):  # most replicates undefined: no interval
        return _nan(), _nan()
    q = (1.0 - level) / 2.0
    lo, hi = np.quantile(s, [q, 1.0 - q])
    return float(lo), float(hi)


def midmean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Interquartile mean along ``axis``: the mean of the sorted values ``[n // 4, n - n // 4)``
    (the whole array when ``n < 4``). Unmoved by up to a quarter of the values rising."""
    x = np.sort(np.asarray(x, dtype=np.float64), axis=axis)
    n = x.shape[axis]
    q = n // 4
    mid = np.take(x, np.arange(q, n - q), axis=axis)
    if n == 0:
        return mid.mean(axis=axis)
    # a float sum can round a hair outside the values it averages: keep the mean between them
    return np.clip(mid.mean(axis=axis), np.take(mid, 0, axis=axis), np.take(mid, -1, axis=axis))


def baseline_stats(baseline_losses: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, float]:
    """Per baseline step: mean and interquartile mean of the row losses (NaN ignored; steps without
    a finite loss dropped), and the robust sigma of rows around their own step's interquartile mean."""
    means, meds, resid = [], [], []
    for arr in baseline_losses:
        a = np.asarray(arr, dtype=np.float64)
        a = a[np.isfinite(a)]
        if not len(a):
            continue
        means.append(float(a.mean()))
        meds.append(float(midmean(a)))
        resid.append(a - midmean(a))
    if not means:
        return np.zeros(0), np.zeros(0), _nan()
    _, sigma = robust_center_scale(np.concatenate(resid))
    return np.asarray(means), np.asarray(meds), float(sigma)


def step_attribution(step: int, losses: np.ndarray, flagged: np.ndarray, base_means: np.ndarray,
                     base_meds: np.ndarray, row_sigma: float, config: AttributionConfig = AttributionConfig()
                     ) -> StepAttribution:
    """Attribution statistics of one window step against baseline step statistics (see
    :func:`baseline_stats`). ``losses`` and ``flagged`` have one entry per row of the batch."""
    losses = np.asarray(losses, dtype=np.float64)
    flagged = np.asarray(flagged, dtype=bool)
    if losses.shape != flagged.shape:
        raise ValueError(f"losses {losses.shape} and flags {flagged.shape} differ in shape")
    ok = np.isfinite(losses)
    n_nan = int(np.count_nonzero(~ok))
    z_all = np.full(len(losses), np.nan)
    L, F = losses[ok], flagged[ok]
    idx_ok = np.flatnonzero(ok)
    # canonical order: flag, then loss (then the original index): the result ignores the row order
    order = np.lexsort((idx_ok, L, F))
    L, F, idx_ok = L[order], F[order], idx_ok[order]
    n, k = len(L), int(np.count_nonzero(F))
    b = float(np.median(base_means)) if len(base_means) else _nan()
    b_mid = float(np.median(base_meds)) if len(base_meds) else _nan()
    _, sig_means = robust_center_scale(base_means) if len(base_means) else (None, np.nan)
    sig_means = float(sig_means)
    if n == 0 or not np.isfinite(b):
        return StepAttribution(step, len(losses), n_nan, k, _nan(), _nan(), _nan(), _nan(), (_nan(), _nan()), _nan(),
                               (_nan(), _nan()), _nan(), (_nan(), _nan()), 0, _nan(), _nan(), np.zeros(0, np.int64),
                               z_all)
    mean = float(L.mean())
    E = mean - b
    e = L - b
    total = float(e.sum())
    share = float(_ratio(e[F].sum(), total)) if k else 0.0
    breadth = float(_ratio(midmean(L) - b_mid, E))
    z = (L - b_mid) / row_sigma if np.isfinite(row_sigma) and row_sigma > 0 else np.full(n, np.nan)
    z_all[idx_ok] = z
    out = z > config.outlier_z
    n_out = int(np.count_nonzero(out))
    outlier_share = float(_ratio(e[out].sum(), total)) if n_out else 0.0
    both = int(np.count_nonzero(out & F))
    precision = both / k if k else _nan()
    recall = both / n_out if n_out else _nan()
    out_idx = idx_ok[out][np.lexsort((idx_ok[out], -L[out]))]

    # bootstrap, in blocks of replicates (memory: block x rows)
    rng = np.random.default_rng([int(config.seed) & 0xFFFFFFFF, int(step) & 0xFFFFFFFF, 0x5A17])
    nb = len(base_means)
    share_s, breadth_s, out_s = [], [], []
    Lf, Lu = L[F], L[~F]
    Lo, Lr = L[out], L[~out]

    def stratified(a, rest, B, b_s):  # share of the excess carried by stratum a, its size held fixed
        ka, kr = len(a), len(rest)
        sa = a[rng.integers(0, ka, size=(B, ka))].sum(axis=1) - ka * b_s
        sr = (rest[rng.integers(0, kr, size=(B, kr))].sum(axis=1) if kr else 0.0) - kr * b_s
        return _ratio(sa, sa + sr)

    for start in range(0, config.n_boot, config.boot_block):
        B = min(config.boot_block, config.n_boot - start)
        bi = rng.integers(0, nb, size=(B, nb))
        b_s = np.median(base_means[bi], axis=1)
        bmid_s = np.median(base_meds[bi], axis=1)
        ri = rng.integers(0, n, size=(B, n))
        Ls = L[ri]
        breadth_s.append(_ratio(midmean(Ls, axis=1) - bmid_s, Ls.mean(axis=1) - b_s))
        if k:
            share_s.append(stratified(Lf, Lu, B, b_s))
        if n_out:
            out_s.append(stratified(Lo, Lr, B, b_s))
    share_ci = _ci(np.concatenate(share_s), config.level) if k else (0.0, 0.0)
    out_ci = _ci(np.concatenate(out_s), config.level) if n_out else (0.0, 0.0)
    breadth_ci = _ci(np.concatenate(breadth_s), config.level)
    return StepAttribution(step, len(losses), n_nan, k, mean, E, float(E / sig_means) if sig_means > 0 else _nan(),
                           share, share_ci, breadth, breadth_ci, outlier_share, out_ci, n_out, precision, recall,
                           out_idx, z_all)


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%" if np.isfinite(x) else "n/a"


def _interval(ci: tuple[float, float]) -> str:
    return f"[{_pct(ci[0])}, {_pct(ci[1])}]"


def attribute(window_steps: Sequence[int], window_losses: Sequence[np.ndarray], window_flags: Sequence[np.ndarray],
              baseline_losses: Sequence[np.ndarray], config: AttributionConfig = AttributionConfig(),
              baseline_name: str = "baseline steps") -> Attribution:
    """The model-based verdict of one spike from per-row losses (see the module docstring).

    ``window_losses[t]`` / ``window_flags[t]``: per-row losses and signal flags of window step
    ``window_steps[t]`` (steps without losses may be left out); ``baseline_losses``: per-row losses of
    each baseline step."""
    means, meds, row_sigma = baseline_stats(baseline_losses)
    nb = len(means)
    b = float(np.median(means)) if nb else _nan()
    bm = float(np.median(meds)) if nb else _nan()
    if nb < config.min_baseline_steps:
        return Attribution("inconclusive", f"only {nb} {baseline_name} had per-row losses (need "
                           f"{config.min_baseline_steps})", None, b, bm, row_sigma, nb, [])
    order = np.argsort(np.asarray(window_steps, dtype=np.int64), kind="stable")
    steps = [step_attribution(int(window_steps[t]), window_losses[t], window_flags[t], means, meds, row_sigma,
                              config) for t in order]
    steps = [s for s in steps if s.n_rows - s.n_nan > 0]
    if not steps:
        return Attribution("inconclusive", "no window step had per-row losses", None, b, bm, row_sigma, nb, [])
    rose = [s for s in steps if np.isfinite(s.excess_z) and s.excess_z >= config.rise_z]
    base_txt = f"{nb} {baseline_name} (batch loss {b:.4g})"
    if not rose:
        top = max(steps, key=lambda s: (s.excess_z if np.isfinite(s.excess_z) else -np.inf, -s.step))
        return Attribution("not_data", f"no window step's per-row losses rose above {base_txt}: largest excess "
                           f"{top.excess:+.3g} at step {top.step} ({top.excess_z:+.2f} sigma < {config.rise_z:g}); "
                           f"the model finds these batches normal", top.step, b, bm, row_sigma, nb, steps)
    s = rose[0]
    n_ok = max(1, s.n_rows - s.n_nan)
    frac_flagged = s.n_flagged / n_ok
    lo_b, hi_b = s.breadth_ci
    lo_s = s.flagged_share_ci[0]
    lo_o = s.outlier_share_ci[0]
    pr = (f"; flagged rows vs loss outliers: precision {_pct(s.precision)}, recall {_pct(s.recall)} "
          f"({s.n_outliers} outliers)")
    head = (f"step {s.step}: batch loss {s.mean_loss:.4g}, {s.excess:+.3g} over {base_txt}, {s.excess_z:+.1f} sigma")
    breadth_txt = f"breadth {s.breadth:.2f} [{lo_b:.2f}, {hi_b:.2f}]"
    flag_txt = (f"the {s.n_flagged} flagged rows ({_pct(frac_flagged)} of the batch) carry {_pct(s.flagged_share)} "
                f"{_interval(s.flagged_share_ci)} of it" if s.n_flagged else "no row at this step is flagged by the "
                "signals")
    out_txt = (f"{s.n_outliers} loss outliers ({_pct(s.n_outliers / n_ok)} of the batch) carry "
               f"{_pct(s.outlier_share)} {_interval(s.outlier_share_ci)} of it")
    few_outliers = (0 < s.n_outliers <= config.split * n_ok and np.isfinite(lo_o) and lo_o >= config.split
                    and np.isfinite(s.breadth) and s.breadth < config.split)
    narrow = np.isfinite(hi_b) and hi_b < config.split
    on_flags = bool(s.n_flagged) and np.isfinite(lo_s) and lo_s >= config.split and lo_s > frac_flagged
    if few_outliers or narrow or on_flags:
        verdict = "data"
        if few_outliers or narrow:
            why = f"a few rows carry the excess: {out_txt} ({breadth_txt})"
            if s.n_flagged and on_flags:
                why += f"; {flag_txt}"
            elif s.n_flagged:
                why += f"; {flag_txt}: the excess sits mostly on rows the signals did not flag"
            else:
                why += "; none of them is flagged by the signals"
        else:
            why = f"{flag_txt}, more than their part of the rows ({breadth_txt})"
    elif np.isfinite(lo_b) and lo_b > config.split:
        verdict = "not_data"
        why = f"the loss rose on all rows alike ({breadth_txt}); {flag_txt}: look at the optimizer or the model's state"
    else:
        verdict = "inconclusive"
        why = f"{breadth_txt} does not separate a few rows from all rows; {out_txt}; {flag_txt}"
    return Attribution(verdict, f"{head}; {why}{pr}", s.step, b, bm, row_sigma, nb, steps)
