"""The run's derived outputs, from its tables: the skip list, the shard quarantine, and the calibration on the
control steps."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spike_audit.auditors.evidence import evidence_of
from spike_audit.schemas import BATCH_SCORES, ROW_FLAGS, SHARD_SCORES, VERDICTS
from spike_audit.schemas.steps import TRAINER_STEP_BASE
from spike_audit.pipelines.run.plan import RunConfig


OUTPUT_SPECS = (BATCH_SCORES, SHARD_SCORES, ROW_FLAGS, VERDICTS)


def _flags_by_event(row_flags: pa.Table) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for rec in row_flags.to_pylist():
        out.setdefault(rec["spike_id"], []).append(rec)
    return out


def skip_list(verdicts: pa.Table, row_flags: pa.Table, join=None) -> dict:
    """Per event: the steps and data ranges to skip on restart (every flagged row of every window step of a
    ``data`` event), and trainer-specific renderings of the steps. Steps are the log's own; with the step
    ``join`` (:class:`spike_audit.pipelines.run.steps.StepJoin`) their 0-based batch indices are listed too
    and the Megatron / OLMo-core renderings use those trainers' numbering (iteration = batch index + 1)."""
    flags_by = _flags_by_event(row_flags)
    entries = []
    for v in verdicts.to_pylist():
        sid = v["spike_id"]
        if v["verdict"] == "data":
            fl = flags_by.get(sid, [])
            steps = sorted({r["step"] for r in fl}) or [v["top_step"]]
            ranges = sorted({(r["shard"], r["row"], r["row_end"], r["unit"]) for r in fl})
            entries.append({"spike_id": sid, "peak_step": v["peak_step"], "verdict": "data", "skip_steps": steps,
                            "skip_data": [{"shard": s, "row_start": a, "row_end": b, "unit": u}
                                          for s, a, b, u in ranges],
                            "note": f"skip these steps' batches (or drop these {len(ranges)} rows) when restarting "
                                    f"before them: {v['top_signal']} is anomalous there"})
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


def quarantine(verdicts: pa.Table, row_flags: pa.Table, shard_scores: pa.Table, alpha: float = 0.05,
               min_rows: int = 2) -> dict:
    """Shards whose flagged rows (of ``data`` events) are beyond what their audited rows would give at the
    natural rate: ``k`` flagged of the shard's ``n`` audited rows, ``P(Binomial(n, r) >= k) <= alpha / S`` over
    the ``S`` audited shards, with ``r`` the largest natural rate of the cuts that flagged them and
    ``k >= min_rows`` (never for one row)."""
    data = {v["spike_id"] for v in verdicts.to_pylist() if v["verdict"] == "data"}
    n_rows = dict(zip(shard_scores.column("shard").to_pylist(), shard_scores.column("n_rows").to_pylist()))
    n_shards = max(1, len(n_rows))
    shards: dict[str, dict] = {}
    for r in row_flags.to_pylist():
        if r["spike_id"] not in data:
            continue
        e = shards.setdefault(r["shard"], {"rows": set(), "spikes": set(), "signals": set(), "rate": 0.0})
        e["rows"].add((r["row"], r["row_end"], r["unit"]))
        e["spikes"].add(r["spike_id"])
        e["signals"].update(r["signals"])
        e["rate"] = max(e["rate"], float(r["natural_rate"]))
    out = []
    for s, e in sorted(shards.items()):
        k = len(e["rows"])
        n = max(int(n_rows.get(s, k) or k), k)
        ev = float(evidence_of(k, n, min(1.0, e["rate"])))
        p = 10.0 ** -ev
        if k >= min_rows and p <= alpha / n_shards:
            out.append({"shard": s, "n_flagged_rows": k, "n_audited_rows": n, "natural_rate": e["rate"],
                        "p_value": p, "spikes": sorted(e["spikes"]), "signals": sorted(e["signals"]),
                        "rows": [{"row_start": a, "row_end": b, "unit": u} for a, b, u in sorted(e["rows"])]})
    return {"rule": f"k flagged rows of n audited, P(Binomial(n, natural rate) >= k) <= {alpha} / {n_shards} shards, "
                    f"k >= {min_rows}", "shards": out}


def control_calibration(batch_scores: pa.Table, cfg: RunConfig) -> dict:
    """Every control step judged as a one-step spike window against the other controls (computed in the
    pipeline: ``batch_scores.as_window``): under the null at most about alpha of them are ``data``; the
    controls left out as anomalous themselves (an undetected data spike among the controls); and the most
    extreme controls used (what a window has to beat)."""
    ctrl = batch_scores.filter(pc.equal(batch_scores.column("role"), "control")).to_pylist()
    alarms = [{"step": r["step"], "signal": r["top_signal"], "rows": r["top_rows"], "evidence": r["evidence"]}
              for r in ctrl if r["as_window"] == "data"]
    excluded = [{"step": r["step"], "signal": r["top_signal"], "rows": r["top_rows"], "n_rows": r["n_rows"],
                 "evidence": r["evidence"]} for r in ctrl if r["as_window"] == "excluded"]
    ctrl = [r for r in ctrl if r["as_window"] != "excluded"]
    ext = sorted(ctrl, key=lambda r: (-r["evidence"], r["step"]))[:5]
    ev = np.array([r["evidence"] for r in ctrl], dtype=np.float64)
    return {"n_controls": len(ctrl), "false_alarms": len(alarms), "alarms": alarms, "alpha": cfg.alpha,
            "excluded_as_anomalous": excluded,
            "evidence_quantiles": {q: float(np.quantile(ev, float(q))) for q in ("0.5", "0.9", "1.0")} if len(ev) else {},
            "most_extreme": [{"step": r["step"], "signal": r["top_signal"], "rows": r["top_rows"], "n_rows": r["n_rows"],
                              "evidence": r["evidence"]} for r in ext]}
