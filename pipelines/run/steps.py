"""The join of a log's steps to a manifest's steps, decided once and checked before any work.

A manifest written by spike-audit numbers steps by 0-based batch index (:mod:`spike_audit.schemas.steps`);
the log reader says which trainer wrote the log, hence how its steps map to batch indices (Megatron's
iteration N is batch N - 1). The join is one offset: ``manifest step = log step + offset``.

* ``--step-offset K`` sets it (and the checks below only warn);
* else a manifest on the batch-index convention gives ``offset = -base`` of the log's trainer
  (``--log-trainer`` names it for a log whose format does not say: JSONL, CSV, TensorBoard, pattern);
* else (a manifest without a recorded convention: written by hand or by spike-audit < 0.2) the log's own
  step numbers are joined as they are, with a warning.

Then the log and the manifest must agree, or ``run`` stops with one line naming what disagrees:

* range: every logged step of the audited metric maps into the manifest's steps (unless
  ``--allow-missing-steps``: a manifest of part of the run);
* consumed samples (and tokens) where the log has them (Megatron's ``consumed samples``) and the manifest
  records its batch size: after batch ``b`` the trainer has consumed
  ``samples_before_first_step + (b - first_step + 1) * samples_per_step``.

Outputs keep the log's own step numbers; ``summary.json`` records the join (``step_join``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spike_audit.pipelines.errors import UserError
from spike_audit.schemas.steps import STEP_CONVENTION, TRAINER_STEP_BASE, step_base

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepJoin:
    offset: int  # manifest step = log step + offset
    how: str  # how the offset was decided
    log_trainer: str | None
    log_step_base: int | None
    manifest_convention: str | None
    step_offset_given: bool
    checked: list  # what agreed
    disagreed: list  # what disagreed (only when --step-offset overrode the check)

    def to_dict(self) -> dict:
        return asdict(self)

    def batch_index(self, log_step: int) -> int | None:
        """The 0-based batch index of a log step (None when the manifest has no known convention)."""
        if self.manifest_convention != STEP_CONVENTION:
            return None
        return int(log_step) + self.offset


def _metric(loss: pa.Table, name: str, run: str | None = None):
    sel = pc.equal(loss.column("metric"), name)
    if run is not None:
        sel = pc.and_(sel, pc.equal(loss.column("run"), run))
    t = loss.filter(sel)
    return (np.asarray(t.column("step"), np.int64), np.asarray(t.column("value"), np.float64),
            t.column("source_line").to_pylist())


def _where(log_path: str, line) -> str:
    return f"{log_path}:{line}" if line is not None else log_path


def decide_offset(*, log_path: str, log_format: str, report_trainer: str | None, meta: dict,
                  log_trainer: str | None = None, step_offset: int | None = None) -> tuple[int, str, str | None, int | None]:
    """(offset, how, trainer, base) before any check."""
    if log_trainer is not None and log_trainer not in TRAINER_STEP_BASE:
        raise UserError(f"--log-trainer {log_trainer!r}: expected one of {', '.join(TRAINER_STEP_BASE)}")
    trainer = log_trainer or report_trainer
    base = step_base(trainer)
    convention = meta.get("step_convention")
    if convention is not None and convention != STEP_CONVENTION:
        raise UserError(f"manifest: step convention {convention!r} is not known (this spike-audit writes and "
                        f"reads {STEP_CONVENTION!r}); rebuild the manifest")
    if step_offset is not None:
        return int(step_offset), f"--step-offset {step_offset} (manifest step = log step + {step_offset})", trainer, base
    if convention == STEP_CONVENTION:
        if base is None:
            raise UserError(f"{log_path}: a {log_format} log does not say how its trainer numbers steps, and the "
                            f"manifest counts 0-based batches: give --log-trainer ({', '.join(TRAINER_STEP_BASE)}) "
                            f"or --step-offset K (manifest step = log step + K)")
        return -base, (f"{trainer} log: logged step s is batch s - {base}" if base else
                       f"{trainer} log: logged step s is batch s"), trainer, base
    log.warning("the manifest records no step convention (written by hand or by an older spike-audit): joining on "
                "the log's own step numbers; rebuild it with `spike-audit manifest` so the join is checked")
    return 0, "manifest records no step convention: log steps joined as they are", trainer, base


def align(loss: pa.Table, *, log_path: str, log_format: str, report_trainer: str | None, meta: dict,
          manifest_range: tuple[int, int], metric: str = "train_loss", log_trainer: str | None = None,
          step_offset: int | None = None, allow_missing_steps: bool = False) -> StepJoin:
    """Decide the join and check it (module docstring). Raises a one-line :class:`UserError` on a mismatch
    unless ``step_offset`` was given (then the mismatch is logged and recorded)."""
    offset, how, trainer, base = decide_offset(log_path=log_path, log_format=log_format,
                                               report_trainer=report_trainer, meta=meta, log_trainer=log_trainer,
                                               step_offset=step_offset)
    lo, hi = manifest_range
    checked, problems = [], []
    steps, _, lines = _metric(loss, metric)
    if len(steps):
        m = steps + offset
        outside = np.flatnonzero((m < lo) | (m > hi))
        if len(outside) and not allow_missing_steps:
            i = int(outside[0])
            a, b = int(steps.min()), int(steps.max())
            hint = ""
            for d in (1, -1):  # an off-by-one is the common mistake: say so
                if (m.min() + d >= lo) and (m.max() + d <= hi) and not (m.min() >= lo and m.max() <= hi):
                    hint = (f"; shifted by {d:+d} every logged step would fit: the log and the manifest are off by "
                            f"one batch")
                    break
            problems.append(f"{_where(log_path, lines[i])}: {metric} at step {int(steps[i])} maps to manifest step "
                            f"{int(m[i])}, outside the manifest's steps {lo}..{hi} (logged steps {a}..{b}, "
                            f"{how}){hint}; is this the manifest of that run? (--allow-missing-steps if it covers only "
                            f"part of it)")
        elif len(outside) == 0:
            checked.append(f"all {len(steps)} logged {metric} steps map into the manifest's steps {lo}..{hi}")
    for unit, key in (("samples", "consumed_samples"), ("tokens", "consumed_tokens")):
        per, before, first = meta.get(f"{unit}_per_step"), meta.get(f"{unit}_before_first_step"), meta.get("first_step")
        s, v, ln = _metric(loss, key)
        if not len(s) or per is None or before is None or first is None:
            continue
        b = s + offset
        inside = np.flatnonzero((b >= lo) & (b <= hi) & np.isfinite(v))
        if not len(inside):
            continue
        expected = before + (b[inside] - first + 1) * per
        bad = np.flatnonzero(v[inside] != expected)
        if len(bad):
            j = int(inside[bad[0]])
            e = int(expected[bad[0]])
            d = (v[j] - e) / per
            shift = (f": the log is {abs(int(d))} batch(es) {'ahead of' if d > 0 else 'behind'} the manifest"
                     if d == int(d) and d != 0 else "")
            problems.append(f"{_where(log_path, ln[j])}: step {int(s[j])} logs consumed {unit} {int(v[j])} but its "
                            f"manifest step {int(b[j])} ends at {e} consumed {unit} ({how}){shift}; rebuild the manifest "
                            f"with this run's batch size and --consumed-samples, or --step-offset K if intended")
        else:
            checked.append(f"consumed {unit} agree at {len(inside)} logged steps")
    if problems and step_offset is None:
        raise UserError(problems[0])
    for p in problems:
        log.warning("%s (accepted: --step-offset given)", p)
    return StepJoin(offset=offset, how=how, log_trainer=trainer, log_step_base=base,
                    manifest_convention=meta.get("step_convention"), step_offset_given=step_offset is not None,
                    checked=checked, disagreed=problems)
