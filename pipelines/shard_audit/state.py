"""Incremental mode: the state directory's index of fingerprints and the part files of every audited shard's
accumulators and row keys (node ids stored relative to their shard)."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path
import numpy as np

from spike_audit.auditors.rows import FAMILY_NAMES
from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.shard_audit.config import NODE_SHIFT, ShardAuditConfig


log = logging.getLogger(__name__)

STATE_VERSION = 2  # 1: part files were pickles (never read: such a state is audited again)
KINDS = ("state_accs", "state_keys")
_RUN_ID = re.compile(r"^[0-9a-f]{12}$")


def load_state_records(path: str, keep: frozenset):
    """Part file of an earlier run -> its records whose (shard, fingerprint) is still current. Part files are
    data (:mod:`spike_audit.pipelines.records`), validated as they are read; nothing is unpickled."""
    from apache_beam.io.filesystems import FileSystems

    from spike_audit.pipelines import records as rec_io

    kind = os.path.basename(os.path.dirname(path))
    with FileSystems.open(path) as f:
        for rec in rec_io.from_bytes(f.read(), path, kind if kind in KINDS else None):
            if not isinstance(rec, dict) or not {"shard", "fingerprint"} <= rec.keys():
                raise UserError(f"{path}: not a shard-audit state record (expected shard, fingerprint, ...)")
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
        index = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{p}: not a spike-audit state index ({err})") from None
    except OSError as err:
        raise UserError(f"{p}: cannot read the state index ({err.strerror or err})") from None
    if not isinstance(index, dict) or "version" not in index:
        raise UserError(f"{p}: not a spike-audit shard-audit state index (expected a JSON object with a version)")
    if type(index["version"]) is not int:
        raise UserError(f"{p}: state version {index['version']!r}, expected the integer {STATE_VERSION}")
    if index["version"] == 1:
        log.warning("%s: state written by an older spike-audit (pickled parts, never read); auditing every shard "
                    "again", p)
        return {}
    if index["version"] != STATE_VERSION:
        raise UserError(f"{p}: state version {index['version']!r}, expected {STATE_VERSION}")
    shards = index.get("shards")
    if not isinstance(index.get("settings"), str) or not isinstance(shards, dict):
        raise UserError(f"{p}: expected 'settings' (string) and 'shards' (object)")
    for name, e in shards.items():
        if not (isinstance(e, dict) and isinstance(e.get("fingerprint"), str) and isinstance(e.get("run"), str)
                and _RUN_ID.match(e["run"])):
            raise UserError(f"{p}: shard {name!r}: expected {{'fingerprint': str, 'run': 12 hex digits}}, got {e!r}"[:300])
    runs = index.get("runs")  # each run's part files (name, bytes); absent in states written before it was kept
    good = runs is None or (isinstance(runs, dict) and all(
        isinstance(e, dict) and all(k in KINDS and isinstance(v, list) and all(
            isinstance(x, list) and len(x) == 2 and isinstance(x[0], str) and type(x[1]) is int for x in v)
            for k, v in e.items()) for e in runs.values()))
    if not good:
        raise UserError(f"{p}: 'runs' must map each run to its part files ({{'state_accs': [[name, bytes], ...], ...}})")
    return index


#: Bumped when the stored accumulators change form (2: suite accumulator + row-bin histogram per shard; 3: the
#: row signals' definitions changed: copies within a batch counted once, chars_per_token; 4: a shard's exact hashes
#: and MinHash sketches finished into their signals, the compact accumulator of ``graph.compact_acc``; 5: its counts
#: narrowed, the row bins sparse; 6: near copies within the shard counted in it). The row families' names
#: are part of the settings key too, so a histogram is never read with another family layout.
STATE_FORMAT = 6


def _settings_key(cfg: ShardAuditConfig) -> str:
    d = asdict(cfg)
    d["state_format"] = STATE_FORMAT
    d["row_families"] = list(FAMILY_NAMES)
    for k in ("inputs", "out", "root", "state", "skip_bad", "alpha", "min_rows", "batch_rows", "buckets",
              "allow_outside_root", "baseline", "save_baseline"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _part_listing(run_dir: Path) -> dict[str, list]:
    """``{kind: [[file name, bytes], ...]}`` of a run's part files, as the state index records them."""
    from spike_audit.pipelines import records as rec_io

    out = {}
    for kind in KINDS:
        d = run_dir / kind
        files = sorted(glob.glob(os.path.join(glob.escape(str(d)), f"part-*{rec_io.SUFFIX}")))
        out[kind] = [[os.path.basename(f), os.path.getsize(f)] for f in files]
    return out


def _old_parts(state: str, run_ids: set[str], runs: dict | None = None) -> dict[str, list[str]]:
    """The part files of the runs still referenced, each validated (format, version, kind, schema) on the
    driver before the pipeline reads it, and checked against the index's listing of each run's parts (names and
    sizes, where the index has one): a part removed, added or copied would drop or double a shard's records."""
    from spike_audit.pipelines import records as rec_io

    out = {"accs": [], "keys": []}
    for rid in sorted(run_ids):
        listing = (runs or {}).get(rid)
        for kind in ("accs", "keys"):
            if not os.path.isdir(os.path.join(state, "runs", rid)):
                raise UserError(f"{os.path.join(state, 'runs', rid)}: missing from the state directory (the state "
                                "index refers to it)")
            d = os.path.join(state, "runs", rid, f"state_{kind}")
            parts = sorted(glob.glob(os.path.join(glob.escape(d), f"part-*{rec_io.SUFFIX}")))
            for p in parts:  # each part's format first (a pickle in a part's place is named as such)
                rec_io.check_file(p, f"state_{kind}")
            if isinstance(listing, dict):
                want = {n: sz for n, sz in listing.get(f"state_{kind}", [])}
                have = {os.path.basename(p): os.path.getsize(p) for p in parts}
                if have != want:
                    gone = sorted(set(want) - set(have))
                    extra = sorted(set(have) - set(want))
                    changed = sorted(n for n in set(want) & set(have) if want[n] != have[n])
                    what = "; ".join(x for x in (f"missing {gone[:3]}" if gone else "",
                                                 f"not written by spike-audit {extra[:3]}" if extra else "",
                                                 f"changed size {changed[:3]}" if changed else "") if x)
                    raise UserError(f"{d}: the state's part files are not the ones its index lists ({what}); delete "
                                    f"the state directory (or give another --state) to audit every shard again")
            out[kind] += parts
    return out


def _save_state(cfg, staging: Path, run_id: str, names, fingerprints, keep, stored, runs: dict | None = None) -> None:
    """The new run's part files (written by the pipeline into the state directory's own staging) are renamed
    into ``runs/RUN``, then ``state.json`` is replaced atomically (the commit), then runs no shard refers to
    are removed: a kill at any point leaves a consistent state."""
    from spike_audit.pipelines.io import write_json
    from spike_audit.pipelines.outdir import os_error

    state = Path(cfg.state)
    run_dir = state / "runs" / run_id
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for kind in KINDS:
            if (staging / kind).exists():
                os.replace(staging / kind, run_dir / kind)  # a rename: no data passes through the driver
        kept = {n for n, _ in keep}
        shards = {n: {"fingerprint": fingerprints[n], "run": stored[n]["run"] if n in kept else run_id}
                  for n in names}
        live_runs = {v["run"] for v in shards.values()}
        listing = {rid: e for rid, e in (runs or {}).items() if rid in live_runs and rid != run_id}
        if run_id in live_runs:
            listing[run_id] = _part_listing(run_dir)
        write_json({"version": STATE_VERSION, "settings": _settings_key(cfg), "shards": shards, "runs": listing},
                   state / "state.json")
    except OSError as err:
        raise os_error(cfg.state, err, "cannot write the new state (the previous state is intact)") from None
    live = {v["run"] for v in shards.values()}
    for d in (state / "runs").iterdir():
        if d.name not in live:
            shutil.rmtree(d, ignore_errors=True)
