"""The run's derived outputs, from its tables: the skip list, the shard quarantine, and the false-alarm
calibration on the control steps."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spike_audit.auditors.verdict import VerdictConfig, judge
from spike_audit.pipelines.beam.scoring import matrix, signal_names
from spike_audit.schemas import BATCH_SCORES, ROW_FLAGS, SHARD_SCORES, VERDICTS
from spike_audit.schemas.steps import TRAINER_STEP_BASE
from spike_audit.auditors.attribution import attributed
from spike_audit.pipelines.run.plan import RunConfig


OUTPUT_SPECS = (BATCH_SCORES, SHARD_SCORES, ROW_FLAGS, VERDICTS)


def skip_list(verdicts: pa.Table, row_flags: pa.Table, join=None) -> dict:
    """Per spike: the steps and data ranges to skip on restart, and trainer-specific renderings. Steps are
    the log's own; with the step ``join`` (:class:`spike_audit.pipelines.run.steps.StepJoin`) their 0-based
    batch indices are listed too and the Megatron / OLMo-core renderings use those trainers' numbering
    (iteration = batch index + 1)."""
    flags_by = {}
    for rec in row_flags.to_pylist():
        flags_by.setdefault(rec["spike_id"], []).append(rec)
    entries = []
    for v in verdicts.to_pylist():
        sid = v["spike_id"]
        if v["verdict"] == "data":
            fl = attributed(flags_by.get(sid, []), v["top_step"], v["top_signal"])
            steps = [v["top_step"]]
            ranges = sorted({(r["shard"], r["row"], r["row_end"], r["unit"]) for r in fl})
            entries.append({"spike_id": sid, "peak_step": v["peak_step"], "verdict": "data", "skip_steps": steps,
                            "skip_data": [{"shard": s, "row_start": a, "row_end": b, "unit": u}
                                          for s, a, b, u in ranges],
                            "note": f"skip step {v['top_step']}'s batch (or drop these rows) when restarting "
                                    f"before it: {v['top_signal']} is anomalous there"})
        else:
            entries.append({"spike_id": sid, "peak_step": v["peak_step"], "verdict": v["verdict"], "skip_steps": [],
                            "skip_data": [],
                            "note": "the data looks normal: skipping batches is not expected to help"
                            if v["verdict"] == "not_data" else "inconclusive: see the verdict's reason"})
    steps = sorted({s for e in entries for s in e["skip_steps"]})
    batches = None
    if join is not None and join.batch_index(0) is not None:
        batches = [join.batch_index(s) for s in steps]
    megatron = [b + TRAINER_STEP_BASE["megatron"] for b in batches] if batches is not None else steps
    olmo = [b + TRAINER_STEP_BASE["olmo"] for b in batches] if batches is not None else steps
    return {
        "spikes": entries,
        "steps_to_skip": steps,
        "batch_indices_to_skip": batches,
        "render": {
            "olmo_core": {"steps_to_skip": olmo},
            "megatron": {"iterations_to_skip": megatron,
                         "cli": ("--iterations-to-skip " + " ".join(map(str, megatron))) if megatron else ""},
            "metaseq": {"skip_batches": ",".join(map(str, steps))},
        },
    }


def quarantine(verdicts: pa.Table, row_flags: pa.Table) -> dict:
    """Shards holding the rows that carry a ``data`` verdict's anomaly (see :func:`attributed`)."""
    flags_by: dict[str, list] = {}
    for rec in row_flags.to_pylist():
        flags_by.setdefault(rec["spike_id"], []).append(rec)
    shards: dict[str, dict] = {}
    for v in verdicts.to_pylist():
        if v["verdict"] != "data":
            continue
        for r in attributed(flags_by.get(v["spike_id"], []), v["top_step"], v["top_signal"]):
            e = shards.setdefault(r["shard"], {"flagged_rows": set(), "spikes": set(), "signals": set()})
            e["flagged_rows"].add((r["row"], r["row_end"], r["unit"]))
            e["spikes"].add(v["spike_id"])
            e["signals"].add(v["top_signal"])
    return {"shards": [{"shard": s, "n_flagged_rows": len(e["flagged_rows"]), "spikes": sorted(e["spikes"]),
                        "signals": sorted(e["signals"]),
                        "rows": [{"row_start": a, "row_end": b, "unit": u} for a, b, u in sorted(e["flagged_rows"])]}
                       for s, e in sorted(shards.items())]}


def control_false_alarms(batch_scores: pa.Table, cfg: RunConfig) -> dict:
    """Leave-one-out calibration: judge every control step as if it were a spike window against the
    other controls. A sound audit calls (almost) none of them ``data``; the count is reported."""
    ctrl = batch_scores.filter(pc.equal(batch_scores.column("role"), "control")).to_pylist()
    sigs = [{s["name"]: (s["value"] if s["value"] is not None else np.nan) for s in r["signals"]} for r in ctrl]
    names = signal_names(sigs)
    m = matrix(sigs, names)
    vcfg = VerdictConfig(alpha=cfg.alpha, min_effect=cfg.min_effect, min_margin=cfg.min_margin,
                         min_controls=cfg.min_controls)
    alarms = []
    for i, r in enumerate(ctrl):  # n_controls verdicts of n_controls x K matrices: small
        v = judge(names, m[i : i + 1], [r["step"]], np.delete(m, i, axis=0), vcfg)
        if v.verdict == "data":
            alarms.append({"step": r["step"], "signal": v.top_signal, "p_value": v.p_value})
    return {"n_controls": len(ctrl), "false_alarms": len(alarms), "alarms": alarms}
