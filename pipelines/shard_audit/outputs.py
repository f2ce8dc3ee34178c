"""The shard audit's derived outputs: the shard quarantine and the text excerpts the report shows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.shard_audit.config import Shard, ShardAuditConfig


def shard_quarantine(scores: pa.Table, bad: list[dict], z: float) -> dict:
    rows = [r for r in scores.to_pylist() if r["anomaly_score"] >= z]
    return {"threshold_z": z,
            "shards": [{"shard": r["shard"], "rank": r["rank"], "anomaly_score": r["anomaly_score"],
                        "top_signal": r["top_signal"], "reason": r["reason"]} for r in rows],
            "unreadable": bad}


def excerpts(scores: pa.Table, shards: list[Shard], cfg: ShardAuditConfig, top: int = 8, rows: int = 2) -> dict:
    """The first rows of the most anomalous shards, for the report (bounded: top x rows; token-only rows
    decoded with the tokenizer when there is one)."""
    from spike_audit.pipelines.shards.read import read_slices

    tok = None
    if cfg.tokenizer:
        from spike_audit.pipelines.tokenizer import load_tokenizer

        tok = load_tokenizer(cfg.tokenizer)
    paths = {s.name: s.path for s in shards}
    out = {}
    for r in scores.to_pylist()[:top]:
        try:
            rb = read_slices(None, paths[r["shard"]], np.array([[0, rows]]), unit="row", tokens_col=cfg.tokens_col,
                             text_col=cfg.text_col, dtype=cfg.dtype, rows=cfg.flat_rows)
            if tok is not None:
                from spike_audit.pipelines.beam.read import fill_text

                rb = fill_text(rb, tok, r["shard"])
        except (UserError, OSError):
            continue
        texts = rb.column("text").to_pylist()
        toks = rb.column("tokens").to_pylist()
        out[r["shard"]] = [t[:300] if t is not None else (" ".join(map(str, k[:60])) if k else "")
                           for t, k in zip(texts, toks)]
    return out
