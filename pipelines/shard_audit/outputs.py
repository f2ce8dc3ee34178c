"""The shard audit's derived outputs: the shard quarantine and the text excerpts the report shows."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.shard_audit.config import Shard, ShardAuditConfig


def quarantine_threshold(n_shards: int, alpha: float) -> float:
    """Evidence that quarantines a shard: Bonferroni over the shards, the families and every possible cut,
    ``log10(shards * families * cuts / alpha)`` (conservative under the binomial model)."""
    from spike_audit.auditors.evidence import NBINS
    from spike_audit.auditors.rows import FAMILIES

    ratio = max(1, n_shards) * len(FAMILIES) * (NBINS - 1) / alpha
    if math.isfinite(ratio):
        return float(math.log10(ratio))
    # an alpha so small that the ratio overflows a double (--alpha 1e-320 wrote inf into quarantine.json)
    return math.log10(max(1, n_shards)) + math.log10(len(FAMILIES)) + math.log10(NBINS - 1) - math.log10(alpha)


def is_quarantined(r: dict, threshold: float, min_rows: int) -> bool:
    return r["anomaly_score"] >= threshold and (r["top_rows"] or 0) >= min_rows


def shard_quarantine(scores: pa.Table, bad: list[dict], alpha: float, min_rows: int = 2) -> dict:
    """Shards whose anomalous rows are beyond the corpus' natural rate at ``alpha`` after Bonferroni
    (:func:`quarantine_threshold`), with at least ``min_rows`` such rows (never for one row)."""
    recs = scores.to_pylist()
    t = quarantine_threshold(len(recs), alpha)
    rows = [r for r in recs if is_quarantined(r, t, min_rows)]
    return {"threshold_evidence": t, "rule": f"evidence >= log10(shards x families x cuts / {alpha}), "
                                             f">= {min_rows} anomalous rows",
            "shards": [{"shard": r["shard"], "rank": r["rank"], "anomaly_score": r["anomaly_score"],
                        "top_signal": r["top_signal"], "top_rows": r["top_rows"], "n_rows": r["n_rows"],
                        "natural_rate": r["natural_rate"], "reason": r["reason"]} for r in rows],
            "unreadable": bad}


def cluster_texts(dups: pa.Table, shards: list[Shard], cfg: ShardAuditConfig, top: int = 20) -> dict[str, str]:
    """One member's text for each of the ``top`` largest duplicate clusters (the report's cluster table; bounded:
    one row read per cluster; token-only rows decoded with the tokenizer when there is one)."""
    import pyarrow.compute as pc

    from spike_audit.pipelines.shards.read import read_slices

    if dups.num_rows == 0:
        return {}
    summary = dups.group_by(["cluster_id"]).aggregate([("n_members", "max")])
    ids = summary.sort_by([("n_members_max", "descending"), ("cluster_id", "ascending")]).column("cluster_id")[:top]
    first = (dups.filter(pc.is_in(dups.column("cluster_id"), value_set=ids.combine_chunks()))
             .sort_by([("cluster_id", "ascending"), ("shard", "ascending"), ("row", "ascending")]).to_pylist())
    member: dict[str, dict] = {}
    for m in first:  # bounded: the top clusters' members
        member.setdefault(m["cluster_id"], m)
    tok = None
    if cfg.tokenizer:
        from spike_audit.pipelines.tokenizer import load_tokenizer

        tok = load_tokenizer(cfg.tokenizer)
    paths = {s.name: s.path for s in shards}
    out = {}
    for cid, m in sorted(member.items()):
        if m["shard"] not in paths:
            continue
        try:
            rb = read_slices(None, paths[m["shard"]], np.array([[m["row"], m["row"] + 1]]), unit="row",
                             tokens_col=cfg.tokens_col, text_col=cfg.text_col, dtype=cfg.dtype, rows=cfg.flat_rows)
            if tok is not None:
                from spike_audit.pipelines.beam.read import fill_text

                rb = fill_text(rb, tok, m["shard"])
        except (UserError, OSError, ValueError, RuntimeError):
            continue
        if rb.num_rows:
            t, k = rb.column("text")[0].as_py(), rb.column("tokens")[0].as_py()
            out[cid] = t[:300] if t is not None else (" ".join(map(str, k[:60])) if k else "")
    return out
