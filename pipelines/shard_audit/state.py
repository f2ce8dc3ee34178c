"""Incremental mode: the state directory's index of fingerprints and the part files of every audited shard's
accumulators and row keys (node ids stored relative to their shard)."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import pickle
import shutil
from dataclasses import asdict
from pathlib import Path
import numpy as np

from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.shard_audit.config import NODE_SHIFT, ShardAuditConfig


def load_state_records(path: str, keep: frozenset):
    """Part file of an earlier run -> its records whose (shard, fingerprint) is still current."""
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as f:
        for rec in pickle.loads(f.read()):
            if (rec["shard"], rec["fingerprint"]) in keep:
                yield rec


def all_fp(names, todo, keep) -> dict:
    out = {n: f for n, f in keep}
    out.update({s.name: s.fingerprint for s, _ in todo})
    return out


def _portable_keys(rec: dict) -> dict:
    """Row keys are stored with node ids relative to their shard (shard indices change between runs)."""
    out = dict(rec)
    mask = (np.int64(1) << NODE_SHIFT) - 1
    out["nodes"] = rec["nodes"] & mask
    out["ne_nodes"] = rec["ne_nodes"] & mask
    return out


def _reindex(rec: dict, shard_index: dict) -> dict:
    out = dict(rec)
    base = np.int64(shard_index[rec["shard"]]) << NODE_SHIFT
    out["nodes"] = rec["nodes"] | base
    out["ne_nodes"] = rec["ne_nodes"] | base
    return out


def _load_index(state: str | None) -> dict:
    if not state:
        return {}
    p = Path(state) / "state.json"
    if not p.exists():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{p}: not a spike-audit state index ({err})") from None


def _settings_key(cfg: ShardAuditConfig) -> str:
    d = asdict(cfg)
    for k in ("inputs", "out", "root", "state", "skip_bad", "quarantine_z", "batch_rows", "buckets"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _old_parts(state: str, run_ids: set[str]) -> dict[str, list[str]]:
    out = {"accs": [], "keys": []}
    for rid in sorted(run_ids):
        for kind in ("accs", "keys"):
            out[kind] += sorted(glob.glob(os.path.join(state, "runs", rid, f"state_{kind}", "part-*.pkl")))
    return out


def _save_state(cfg, staging: Path, run_id: str, names, fingerprints, keep, stored) -> None:
    from spike_audit.pipelines.io import write_json

    state = Path(cfg.state)
    run_dir = state / "runs" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    for kind in ("state_accs", "state_keys"):
        if (staging / kind).exists():
            os.replace(staging / kind, run_dir / kind)  # a rename: no data passes through the driver
    kept = {n for n, _ in keep}
    shards = {n: {"fingerprint": fingerprints[n], "run": stored[n]["run"] if n in kept else run_id} for n in names}
    write_json({"version": 1, "settings": _settings_key(cfg), "shards": shards}, state / "state.json")
    live = {v["run"] for v in shards.values()}
    for d in (state / "runs").iterdir():
        if d.name not in live:
            shutil.rmtree(d, ignore_errors=True)
