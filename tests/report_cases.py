"""Generated result tables for the report tests: a run with many events and a corpus with many shards, shaped like
the pipelines' outputs (the schemas' columns, every signal family, long excerpts and names), with hostile text in
the places users' data reaches the page."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from spike_audit.auditors.rows import FAMILIES
from spike_audit.auditors.suite import SIGNALS
from spike_audit.schemas import (BATCH_SCORES, DUPLICATES, LOSS_ROWS, LOSS_SERIES, ROW_FLAGS, SHARD_SCORES, SPIKES,
                                 VERDICTS)

FAMILY_NAMES = [f.name for f in FAMILIES]
SIGNAL_NAMES = sorted(SIGNALS)
HOSTILE = ["\\" * 3000, "<script>alert(1)</script>&amp;" + "x" * 400, "\u202e\u0000 tab\there " + "A" * 2000,
           "normal text of a row, " * 40]


def _families(rng, scale: float, top: float | None = None) -> list[dict]:
    e = np.minimum(rng.exponential(scale, len(FAMILY_NAMES)), 300.0)
    e[rng.random(len(e)) < 0.3] = 0.0
    if top is not None:
        e[int(rng.integers(len(e)))] = top
    order = [int(f) for f in np.lexsort((np.arange(len(e)), -e)) if e[f] > 0]
    rows, cut, rate = rng.integers(1, 40, len(e)).tolist(), (rng.random(len(e)) * 1e3).tolist(), \
        (rng.random(len(e)) * 0.1).tolist()
    e = e.tolist()
    return [{"name": FAMILY_NAMES[f], "rows": rows[f], "cut": cut[f], "natural_rate": rate[f], "evidence": e[f]}
            for f in order]


def run_case(n_events: int = 200, n_controls: int = 200, window: int = 8, flags_per_event: int = 400,
             loss_rows_per_step: int = 256, n_steps: int = 20_000, seed: int = 0):
    """(loss, spikes, tables, cfg) for ``render_run_report``: ``n_events`` events (a train-loss and a grad-norm spike
    each), ``n_controls`` control steps, a model verdict with per-row losses on every event."""
    rng = np.random.default_rng(seed)
    steps = np.arange(n_steps)
    loss = LOSS_SERIES.from_arrays({
        "run": ["r<1>"] * (2 * n_steps), "metric": ["train_loss"] * n_steps + ["grad_norm"] * n_steps,
        "step": np.r_[steps, steps], "value": np.r_[3 + 5 * np.exp(-steps / 500) + rng.normal(0, 0.02, n_steps),
                                                   1 + rng.gamma(2, 0.2, n_steps)],
        "source_line": np.r_[steps, steps] + 1})
    peaks = np.sort(rng.choice(np.arange(200, n_steps - 20), n_events, replace=False))
    spikes, verdicts, bs, flags, lrows = [], [], [], [], {k: [] for k in LOSS_ROWS.names}
    for s in rng.choice(np.arange(n_steps), n_controls, replace=False).tolist():
        bs.append({"step": s, "role": "control", "n_rows": 1024, "n_tokens": 4_194_304, "evidence": 1.0,
                   "p_value": 0.5, "families": _families(rng, 1.0), "signals": []})
    for i, p in enumerate(peaks.tolist()):
        sid = f"r<1>/train_loss/{p}"
        verdict = ("data", "not_data", "inconclusive")[i % 3]
        for metric in ("train_loss", "grad_norm"):
            spikes.append({"spike_id": f"r<1>/{metric}/{p}", "run": "r<1>", "metric": metric, "kind": "spike",
                           "detector": "robust", "start_step": p, "peak_step": p, "end_step": p + 2,
                           "peak_value": 9.0, "baseline_value": 3.0, "severity": 166666666.7, "recovery_steps": 3})
        verdicts.append({
            "spike_id": sid, "run": "r<1>", "peak_step": p, "verdict": verdict, "p_value": 1 / 201,
            "evidence": 300.0, "effect_size": 166666666.7, "margin": 12.5, "anomalous_rows": 400, "n_rows": 1024,
            "control_max_rows": 3, "natural_rate": 1e-5, "top_signal": FAMILY_NAMES[i % len(FAMILY_NAMES)],
            "top_step": p, "top_shards": [f"s3://bucket/very/long/path/to/a/shard-{i:05d}-" + "q" * 80 + ".parquet"],
            "n_controls": n_controls, "n_window_steps": window, "window_start": p - window + 1, "window_end": p,
            "spikes": [sid, f"r<1>/grad_norm/{p}"],
            "peaks": [{"metric": "train_loss", "step": p, "value": 9.0}, {"metric": "grad_norm", "step": p,
                                                                          "value": 166666666.7}],
            "reason": f"400 of 1024 rows anomalous on {FAMILY_NAMES[i % len(FAMILY_NAMES)]} " + HOSTILE[1][:60],
            "model_verdict": "data", "model_reason": "a few rows carry the excess loss", "model_step": p,
            "model_baseline": "preceding:16", "excess_loss": 1.5, "excess_z": 40.0, "flagged_share": 0.8,
            "flagged_share_lo": 0.7, "flagged_share_hi": 0.9, "breadth": 0.1, "breadth_lo": 0.0, "breadth_hi": 0.2,
            "n_loss_outliers": 30, "flag_precision": 0.9, "flag_recall": 0.8})
        for s in range(p - window + 1, p + 1):
            bs.append({"step": s, "role": "window", "spike_id": sid, "n_rows": 1024, "n_tokens": 4_194_304,
                       "evidence": 300.0, "p_value": 1 / 201, "families": _families(rng, 30.0, 300.0), "signals": []})
        for k in range(flags_per_event):
            flags.append({"shard": f"shard-{k % 7}.parquet", "row": int(rng.integers(0, 10**9)), "row_end": 0,
                          "unit": "row", "step": p - k % window, "spike_id": sid, "signals": FAMILY_NAMES[:12],
                          "score": float(rng.random() * 300), "natural_rate": 1e-4,
                          "excerpt": HOSTILE[k % len(HOSTILE)][:300]})
        for role, ss in (("baseline", range(p - window - 16, p - window + 1)), ("window", range(p - window + 1, p + 1))):
            for s in ss:
                n = loss_rows_per_step
                lrows["spike_id"] += [sid] * n
                lrows["step"].append(np.full(n, s))
                lrows["role"] += [role] * n
                lrows["position"].append(np.arange(n))
                lrows["shard"] += ["shard-0.parquet"] * n
                lrows["row"].append(np.arange(n))
                x = rng.normal(3, 0.3, n)
                lrows["loss"].append(x)
                lrows["z"].append((x - 3) / 0.3)
                lrows["flagged"].append(rng.random(n) < 0.05)
                lrows["outlier"].append(x > 3.6)
    cat = {k: (np.concatenate(v) if v and isinstance(v[0], np.ndarray) else v) for k, v in lrows.items()}
    tables = {"verdicts": VERDICTS.from_pylist(verdicts), "batch_scores": BATCH_SCORES.from_pylist(bs),
              "row_flags": ROW_FLAGS.from_pylist(flags), "loss_rows": LOSS_ROWS.from_arrays(cat),
              "shard_scores": _shard_scores(rng, 1000, run=True)}
    cfg = SimpleNamespace(log="runs/<r1>/train.log", manifest="m.parquet", shards="s3://b/" + "d" * 300,
                          metric="train_loss")
    return loss, SPIKES.from_pylist(spikes), tables, cfg


def _shard_scores(rng, n: int, run: bool = False):
    """SHARD_SCORES of ``n`` shards, built from arrays (a dict per shard and signal would take seconds at 10,000)."""
    import pyarrow as pa

    from spike_audit.schemas.tables import EVIDENCE_STRUCT, SIGNAL_STRUCT

    score = np.sort(np.minimum(rng.exponential(2.0, n), 300.0))[::-1]
    score[: min(n, 3)] = [300.0, 166666666.7 % 300, 120.5][: min(n, 3)]
    names = [f"corpus/part-{i:06d}" + ("-<b>" + "w" * 120 if i % 997 == 0 else "") + ".parquet" for i in range(n)]
    k = len(SIGNAL_NAMES)
    z = rng.standard_t(2, (n, k))
    z[0] *= 1e7
    value = np.where(np.arange(k)[None, :] == 0, 166666666.7 * np.abs(z), z)
    sig = pa.StructArray.from_arrays([pa.array(np.tile(SIGNAL_NAMES, n)), pa.array(value.ravel()),
                                      pa.array(z.ravel())], fields=list(SIGNAL_STRUCT))
    signals = pa.ListArray.from_arrays(pa.array(np.arange(n + 1) * (0 if run else k), pa.int32()),
                                       sig.slice(0, 0) if run else sig)
    nf = 8
    fam = pa.StructArray.from_arrays([pa.array(np.tile(FAMILY_NAMES[:nf], n)), pa.array(np.full(n * nf, 40)),
                                      pa.array(rng.random(n * nf)), pa.array(rng.random(n * nf) * 0.1),
                                      pa.array(np.repeat(score, nf))], fields=list(EVIDENCE_STRUCT))
    families = pa.ListArray.from_arrays(pa.array(np.arange(n + 1) * nf, pa.int32()), fam)
    cols = {"shard": names, "rank": np.arange(1, n + 1), "anomaly_score": score, "top_signal": [FAMILY_NAMES[0]] * n,
            "top_rows": np.full(n, 40), "natural_rate": np.full(n, 1e-3),
            "reason": [f"40 of 1000 rows on {FAMILY_NAMES[0]} (natural rate 0.1%, e={x:.1f})" for x in score],
            "n_rows": np.full(n, 1000), "n_tokens": np.full(n, 166666666), "fingerprint": [None] * n,
            "families": families, "signals": signals}
    return SHARD_SCORES.from_arrays(cols)


def shard_case(n_shards: int = 10_000, n_clusters: int = 5_000, seed: int = 0):
    """(tables, bad, cfg, excerpts, quarantine, cluster_text) for ``render_shard_report``."""
    rng = np.random.default_rng(seed)
    table = _shard_scores(rng, n_shards)
    names = table.column("shard").to_pylist()
    size = rng.integers(2, 60, n_clusters)
    cl = np.repeat(np.arange(n_clusters), size)
    member = rng.integers(0, n_shards, len(cl))
    n_sh = np.array([len(set(m.tolist())) for m in np.split(member, np.cumsum(size)[:-1])])
    d = {"cluster_id": [f"{c:016x}" for c in cl.tolist()], "kind": np.where(cl % 2 == 1, "exact", "near").tolist(),
         "shard": [names[m] for m in member.tolist()], "row": rng.integers(0, 10**6, len(cl)),
         "n_members": size[cl], "n_shards": n_sh[cl]}
    tables = {"shard_scores": table, "duplicates": DUPLICATES.from_arrays(d)}
    bad = [{"shard": f"broken-{i}<i>.parquet", "error": "not a Parquet file " + "\\" * 200} for i in range(300)]
    q = {"threshold_evidence": 7.2, "shards": [{"shard": s} for s in names[:40]]}
    excerpts = {s: [{"row": 12, "text": HOSTILE[k % len(HOSTILE)], "signals": FAMILY_NAMES[:3], "score": 300.0}
                    for k in range(3)] for s in names[:15]}
    cluster_text = {f"{c:016x}": HOSTILE[c % len(HOSTILE)] for c in range(0, n_clusters, 3)}
    cfg = SimpleNamespace(inputs=["s3://bucket/corpus/<all>/"], min_rows=2)
    return tables, bad, cfg, excerpts, q, cluster_text
