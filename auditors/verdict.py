"""Per-spike verdict: is the data a spike consumed unusual compared with normal steps, and which rows carry it?

For one spike event with ``m`` window steps (``[start - lookback, end]``) and ``n`` control steps (normal
steps away from every spike), over the oriented row signal families of :mod:`.rows`:

1. **Row-level evidence** (:mod:`.evidence`). Every step's rows are binned per family. The *reference* is
   every row of every control step. Each step gets, per family, the scan evidence ``e_f``: the most
   significant cut of "``k`` of the step's ``N`` rows at least this extreme, where ``a`` of the ``R``
   reference rows are" as a binomial tail at the natural rate ``(a + 0.5) / (R + 1)``. A control step is
   judged **leave-one-out**: its own rows are taken out of the reference (thresholds and natural rates),
   so window and control steps are judged by the same rule. Only *row-selective* cuts count (a normal batch
   of the step's size expects at most :data:`MAX_EXPECTED_ROWS` rows at the cut): a batch shifted as a whole is
   not a batch of anomalous rows.
2. **Step statistic** ``T = max_f e_f`` (the maximum over families is the multiple-comparison correction,
   calibrated next).
3. **Calibration.** ``p_step = (1 + #{controls c : T_c >= T_step}) / (n + 1)``: under the null (the window
   step is exchangeable with the control steps) this is a valid p-value; exact up to the reference of a
   window holding the ``n`` controls where a control's holds the other ``n - 1``. Over the ``m`` window
   steps, Sidak: ``p = 1 - (1 - min p_step) ** m``.
4. **Verdict** ``data`` when ``p <= alpha`` and, at the most significant window step, some family is
   *anomalous*: its evidence alone makes the event significant (calibrated against the controls'
   statistics ``T_c``, Sidak over the window steps), at least ``min_rows`` (2) rows are at its cut, and
   more than at that cut in any control step (the anomaly is larger than the natural oddities of normal
   batches). ``inconclusive`` with fewer than ``min_controls``
   controls, no window data, or when ``n`` controls cannot reach ``alpha`` over ``m`` steps;
   ``not_data`` otherwise, naming the control steps that were as extreme and on which family.
5. **Reported**: the rows (``14 of 16 rows``) at the cut, the cut in the signal's units, the largest count
   of control rows at that cut in one control step, the natural rate, the evidence ``e`` (capped at
   ``max_evidence``), the effect size ``k / max(1, control max)`` (fold over the control maximum, at most
   the batch size and capped at ``max_fold``), and the margin ``T_window / max_c T_c`` (capped).

Row flags (:func:`step_flags`): at every window step, the rows at the cut of each anomalous family (the same
significance, counted per family and step: a family at a step flags rows only if it alone makes the event
significant, so flags in clean lookback steps are as rare as false verdicts). Once the event is ``data``,
its anomalous families are also tested at every other window step on their own (:func:`follow_up`: closed
testing, each family against its own control evidence with an exponential tail, Sidak over the steps and
families).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from spike_audit.auditors.evidence import (NBINS, Evidence, Family, candidates_from_rows, cut_value,
                                           group_counts_at, scan, tail_hist)


@dataclass(frozen=True)
class VerdictConfig:
    alpha: float = 0.05
    min_rows: int = 2
    min_controls: int = 20
    max_evidence: float = 300.0
    max_fold: float = 1000.0
    max_margin: float = 1000.0


class Reference:
    """The control steps' binned rows (the null), sorted by step whatever the order they came in."""

    def __init__(self, items: Iterable[tuple[int, np.ndarray]], n_families: int):
        items = sorted(((int(s), np.asarray(b)) for s, b in items), key=lambda t: t[0])
        steps = [s for s, _ in items]
        if len(set(steps)) != len(steps):
            raise ValueError("a control step occurs twice in the reference")
        self.n_families = n_families
        self.steps = np.asarray(steps, dtype=np.int64)
        self.n_rows = np.asarray([len(b) for _, b in items], dtype=np.int64)
        self.bins = (np.concatenate([b.reshape(-1, n_families) for _, b in items]) if items
                     else np.zeros((0, n_families), dtype=np.uint16))
        self.group = np.repeat(np.arange(len(items), dtype=np.int64), self.n_rows)
        self.tail = tail_hist(self.bins) if len(self.bins) else np.zeros((n_families, NBINS + 1), np.int64)

    @property
    def n(self) -> int:
        return len(self.steps)

    @property
    def rows(self) -> int:
        return int(self.n_rows.sum())

    def index_of(self, step: int) -> int | None:
        i = int(np.searchsorted(self.steps, step))
        return i if i < self.n and self.steps[i] == step else None


#: A step's evidence counts only *row-selective* cuts: those at which a normal batch of the step's size expects at
#: most this many rows (``N * natural rate <= 1``). Rows of a batch are not independent (a batch drawn from one
#: source or one region of a shard is shifted as a whole: 15 of 16 rows above a control quantile that 30% of rows
#: reach), and the binomial would count such a shift as 15 independent anomalies; the verdict is about rows that
#: are individually unusual.
MAX_EXPECTED_ROWS = 1.0


def window_evidence(bins_list: Sequence[np.ndarray], ref: Reference) -> Evidence:
    """Evidence of window steps (not part of the reference), one group per entry of ``bins_list``."""
    n = np.asarray([len(b) for b in bins_list], dtype=np.int64)
    if not len(bins_list):
        return scan([], n, n, ref.n_families)
    allb = np.concatenate([np.asarray(b).reshape(-1, ref.n_families) for b in bins_list])
    group = np.repeat(np.arange(len(bins_list)), n)
    cand = candidates_from_rows(allb, group, ref.tail, loo=False)
    return scan([cand], n, np.full(len(n), ref.rows), ref.n_families, MAX_EXPECTED_ROWS)


def control_evidence(ref: Reference) -> Evidence:
    """Every control step's evidence, leave-one-out (its own rows out of the reference), by the same rule."""
    cand = candidates_from_rows(ref.bins, ref.group, ref.tail, loo=True)
    return scan([cand], ref.n_rows, ref.rows - ref.n_rows, ref.n_families, MAX_EXPECTED_ROWS)


@dataclass
class Finding:
    """One family at one step: ``rows`` of ``n_rows`` at the cut (bin ``cut``), evidence ``e``, the largest
    count at the cut in any control step and which, and the natural rate."""

    family: int
    step: int
    rows: int
    n_rows: int
    cut: int
    e: float
    rate: float
    control_max: int
    control_max_step: int | None
    anomalous: bool


def _control_max(ref: Reference, family: int, cut: int, skip: int | None = None) -> tuple[int, int | None]:
    c = group_counts_at(ref.bins, ref.group, ref.n, family, cut)
    if skip is not None:
        c[skip] = -1
    if not len(c) or c.max() <= 0:
        return 0, None
    i = int(np.argmax(c))
    return int(c[i]), int(ref.steps[i])


def reachable_steps(n: int, alpha: float) -> int:
    """Most window steps over which ``n`` controls can reach ``p <= alpha`` (Sidak on the smallest step p)."""
    if n < 1:
        return 0
    return int(np.floor(np.log1p(-alpha) / np.log1p(-1.0 / (n + 1)) + 1e-9))


def step_p(e, t_ctrl: np.ndarray) -> np.ndarray:
    """Calibrated p of evidence ``e`` (scalar or array) against the controls' statistics ``t_ctrl``."""
    e = np.asarray(e, dtype=np.float64)
    n = len(t_ctrl)
    return (1.0 + (np.asarray(t_ctrl)[None, :] >= e.reshape(-1, 1)).sum(axis=1)).reshape(e.shape) / (n + 1.0)


def findings(ev: Evidence, g: int, step: int, ref: Reference, ctrl: Evidence, config: VerdictConfig, m: int = 1,
             skip: int | None = None, top: int = 8) -> list[Finding]:
    """The step's families by evidence (largest first, at most ``top`` plus every anomalous one). A family is
    *anomalous* at the step when its evidence alone makes the event significant (its calibrated p against the
    controls' statistics, Sidak over the ``m`` window steps, is at most alpha), at least ``min_rows`` rows
    are at its cut, and more than at that cut in any control step. ``skip``: a control's own index when it
    is judged as a window."""
    e = ev.e[g]
    t_ctrl = ctrl.T if skip is None else np.delete(ctrl.T, skip)
    p_fam = 1.0 - (1.0 - step_p(e, t_ctrl)) ** m
    out = []
    for f in np.lexsort((np.arange(len(e)), -e)).tolist():
        if e[f] <= 0:
            break
        significant = p_fam[f] <= config.alpha
        if len(out) >= top and not significant:
            continue
        k, cut = int(ev.k[g, f]), int(ev.cut[g, f])
        cmax, cstep = _control_max(ref, f, cut, skip)
        anomalous = bool(significant and k >= config.min_rows and k > cmax)
        out.append(Finding(f, int(step), k, int(ev.n[g]), cut, float(e[f]), float(ev.rate[g, f]), cmax, cstep,
                           anomalous))
    return out


@dataclass
class Verdict:
    verdict: str
    p_value: float | None
    evidence: float | None
    effect_size: float | None
    margin: float | None
    top_signal: str | None
    top_step: int | None
    anomalous_rows: int | None
    n_rows: int | None
    control_max_rows: int | None
    natural_rate: float | None
    n_controls: int
    n_window_steps: int
    reason: str
    step_p: dict[int, float] = field(default_factory=dict)
    step_findings: dict[int, list[Finding]] = field(default_factory=dict)


#: Scale of the exponential tail of -log10 of a valid p-value (P(e >= x) = 10^-x): the lightest tail a family's
#: control evidence is given in :func:`tail_p`.
NULL_TAIL_SCALE = 1.0 / np.log(10.0)


def tail_p(e: float, null: np.ndarray, q: float = 0.9) -> float:
    """P(evidence >= e) under a family's null, from its control values ``null``: the empirical tail up to
    their ``q`` quantile ``u``, beyond it an exponential tail fitted to the exceedances (peaks over
    threshold: ``(share above u) * exp(-(e - u) / scale)``, ``scale`` their mean excess, at least that of a
    valid p-value's -log10). A tail beyond the largest control is extrapolated, not floored at 1/(n+1)."""
    null = np.asarray(null, dtype=np.float64)
    n = len(null)
    if not n:
        return 1.0
    u = float(np.quantile(null, q))
    emp = (1.0 + float(np.count_nonzero(null >= e))) / (n + 1.0)
    if e <= u:
        return emp
    exc = null[null > u] - u
    share = (len(exc) + 1.0) / (n + 1.0)
    scale = max(float(exc.mean()) if len(exc) else 0.0, NULL_TAIL_SCALE)
    return float(min(emp, share * np.exp(-(e - u) / scale)))


def follow_up(found: dict[int, list[Finding]], window: Evidence, window_steps: Sequence[int], ref: Reference,
              ctrl: Evidence, config: VerdictConfig, skip: int | None = None) -> None:
    """Once an event is ``data``, the families found anomalous (at any window step) are tested at every other
    window step on their own: a family's evidence at a step against the controls' evidence *on that family*
    (leave-one-out; :func:`tail_p`, whose exponential tail reaches below 1/(n+1)), Sidak over the window
    steps and the families tested, plus the same row rules (at least ``min_rows`` rows, more than at the
    cut in any control step). Closed testing: the event's global null is rejected first; each (step,
    family) is then tested at the family-wise level, so the rows of an anomaly that is weaker at some of
    its steps are still named. Updates ``found`` in place."""
    fams = sorted({x.family for xs in found.values() for x in xs if x.anomalous})
    if not fams:
        return
    m = len(window_steps)
    ce = ctrl.e if skip is None else np.delete(ctrl.e, skip, axis=0)
    level = 1.0 - (1.0 - config.alpha) ** (1.0 / (m * len(fams)))
    for g, s in enumerate(window_steps):
        xs = found[int(s)]
        have = {x.family: i for i, x in enumerate(xs)}
        for f in fams:
            i = have.get(f)
            if i is not None and xs[i].anomalous:
                continue
            e = float(window.e[g, f])
            if e <= 0 or tail_p(e, ce[:, f]) > level:
                continue
            k, cut = int(window.k[g, f]), int(window.cut[g, f])
            if k < config.min_rows:
                continue
            cmax, cstep = _control_max(ref, f, cut, skip)
            if k <= cmax:
                continue
            x = Finding(f, int(s), k, int(window.n[g]), cut, e, float(window.rate[g, f]), cmax, cstep, True)
            if i is None:
                xs.append(x)
            else:
                xs[i] = x
        xs.sort(key=lambda x: (-x.e, x.family))


def _as_extreme(ctrl: Evidence, ref: Reference, t: float, families: Sequence[Family], skip=None, top=3) -> str:
    T = ctrl.T.copy()
    if skip is not None:
        T[skip] = -np.inf
    idx = [int(i) for i in np.lexsort((ref.steps, -T)) if T[i] >= t][:top]
    if not idx:
        return ""
    parts = []
    for i in idx:
        f = int(np.argmax(ctrl.e[i]))
        parts.append(f"step {int(ref.steps[i])} ({int(ctrl.k[i, f])}/{int(ctrl.n[i])} rows on {families[f].name}, "
                     f"e={_fmt_e(ctrl.e[i, f])})")
    return ", ".join(parts)


def _fmt_e(e: float, cap: float = 300.0) -> str:
    return f">={cap:g}" if e >= cap else f"{e:.1f}"


def _fmt_cut(fam: Family, b: int) -> str:
    v = cut_value(fam, b)
    op = ">=" if fam.tail == "high" else "<="
    return f"{fam.signal} {op} {v:.4g}"


def judge(families: Sequence[Family], window_steps: Sequence[int], window: Evidence, ref: Reference,
          ctrl: Evidence, config: VerdictConfig = VerdictConfig(), skip: int | None = None) -> Verdict:
    """Verdict for one spike event. ``window``: evidence of its ``m`` window steps (groups in the order of
    ``window_steps``); ``ctrl``: :func:`control_evidence` of ``ref``. ``skip``: judge the control of that
    index as the window (leave-one-out calibration of the controls themselves)."""
    m = len(window_steps)
    n = ref.n - (1 if skip is not None else 0)
    base = dict(n_controls=n, n_window_steps=m)
    nones = dict(p_value=None, evidence=None, effect_size=None, margin=None, top_signal=None, top_step=None,
                 anomalous_rows=None, n_rows=None, control_max_rows=None, natural_rate=None)
    if n < config.min_controls:
        return Verdict("inconclusive", reason=f"only {n} control steps had data (need {config.min_controls})",
                       **nones, **base)
    if m == 0:
        return Verdict("inconclusive", reason="no step of the spike window had data", **nones, **base)
    cut_note = ""
    m_ok = reachable_steps(n, config.alpha)
    if m > m_ok:
        if m_ok < 1:
            return Verdict("inconclusive", reason=f"{n} controls cannot reach p <= {config.alpha}; add controls "
                           f"(--controls)", **nones, **base)
        # the window's first m_ok steps (its start is where a data cause shows): decided by n and m alone
        cut_note = (f" (the window's last {m - m_ok} steps left out: {n} controls reach p <= {config.alpha} over at "
                    f"most {m_ok} steps)")
        window_steps, window, m = list(window_steps)[:m_ok], window.take(list(range(m_ok))), m_ok
        base = dict(n_controls=n, n_window_steps=m)
    T_ctrl = ctrl.T if skip is None else np.delete(ctrl.T, skip)
    T_win = window.T
    p_step = (1.0 + (T_ctrl[None, :] >= T_win[:, None]).sum(axis=1)) / (n + 1.0)
    p_event = float(1.0 - (1.0 - p_step.min()) ** m)
    found = {int(s): findings(window, i, int(s), ref, ctrl, config, m, skip) for i, s in enumerate(window_steps)}
    has = np.array([any(x.anomalous for x in found[int(s)]) for s in window_steps])
    i_top = int(np.lexsort((np.asarray(window_steps), -T_win, ~has, p_step))[0])
    step = int(window_steps[i_top])
    fs = found[step]
    top = next((x for x in fs if x.anomalous), fs[0] if fs else None)
    max_ctrl_T = float(T_ctrl.max()) if len(T_ctrl) else 0.0
    t_top = float(T_win[i_top])
    margin = min(config.max_margin, t_top / max_ctrl_T) if max_ctrl_T > 0 else config.max_margin
    step_p = {int(s): float(p) for s, p in zip(window_steps, p_step)}
    if top is None:
        return Verdict("not_data", p_event, 0.0, None, margin, None, step, None, None, None, None,
                       reason=f"no row of the window is unusual on any signal (p={p_event:.3g}){cut_note}; look at the "
                              f"optimizer or hardware", step_p=step_p, step_findings=found, **base)
    fam = families[top.family]
    fold = min(config.max_fold, top.rows / max(1, top.control_max))
    e_cap = min(config.max_evidence, top.e)
    common = dict(p_value=p_event, evidence=e_cap, effect_size=fold, margin=margin, top_signal=fam.name,
                  top_step=step, anomalous_rows=top.rows, n_rows=top.n_rows, control_max_rows=top.control_max,
                  natural_rate=top.rate, step_p=step_p, step_findings=found)
    what = (f"{top.rows} of {top.n_rows} rows anomalous on {fam.name} at step {step} ({_fmt_cut(fam, top.cut)})")
    others = [(s, x) for s in window_steps if int(s) != step for x in found[int(s)]
              if x.anomalous and x.family == top.family]
    also = ""
    if others:
        also = " and at steps " + ", ".join(f"{s}: {x.rows}/{x.n_rows}" for s, x in others[:6])
        if len(others) > 6:
            also += f" (+{len(others) - 6} more)"
    ctrl_part = (f"control batches have at most {top.control_max} (step {top.control_max_step})"
                 if top.control_max else "no control batch has any")
    stats = (f"natural rate {100 * top.rate:.2g}% of {ref.rows if skip is None else ref.rows - int(ref.n_rows[skip])} "
             f"control rows; e={_fmt_e(top.e, config.max_evidence)}, p={p_event:.3g} over {m} window steps "
             f"and {n} controls")
    if p_event <= config.alpha and top.anomalous:
        follow_up(found, window, window_steps, ref, ctrl, config, skip)
        others = [(s, x) for s in window_steps if int(s) != step for x in found[int(s)]
                  if x.anomalous and x.family == top.family]
        also = ""
        if others:
            also = " and at steps " + ", ".join(f"{s}: {x.rows}/{x.n_rows}" for s, x in others[:6])
            if len(others) > 6:
                also += f" (+{len(others) - 6} more)"
        return Verdict("data", reason=f"{what}{also}; {ctrl_part}; {stats}{cut_note}", **common, **base)
    if p_event > config.alpha:
        ext = _as_extreme(ctrl, ref, t_top, families, skip)
        why = (f"as extreme: {ext}" if ext else f"p={p_event:.3g} > {config.alpha}")
    elif top.rows < config.min_rows:
        why = f"only {top.rows} row"
    else:
        why = f"control step {top.control_max_step} has {top.control_max} such rows"
    return Verdict("not_data", reason=f"the window's data looks like the {n} control steps: the most unusual is "
                   f"{what} but {why}; {stats}{cut_note}; look at the optimizer or hardware", **common, **base)


#: A secondary family names its rows only when the rows expected at its cut in a normal batch (N x natural rate)
#: are at most this share of them (the skip list's precision target is 0.95).
FLAG_SLACK = 0.05


def step_flags(bins: np.ndarray, found: Sequence[Finding], partner: np.ndarray | None = None,
               paired: Iterable[int] = ()) -> tuple[np.ndarray, list[list[int]]]:
    """Rows of one step flagged by its anomalous findings: (row indices, families flagging each). The step's
    strongest anomalous family names all rows at its cut; any other anomalous family names its rows only when
    its cut is selective (``N * natural rate <= FLAG_SLACK * rows``): a broad cut of a secondary family would
    add normal rows that merely lie above an ordinary quantile. ``paired``: families whose rows are later
    copies of an earlier row (``partner[row]``, -1 for none); a row flagged on one brings its partner along
    (the first copy of a group is part of the duplicate too)."""
    bins = np.asarray(bins)
    paired = set(int(f) for f in paired)
    hit: dict[int, list[int]] = {}
    anomalous = [x for x in found if x.anomalous]
    for i, x in enumerate(anomalous):
        if i > 0 and x.n_rows * x.rate > FLAG_SLACK * x.rows:
            continue
        rows = np.flatnonzero(bins[:, x.family] >= x.cut)
        if partner is not None and x.family in paired and len(rows):
            p = np.asarray(partner, dtype=np.int64)[rows]
            rows = np.union1d(rows, p[p >= 0])
        for r in rows.tolist():
            if x.family not in hit.get(r, []):
                hit.setdefault(r, []).append(x.family)
    rows = np.asarray(sorted(hit), dtype=np.int64)
    return rows, [hit[r] for r in rows.tolist()]


def contamination_threshold(n_controls: int, n_families: int, alpha: float) -> float:
    """Evidence beyond which a control step is itself anomalous: Bonferroni over the controls, the families and
    every possible cut, ``log10(n * F * cuts / alpha)`` (conservative under the binomial model: a normal
    control reaches it with probability at most ``alpha / n``)."""
    with np.errstate(over="ignore", divide="ignore"):
        t = float(np.log10(max(1, n_controls) * max(1, n_families) * (NBINS - 1) / alpha))
    if not np.isfinite(t):  # an alpha so small that the ratio overflows a double (1e-320): the same, in logs
        t = float(np.log10(max(1, n_controls)) + np.log10(max(1, n_families)) + np.log10(NBINS - 1) - np.log10(alpha))
    return t


@dataclass
class Null:
    """The null the verdicts are judged against: the reference and the controls' leave-one-out evidence, after
    leaving out the controls that are anomalous themselves (an undetected data spike among the control
    steps); ``all_ref``/``all_ctrl`` keep every control for reporting."""

    ref: Reference
    ctrl: Evidence
    all_ref: Reference
    all_ctrl: Evidence
    excluded: list[int]
    threshold: float


def null_model(ref: Reference, alpha: float = 0.05) -> Null:
    """Controls' evidence, leave-one-out; controls with ``T >= contamination_threshold`` are left out of the
    reference and of the calibration (once), then every control's evidence is computed again without them.
    Leaving them out costs exactness only as often as a normal control reaches the threshold."""
    ctrl = control_evidence(ref)
    t = contamination_threshold(ref.n, ref.n_families, alpha)
    bad = np.flatnonzero(ctrl.T >= t)
    if not len(bad):
        return Null(ref, ctrl, ref, ctrl, [], t)
    keep = np.setdiff1d(np.arange(ref.n), bad)
    items = [(int(ref.steps[i]), ref.bins[ref.group == i]) for i in keep.tolist()]
    ref2 = Reference(items, ref.n_families)
    return Null(ref2, control_evidence(ref2), ref, ctrl, [int(ref.steps[i]) for i in bad.tolist()], t)


class ReferenceBuilder:
    """The control steps' binned rows as a mergeable accumulator (``add((step, bins))``); ``result`` is the
    :class:`Reference`, identical whatever the order or grouping of the steps."""

    name = "reference"

    def __init__(self, n_families: int):
        self.n_families = n_families

    def create(self) -> list:
        return []

    def add(self, acc: list, item) -> list:
        step, bins = item
        return acc + [(int(step), np.asarray(bins))]

    def merge(self, accs) -> list:
        return [x for a in accs for x in a]

    def result(self, acc: list) -> Reference:
        return Reference(acc, self.n_families)
