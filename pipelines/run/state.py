"""Scheduled mode: the state a rerun starts from (tables, controls, audited spikes, an inputs fingerprint),
loaded, merged with a run's new tables, and saved."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from spike_audit.schemas import BATCH_SCORES, SHARD_SCORES
from spike_audit.pipelines.run.outputs import OUTPUT_SPECS
from spike_audit.pipelines.run.plan import Plan, RunConfig


log = logging.getLogger(__name__)


def _inputs_fingerprint(cfg: RunConfig) -> str:
    d = asdict(cfg)
    for k in ("log", "out", "state", "replay_pack"):
        d.pop(k, None)
    for k in ("row_losses", "row_losses_first_step", "loss_baseline"):  # unset: as before they existed
        if d.get("row_losses") is None:
            d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def load_state(state_dir: str | None, cfg: RunConfig) -> dict | None:
    if not state_dir:
        return None
    p = Path(state_dir) / "state.json"
    if not p.exists():
        return None
    st = json.loads(p.read_text())
    if st.get("fingerprint") != _inputs_fingerprint(cfg):
        log.warning("state in %s was made with other settings or inputs; auditing everything again", state_dir)
        return None
    tables = {}
    for spec in OUTPUT_SPECS:
        f = Path(state_dir) / f"{spec.name}.parquet"
        tables[spec.name] = pq.read_table(f) if f.exists() else spec.empty()
    st["tables"] = tables
    return st


def merge_with_state(state, new_tables, done):
    if state is None:
        return new_tables
    out = {}
    for spec in OUTPUT_SPECS:
        old = state["tables"][spec.name]
        if "spike_id" in old.column_names and spec is not SHARD_SCORES:
            keep = pc.is_in(old.column("spike_id"), value_set=pa.array(sorted(done), pa.string()))
            if spec is BATCH_SCORES:
                keep = pc.or_(keep, pc.equal(old.column("role"), "control"))
                new = new_tables[spec.name].filter(pc.equal(new_tables[spec.name].column("role"), "window"))
            else:
                new = new_tables[spec.name]
            old = old.filter(pc.fill_null(keep, False))
        else:
            new = new_tables[spec.name]
            if spec is SHARD_SCORES and new.num_rows == 0:
                new = old
            old = old.slice(0, 0)
        out[spec.name] = spec.sorted(pa.concat_tables([spec.conform(old), spec.conform(new)]))
    return out


def save_state(cfg: RunConfig, tables, plan: Plan, state) -> None:
    from spike_audit.pipelines.io import AtomicDir, write_json, write_table

    controls = state["controls"] if state is not None else plan.controls
    with AtomicDir(cfg.state) as stage:
        for spec in OUTPUT_SPECS:
            write_table(tables[spec.name], stage / f"{spec.name}.parquet", spec)
        write_json({"fingerprint": _inputs_fingerprint(cfg), "controls": sorted(controls),
                    "spikes_done": sorted(tables["verdicts"].column("spike_id").to_pylist())}, stage / "state.json")
