"""Scheduled mode: the state a rerun starts from (tables, controls, audited spikes, an inputs fingerprint),
loaded, merged with a run's new tables, and saved."""

from __future__ import annotations

import hashlib
import json
import logging
import os
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
    for k, unset in (("step_key", None), ("value_key", None), ("tag", None), ("pattern", None), ("strict", False),
                     ("run", None), ("baseline", None)):  # options added later: as before they existed when unset
        if d.get(k) == unset:
            d.pop(k, None)
    for k in ("manifest", "shards", "tokenizer", "row_losses", "baseline"):  # the same files however spelled
        if d.get(k):
            d[k] = _resolved(d[k])
    d["input_files"] = [[_resolved(f[0]), *f[1:]] for f in _input_files(cfg)]
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _resolved(path: str) -> str:
    """A local path made absolute, links resolved (a scheduled job runs from another directory than the first
    run, or names the inputs through a link); URLs as given."""
    from spike_audit.pipelines import fs

    return path if fs.is_url(path) else os.path.realpath(path)


def _input_files(cfg: RunConfig) -> list:
    """(path, bytes, modification time) of the manifest, the tokenizer and every file under the shard root: the
    same paths with other contents (a rebuilt manifest, a replaced or removed shard) make another state, so the
    audited events are judged again instead of kept stale. The log is not in it: it grows between reruns."""
    from spike_audit.pipelines import fs

    out = []
    for path in (cfg.manifest, cfg.tokenizer, cfg.row_losses):
        if path and fs.exists(path) and not fs.isdir(path):
            out.extend(list(f) for f in fs.list_files_or_file(path))
    if cfg.shards and fs.exists(cfg.shards):
        out.extend(list(f) for f in fs.list_files_or_file(cfg.shards))
    return out


STATE_VERSION = 1


def load_state(state_dir: str | None, cfg: RunConfig) -> dict | None:
    """The state a rerun starts from, validated: ``state.json`` (version, fingerprint, controls, audited
    spikes) and one Parquet table per output, each conformed to its schema. A corrupt or foreign state is a
    one-line error naming the file; state made with other settings is ignored with a warning."""
    from spike_audit.pipelines.errors import UserError
    from spike_audit.schemas import SchemaError

    if not state_dir:
        return None
    p = Path(state_dir) / "state.json"
    if not p.exists():
        return None
    try:
        st = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{p}: not a spike-audit run state ({' '.join(str(err).split())})") from None
    except OSError as err:
        raise UserError(f"{p}: cannot read the run state ({err.strerror or err})") from None
    if not isinstance(st, dict) or st.get("version") != STATE_VERSION:
        got = st.get("version") if isinstance(st, dict) else type(st).__name__
        raise UserError(f"{p}: run state version {got!r}, expected {STATE_VERSION}")
    if not (isinstance(st.get("fingerprint"), str) and isinstance(st.get("controls"), list)
            and all(type(c) is int for c in st["controls"]) and isinstance(st.get("spikes_done"), list)
            and all(isinstance(x, str) for x in st["spikes_done"])):
        raise UserError(f"{p}: expected fingerprint (string), controls (integer steps) and spikes_done (strings)")
    if st.get("fingerprint") != _inputs_fingerprint(cfg):
        log.warning("state in %s was made with other settings or inputs; auditing everything again", state_dir)
        return None
    tables = {}
    for spec in OUTPUT_SPECS:
        f = Path(state_dir) / f"{spec.name}.parquet"
        if not f.exists():
            raise UserError(f"{f}: missing from the run state (state.json lists audited spikes)")
        try:
            tables[spec.name] = spec.conform(pq.read_table(f), source=str(f))
        except SchemaError:
            raise
        except (OSError, pa.ArrowException) as err:
            raise UserError(f"{f}: not a readable {spec.name} table ({' '.join(str(err).split())[:300]})") from None
    st["tables"] = tables
    from spike_audit.pipelines.run.control_cache import check_entry

    st["control_cache"] = check_entry(st.get("control_cache"), state_dir)
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


def save_state(st_dir, cfg: RunConfig, tables, plan: Plan, state, stage=None, cache_used: bool = False) -> None:
    """Publish the new state as one version of the (locked) state directory: one atomic step. ``stage``: where
    this run's pipeline wrote the control steps' scores (:mod:`.control_cache`); ``cache_used``: the kept ones
    stood for them (carried into the new version)."""
    from spike_audit.pipelines.io import write_json, write_table
    from spike_audit.pipelines.outdir import os_error
    from spike_audit.pipelines.run.control_cache import save_cache

    controls = state["controls"] if state is not None else plan.controls
    files = (stage if stage is not None else st_dir.stage()) / "files"
    try:
        files.mkdir()
        for spec in OUTPUT_SPECS:
            write_table(tables[spec.name], files / f"{spec.name}.parquet", spec)
        old = state.get("control_cache") if state is not None else None
        entry = save_cache(files, stage, cfg.state, old, cache_used, plan.controls, bool(cfg.baseline))
        if entry is None and old is not None:  # nothing read now (no new spike): the kept scores stay
            entry = save_cache(files, None, cfg.state, old, True, plan.controls, bool(cfg.baseline))
        doc = {"version": STATE_VERSION, "fingerprint": _inputs_fingerprint(cfg),
               "controls": sorted(int(c) for c in controls),
               "spikes_done": sorted(tables["verdicts"].column("spike_id").to_pylist())}
        if entry is not None:
            doc["control_cache"] = entry
        write_json(doc, files / "state.json")
    except OSError as err:
        raise os_error(cfg.state, err, "cannot write the new state (the previous state is intact)") from None
    st_dir.publish(files)
