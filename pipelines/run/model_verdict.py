"""The model-based verdict of ``spike-audit run --row-losses FILE`` (statistics: :mod:`auditors.attribution`).

After the pipeline, on the driver (the per-row losses of the audited steps are a float per sequence of
a few hundred steps: as small as the manifest rows the driver already reads):

1. the steps needed: every audited spike's window steps, the control steps, and the up to
   ``BASELINE_STEPS`` steps just before each window that lie in no spike's guard zone;
2. their manifest rows (push-down read) and per-row losses (:mod:`pipelines.row_losses`), joined and
   checked: a window step without any per-row loss is an error (``--allow-missing-steps`` makes the
   spike's model verdict inconclusive instead);
3. per spike, the baseline: with ``--loss-baseline auto`` the preceding steps when at least
   ``MIN_PRECEDING`` of them have losses (losses the trainer logged at every step), else the control
   steps (losses replayed for the audited batches only, from one checkpoint);
4. :func:`auditors.attribution.attribute` on the window's rows, flagged where ``row_flags`` name them.

Returns the verdicts with the model columns filled, the ``loss_rows`` table (the rows behind every
model verdict) and a summary for ``summary.json``.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from spike_audit.auditors.loss_attribution import Attribution, AttributionConfig, attribute
from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.run.row_losses import BatchIndex, flag_units, join_losses, read_row_losses
from spike_audit.schemas import LOSS_ROWS

log = logging.getLogger(__name__)

BASELINE_STEPS = 16
MIN_PRECEDING = 8
BASELINES = ("auto", "preceding", "controls")


def _preceding(windows: dict[str, list[int]], busy: set[int], lo: int) -> dict[str, list[int]]:
    out = {}
    for sid, w in windows.items():
        if not w:
            out[sid] = []
            continue
        first = min(w)
        cand = [s for s in range(first - 1, max(lo, first - 4 * BASELINE_STEPS) - 1, -1) if s not in busy]
        out[sid] = sorted(cand[:BASELINE_STEPS])
    return out


def model_verdicts(cfg, plan, verdicts: pa.Table, row_flags: pa.Table, busy: set[int] | None = None,
                   manifest_range: tuple[int, int] | None = None):
    """(verdicts with model columns, loss_rows table, summary) for the spikes of ``plan``."""
    from spike_audit.pipelines.run.plan import read_manifest_steps

    mode = getattr(cfg, "loss_baseline", "auto") or "auto"
    if mode not in BASELINES:
        raise UserError(f"--loss-baseline {mode!r}: expected one of {', '.join(BASELINES)}")
    acfg = AttributionConfig(seed=cfg.seed)
    windows = {sid: sorted(w) for sid, w in plan.windows.items()}
    busy = set(busy or ())
    for w in windows.values():
        busy |= set(w)
    lo = manifest_range[0] if manifest_range else 0
    preceding = _preceding(windows, busy, lo) if mode != "controls" else {sid: [] for sid in windows}
    wanted = sorted(set().union(*windows.values(), plan.controls, *preceding.values()) if windows else set())
    man = read_manifest_steps(cfg.manifest, wanted, getattr(plan, "offset", 0))
    index = BatchIndex.from_manifest(man, cfg.manifest)
    lf = read_row_losses(cfg.row_losses, steps=set(wanted), first_step=getattr(cfg, "row_losses_first_step", 1))
    joined = join_losses(index, lf)
    have = joined.steps_with_losses
    if joined.n_nonfinite:
        log.warning("%s: %d of %d per-row losses of the audited steps are NaN or inf; they are left out",
                    cfg.row_losses, joined.n_nonfinite, joined.n_given)
    if joined.missing_rows:
        log.warning("%s: %d audited steps have sequences without a loss (%d sequences in all)", cfg.row_losses,
                    len(joined.missing_rows), sum(joined.missing_rows.values()))
    missing = {sid: [s for s in w if s not in have] for sid, w in windows.items()}
    for sid, ms in sorted(missing.items()):
        if ms and not cfg.allow_missing_steps:
            covered = sorted(have)
            span = f"steps {covered[0]}..{covered[-1]}" if covered else "none of the audited steps"
            raise UserError(f"{cfg.row_losses}: no per-row losses for step {ms[0]} (window of spike {sid}"
                            + (f", and {len(ms) - 1} more window steps" if len(ms) > 1 else "")
                            + f"); the file covers {span} of those audited; --allow-missing-steps judges such "
                            f"spikes inconclusive")

    def step_losses(s):
        return joined.loss[index.units_of(s)]

    results: dict[str, tuple[Attribution, list[int], str]] = {}
    ctrl_have = [c for c in plan.controls if c in have]
    for sid, w in sorted(windows.items()):
        pre = [s for s in preceding.get(sid, []) if s in have]
        if mode == "preceding" or (mode == "auto" and len(pre) >= MIN_PRECEDING):
            base_steps, name = pre, "preceding steps"
        else:
            base_steps, name = ctrl_have, "control steps"
        flags = flag_units(index, row_flags, sid)
        wsteps = [s for s in w if s in have]
        a = attribute(wsteps, [step_losses(s) for s in wsteps], [flags[index.units_of(s)] for s in wsteps],
                      [step_losses(s) for s in base_steps], acfg, baseline_name=name)
        if missing[sid]:
            a.reason += f" ({len(missing[sid])} window steps had no per-row losses)"
        results[sid] = (a, base_steps, "preceding" if name == "preceding steps" else "controls")
    new_verdicts = _with_model_columns(verdicts, results)
    rows = _loss_rows(index, joined.loss, row_flags, results, windows, acfg)
    summary = {"file": cfg.row_losses, "losses_read": joined.n_given, "nonfinite": joined.n_nonfinite,
               "steps_with_losses": len(have), "sequences_without_loss": int(sum(joined.missing_rows.values())),
               "model_verdicts": {v: sum(1 for a, _, _ in results.values() if a.verdict == v)
                                  for v in ("data", "not_data", "inconclusive")}}
    return new_verdicts, rows, summary


def _f(x):
    return float(x) if x is not None and np.isfinite(x) else None


def _with_model_columns(verdicts: pa.Table, results) -> pa.Table:
    recs = verdicts.to_pylist()
    for r in recs:
        got = results.get(r["spike_id"])
        if got is None:
            continue
        a, base_steps, kind = got
        s = a.chosen
        r.update(model_verdict=a.verdict, model_reason=a.reason, model_step=a.step,
                 model_baseline=f"{kind}:{len(base_steps)}")
        if s is not None:
            r.update(excess_loss=_f(s.excess), excess_z=_f(s.excess_z), flagged_share=_f(s.flagged_share),
                     flagged_share_lo=_f(s.flagged_share_ci[0]), flagged_share_hi=_f(s.flagged_share_ci[1]),
                     breadth=_f(s.breadth), breadth_lo=_f(s.breadth_ci[0]), breadth_hi=_f(s.breadth_ci[1]),
                     outlier_share=_f(s.outlier_share), outlier_share_lo=_f(s.outlier_share_ci[0]),
                     outlier_share_hi=_f(s.outlier_share_ci[1]), n_loss_outliers=int(s.n_outliers),
                     flag_precision=_f(s.precision), flag_recall=_f(s.recall))
    from spike_audit.schemas import VERDICTS

    return VERDICTS.from_pylist(recs)


def _loss_rows(index: BatchIndex, loss: np.ndarray, row_flags: pa.Table, results, windows, acfg) -> pa.Table:
    from spike_audit.pipelines.run.row_losses import losses_table

    parts = []
    for sid, (a, base_steps, _) in sorted(results.items()):
        flags = flag_units(index, row_flags, sid)
        sigma, mid = a.baseline_sigma, a.baseline_typical
        for role, steps in (("window", [s for s in windows[sid]]), ("baseline", base_steps)):
            for s in steps:
                u = index.units_of(s)
                if not len(u):
                    continue
                lt = losses_table(index, loss, units=u)
                L = loss[u]
                z = (L - mid) / sigma if np.isfinite(sigma) and sigma > 0 else np.full(len(u), np.nan)
                parts.append({"spike_id": [sid] * len(u), "step": index.step[u], "role": [role] * len(u),
                              "position": index.position[u], "shard": lt.column("shard").combine_chunks(),
                              "row": lt.column("row").to_numpy(), "loss": L, "z": z, "flagged": flags[u],
                              "outlier": np.nan_to_num(z, nan=-np.inf) > acfg.outlier_z})
    if not parts:
        return LOSS_ROWS.empty()
    cols = {k: (pa.concat_arrays([pa.array(p[k]) if not isinstance(p[k], pa.Array) else p[k] for p in parts])
                ) for k in parts[0]}
    return LOSS_ROWS.from_arrays(cols)
