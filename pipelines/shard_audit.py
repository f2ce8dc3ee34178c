"""``spike-audit shards``: audit shards without a loss log: which shards are anomalous, and why.

Driver (small work only): expand the inputs to shards, fingerprint them (path, size, modification
time), open each new or changed shard once to check it is readable and has a ``tokens`` or ``text``
column (bad shards are listed; ``--skip-bad`` continues without them, reported), and load the state
index of earlier runs.

Beam pipeline (one pass over new or changed shards, in row chunks of ``batch_rows``):

* per shard, the auditor suite's accumulator (``CombinePerKey``); accumulators of unchanged shards
  come from the state directory, read inside the pipeline;
* the global baseline histogram: every shard's histogram merged (``CombineGlobally``), a side input
  of the per-shard finish, so JS divergence and rare-token share are against the whole corpus;
* robust z of every signal across shards (median/MAD) and the ranking;
* cross-shard exact duplicates: row hashes partitioned into ``buckets`` by hash, grouped
  (``GroupByKey``), groups found with numpy per bucket;
* cross-shard near duplicates: LSH band keys partitioned likewise, candidate pairs verified with
  8-bit MinHash sketches per bucket, then connected components over all verified pairs (min-label
  propagation with pointer jumping, at most ``cc_iterations`` rounds; a warning says if that bound
  stopped it). Hot keys: a bucket group larger than ``max_group`` rows is linked as a star (each
  member to the group's smallest), so no group costs more than linear work.

Incremental (``--state DIR``): the accumulators and row keys of every audited shard are kept in the
state directory as part files (written by the pipeline itself, never through the driver) with an
index of fingerprints. A rerun reads only new or changed shards, takes the others' accumulators and
keys from the state, and so produces exactly the tables a full run would.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import pickle
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.scoring import (concat_parts, entity_scores, finish, make_suite, split_by_bucket, suite_histogram, sum_histograms,
                               to_token_batch, with_cross_dup)
from spike_audit.schemas import DUPLICATES, SHARD_SCORES

log = logging.getLogger(__name__)

SHARD_SUFFIXES = (".parquet", ".pq", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".jsonl.zstd", ".ndjson", ".json.gz",
                  ".arrow", ".npy", ".bin")
NODE_SHIFT = 40  # node id = shard index << 40 | row: 2^40 rows per shard, 2^23 shards


@dataclass(frozen=True)
class ShardAuditConfig:
    inputs: tuple[str, ...]
    out: str
    root: str | None = None
    state: str | None = None
    skip_bad: bool = False
    tokens_col: str = "tokens"
    text_col: str = "text"
    dtype: str | None = None
    batch_rows: int = 4096
    quarantine_z: float = 8.0
    threshold: float = 0.8
    buckets: int = 16
    max_group: int = 1000
    cc_iterations: int = 32
    eos_id: int | None = None
    vocab_size: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class Shard:
    name: str  # relative to the root: the id in every output
    path: str
    size: int
    mtime: float

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.path}\0{self.size}\0{self.mtime!r}".encode()).hexdigest()[:20]


# ----------------------------------------------------------------------------------- discovery


def _is_hf_dir(path: str) -> bool:
    return os.path.isdir(path) and (os.path.exists(os.path.join(path, "dataset_info.json"))
                                    or os.path.exists(os.path.join(path, "state.json")))


def _is_shard_file(path: str) -> bool:
    return path.endswith(SHARD_SUFFIXES) and not os.path.basename(path).startswith(".")


def discover(inputs: tuple[str, ...], root: str | None = None) -> list[Shard]:
    """Expand paths, directories and globs (local, or any Beam FileSystems scheme) into shards."""
    from apache_beam.io.filesystems import FileSystems

    found: dict[str, tuple[int, float]] = {}
    for inp in inputs:
        if "://" in inp:
            res = FileSystems.match([inp])[0].metadata_list
            if not res:
                raise UserError(f"{inp}: matches no file")
            for m in res:
                if _is_shard_file(m.path):
                    found[m.path] = (m.size_in_bytes, float(m.last_updated_in_seconds or 0.0))
            continue
        paths = sorted(glob.glob(inp, recursive=True)) if glob.has_magic(inp) else [inp]
        if not paths:
            raise UserError(f"{inp}: matches no file")
        for p in paths:
            if not os.path.exists(p):
                raise UserError(f"{p}: no such file or directory")
            if _is_hf_dir(p):
                found[os.path.abspath(p)] = _dir_stat(p)
            elif os.path.isdir(p):
                for dirpath, dirnames, filenames in os.walk(p):
                    dirnames.sort()
                    if _is_hf_dir(dirpath):
                        found[os.path.abspath(dirpath)] = _dir_stat(dirpath)
                        dirnames[:] = []
                        continue
                    for f in sorted(filenames):
                        full = os.path.join(dirpath, f)
                        if _is_shard_file(full):
                            st = os.stat(full)
                            found[os.path.abspath(full)] = (st.st_size, st.st_mtime)
            else:
                st = os.stat(p)
                found[os.path.abspath(p)] = (st.st_size, st.st_mtime)
    if not found:
        raise UserError(f"no shards found in {', '.join(inputs)} (looked for {', '.join(SHARD_SUFFIXES)})")
    paths = sorted(found)
    if root is None:
        root = os.path.commonpath([p for p in paths if "://" not in p]) if all("://" not in p for p in paths) else ""
        if len(paths) == 1 or os.path.isfile(root):
            root = os.path.dirname(root)
    shards = []
    for p in paths:
        name = os.path.relpath(p, root) if root and "://" not in p else p
        shards.append(Shard(name, p, found[p][0], found[p][1]))
    return shards


def _dir_stat(path: str) -> tuple[int, float]:
    size, mtime = 0, 0.0
    for dirpath, _, filenames in os.walk(path):
        for f in filenames:
            st = os.stat(os.path.join(dirpath, f))
            size += st.st_size
            mtime = max(mtime, st.st_mtime)
    return size, mtime


def check_shards(shards: list[Shard], cfg: ShardAuditConfig) -> tuple[list[tuple[Shard, int, str]], list[dict]]:
    """Open each shard once: (shard, length, unit) for the good ones, and a list of the bad ones."""
    from spike_audit.pipelines.shards.read import open_shard, read_slices

    good, bad = [], []
    for k, s in enumerate(shards):
        try:
            reader = open_shard(None, s.path, tokens_col=cfg.tokens_col, text_col=cfg.text_col, dtype=cfg.dtype)
            unit = "row" if "row" in reader.units else "token"
            close = getattr(reader, "close", None)
            n = reader.length(unit)
            if close:
                close()
            if unit == "token":
                raise UserError("a flat token file has no rows: audit it through a manifest (spike-audit run) "
                                "or convert it to Parquet/.npy rows")
            if n:
                read_slices(None, s.path, np.array([[0, 1]]), unit=unit, tokens_col=cfg.tokens_col,
                            text_col=cfg.text_col, dtype=cfg.dtype)
            good.append((s, n, unit))
        except UserError as err:
            bad.append({"shard": s.name, "error": str(err)})
        except Exception as err:  # unreadable file: report it, do not crash on the first one
            bad.append({"shard": s.name, "error": f"{type(err).__name__}: {err}".splitlines()[0]})
        if (k + 1) % 100 == 0:
            log.info("checked %d/%d shards", k + 1, len(shards))
    return good, bad


# ------------------------------------------------------------------------------- pipeline parts


class ReadChunk:
    """(shard_name, path, start, end, n_rows) -> (shard_name, RecordBatch) with the shard's name in
    `shard`; logs each shard as its last chunk is read (progress of long runs)."""

    def __init__(self, tokens_col: str, text_col: str, dtype: str | None):
        self.tokens_col, self.text_col, self.dtype = tokens_col, text_col, dtype

    def __call__(self, item):
        from spike_audit.pipelines.shards.read import read_slices

        name, path, start, end, n = item
        rb = read_slices(None, path, np.array([[start, end]], dtype=np.int64), unit="row",
                         tokens_col=self.tokens_col, text_col=self.text_col, dtype=self.dtype)
        rb = rb.set_column(rb.schema.get_field_index("shard"), "shard", pa.array([name] * rb.num_rows, pa.string()))
        if end == n:
            log.info("read shard %s (%d rows)", name, n)
        else:
            log.debug("read %s rows %d..%d of %d", name, start, end, n)
        return name, rb


def row_keys(name_rb, shard_index: dict, cfg_dict: dict) -> dict:
    """Per chunk, vectorised: node ids, exact row hashes, LSH band keys and 8-bit MinHash sketches."""
    from spike_audit.auditors.dedup import row_hashes
    from spike_audit.auditors.minhash import band_keys, signatures

    name, rb = name_rb
    tb = to_token_batch(rb, cfg_dict["tokens_col"], cfg_dict["text_col"])
    nodes = (np.int64(shard_index[name]) << NODE_SHIFT) | np.asarray(rb.column("row"), dtype=np.int64)
    ne = tb.lengths > 0
    h = row_hashes(tb, cfg_dict["seed"])
    sig = signatures(tb, seed=cfg_dict["seed"])[ne]
    return {"shard": name, "nodes": nodes, "hash": h, "ne_nodes": nodes[ne],
            "bands": band_keys(sig, cfg_dict["threshold"], cfg_dict["seed"]), "sketch": (sig & 0xFF).astype(np.uint8)}


def split_exact(rec: dict, buckets: int):
    """Partition a chunk's (hash, node) pairs by hash bucket: one element per non-empty bucket."""
    yield from split_by_bucket(rec["hash"], buckets, rec["hash"], rec["nodes"])


def shard_seen_elsewhere(kv):
    """One exact-hash bucket -> (shard index, rows whose hash another shard shares)."""
    from spike_audit.auditors.dedup import seen_elsewhere

    cols = concat_parts(kv[1])
    if cols is None:
        return
    keys, counts = seen_elsewhere(cols[0], cols[1] >> NODE_SHIFT)
    yield from zip(keys.tolist(), counts.tolist())


def split_bands(rec: dict, buckets: int):
    """Partition a chunk's (LSH band key, node, sketch) triples by band-key bucket."""
    keys, nodes, sk = rec["bands"], rec["ne_nodes"], rec["sketch"]
    if not len(nodes):
        return
    rows = np.repeat(np.arange(len(nodes)), keys.shape[1])
    flat = keys.ravel()
    yield from split_by_bucket(flat, buckets, flat, nodes[rows], sk[rows])


def exact_groups(kv):
    """One hash bucket -> (hash, sorted member nodes) for every hash held by >= 2 rows of >= 2 shards."""
    cols = concat_parts(kv[1])
    if cols is None:
        return
    h, nodes = cols
    order = np.lexsort((nodes, h))
    h, nodes = h[order], nodes[order]
    start = np.flatnonzero(np.r_[True, h[1:] != h[:-1]])
    size = np.diff(np.r_[start, len(h)])
    for s, n in zip(start[size >= 2].tolist(), size[size >= 2].tolist()):  # loop over duplicate groups only
        members = nodes[s : s + n]
        if len(np.unique(members >> NODE_SHIFT)) >= 2:
            yield f"{int(h[s]):016x}", members


def near_pairs(kv, threshold: float):
    """One band bucket -> verified near-duplicate node pairs (lo, hi) as two int64 arrays."""
    from spike_audit.auditors.minhash import near_duplicates

    cols = concat_parts(kv[1])
    if cols is None or len(cols[0]) < 2:
        return
    keys, nodes, sk = cols
    order = np.lexsort((nodes, keys))
    keys, nodes, sk = keys[order], nodes[order], sk[order]
    lo, hi, _ = near_duplicates(keys[:, None], sk, threshold)
    a, b = nodes[lo], nodes[hi]
    ok = a != b
    if ok.any():
        yield "pairs", (np.minimum(a[ok], b[ok]), np.maximum(a[ok], b[ok]))


def cluster_pairs(nodes_pairs, max_iter: int):
    """All verified pairs -> (node ids, cluster label per node), by bounded connected components."""
    from spike_audit.auditors.minhash import components

    cols = concat_parts(nodes_pairs[1])
    if cols is None:
        return
    lo, hi = cols
    uniq, inv = np.unique(np.r_[lo, hi], return_inverse=True)
    lab, converged = components(len(uniq), inv[: len(lo)], inv[len(lo):], max_iter)
    if not converged:
        log.warning("near-duplicate components did not converge in %d rounds: some clusters may be split", max_iter)
    yield uniq, lab


def duplicate_records(kind: str, label_of_members, names: list[str], max_group: int = 1000):
    """(cluster key, member nodes) -> DUPLICATES records for clusters spanning >= 2 shards.

    A hot cluster (more than ``max_group`` members) lists its ``max_group`` smallest members;
    ``n_members`` and ``n_shards`` always count all of them."""
    key, members = label_of_members
    members = np.unique(members)
    all_shards = members >> NODE_SHIFT
    n_shards = len(np.unique(all_shards))
    if n_shards < 2:
        return
    cid = f"{kind}-{int(members[0]):016x}"
    n_members = len(members)
    members = members[:max_group]
    shard_idx = members >> NODE_SHIFT
    rows = members & ((np.int64(1) << NODE_SHIFT) - 1)
    for si, r in zip(shard_idx.tolist(), rows.tolist()):  # members of cross-shard clusters only
        yield "duplicates", {"cluster_id": cid, "kind": kind, "shard": names[si], "row": r,
                             "n_members": n_members, "n_shards": n_shards}


def near_clusters(item, names, max_group: int = 1000):
    uniq, lab = item
    order = np.argsort(lab, kind="stable")
    lab_s, nodes_s = lab[order], uniq[order]
    cuts = np.flatnonzero(np.diff(lab_s)) + 1
    for members in np.split(nodes_s, cuts):
        yield from duplicate_records("near", (None, members), names, max_group)


def load_state_records(path: str, keep: frozenset):
    """Part file of an earlier run -> its records whose (shard, fingerprint) is still current."""
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as f:
        for rec in pickle.loads(f.read()):
            if (rec["shard"], rec["fingerprint"]) in keep:
                yield rec


def build_pipeline(p, cfg: ShardAuditConfig, todo: list[tuple[Shard, int]], old_parts: dict[str, list[str]],
                   keep: frozenset, names: list[str], staging: str):
    import apache_beam as beam
    from apache_beam.pvalue import AsSingleton

    from spike_audit.pipelines.beam_util import AuditorCombineFn, WriteTables

    cfg_dict = {"vocab_size": cfg.vocab_size, "eos_id": cfg.eos_id, "seed": cfg.seed, "threshold": cfg.threshold,
                "tokens_col": cfg.tokens_col, "text_col": cfg.text_col}
    shard_index = {n: i for i, n in enumerate(names)}
    fp = {s.name: s.fingerprint for s, _ in todo}
    chunks = [(s.name, s.path, a, min(a + cfg.batch_rows, n), n) for s, n in todo for a in range(0, n, cfg.batch_rows)]
    tokens_col, text_col = cfg.tokens_col, cfg.text_col

    batches = (p | "Chunks" >> beam.Create(chunks) | "Spread" >> beam.Reshuffle()
               | "Read" >> beam.Map(ReadChunk(cfg.tokens_col, cfg.text_col, cfg.dtype)))
    suite = make_suite(cfg_dict)
    new_accs = (batches | "Tokens" >> beam.MapTuple(lambda k, rb: (k, to_token_batch(rb, tokens_col, text_col)))
                | "AuditShards" >> beam.CombinePerKey(AuditorCombineFn(suite, output="accumulator")))
    old_accs = (p | "OldAccParts" >> beam.Create(old_parts.get("accs", []))
                | "LoadAccs" >> beam.FlatMap(load_state_records, keep)
                | "AccKV" >> beam.Map(lambda r: (r["shard"], r["acc"])))
    accs = (new_accs, old_accs) | "AllAccs" >> beam.Flatten()

    # the corpus baseline: every shard's histogram; each shard is then scored leave-one-out
    hist = (accs | "Hists" >> beam.Map(lambda kv: suite_histogram(kv[1]))
            | "Baseline" >> beam.CombineGlobally(sum_histograms))
    new_keys = batches | "RowKeys" >> beam.Map(row_keys, shard_index, cfg_dict)
    old_keys = (p | "OldKeyParts" >> beam.Create(old_parts.get("keys", []))
                | "LoadKeys" >> beam.FlatMap(load_state_records, keep)
                | "Reindex" >> beam.Map(_reindex, shard_index))
    keys = (new_keys, old_keys) | "AllKeys" >> beam.Flatten()
    exact_buckets = (keys | "ExactBuckets" >> beam.FlatMap(split_exact, cfg.buckets)
                     | "GroupExact" >> beam.GroupByKey())
    seen = (exact_buckets | "SeenElsewhere" >> beam.FlatMap(shard_seen_elsewhere)
            | "SumSeen" >> beam.CombinePerKey(sum)
            | "SeenByName" >> beam.Map(lambda kv, nm: (nm[kv[0]], kv[1]), names))
    finished = (accs | "Finish" >> beam.Map(finish, AsSingleton(hist), cfg_dict, frozenset(), True)
                | "KeyFinished" >> beam.Map(lambda it: (it[0], it)))
    scores = (({"scores": finished, "seen": seen} | "JoinSeen" >> beam.CoGroupByKey()
               | "CrossDup" >> beam.FlatMap(with_cross_dup))
              | "AllShards" >> beam.combiners.ToList()
              | "Rank" >> beam.FlatMap(lambda items, fps: [("shard_scores", dict(r, fingerprint=fps.get(r["shard"])))
                                                           for r in entity_scores(items, "shard")], all_fp(names, todo,
                                                                                                          keep)))

    exact = (exact_buckets
             | "ExactGroups" >> beam.FlatMap(exact_groups)
             | "ExactRecords" >> beam.FlatMap(lambda g, nm, mg: duplicate_records("exact", g, nm, mg), names,
                                              cfg.max_group))
    near = (keys | "BandBuckets" >> beam.FlatMap(split_bands, cfg.buckets)
            | "GroupBands" >> beam.GroupByKey()
            | "NearPairs" >> beam.FlatMap(near_pairs, cfg.threshold)
            | "GroupPairs" >> beam.GroupByKey()
            | "Components" >> beam.FlatMap(cluster_pairs, cfg.cc_iterations)
            | "NearRecords" >> beam.FlatMap(near_clusters, names, cfg.max_group))

    outputs = [scores, exact, near]
    if cfg.state:
        outputs += [
            new_accs | "AccState" >> beam.Map(
                lambda kv, fps: ("state_accs", {"shard": kv[0], "fingerprint": fps[kv[0]], "acc": kv[1]}), fp),
            new_keys | "KeyState" >> beam.Map(
                lambda r, fps: ("state_keys", dict(_portable_keys(r), fingerprint=fps[r["shard"]])), fp),
        ]
    n_parts = max(1, min(64, len(todo)))
    (outputs | "AllOutputs" >> beam.Flatten()
     | "Write" >> WriteTables(staging, parts={"state_accs": n_parts, "state_keys": n_parts, "duplicates": 4}))


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


# ------------------------------------------------------------------------------------ driver


@dataclass
class ShardAuditResult:
    out: Path
    tables: dict[str, pa.Table]
    n_shards: int
    n_scanned: int
    n_tokens_scanned: int
    bad: list[dict]
    seconds: float


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


def run_shard_audit(cfg: ShardAuditConfig, beam_args: list[str] | None = None) -> ShardAuditResult:
    from apache_beam.options.pipeline_options import PipelineOptions

    from spike_audit.pipelines.beam_util import collect_tables, run_pipeline
    from spike_audit.pipelines.io import AtomicDir, write_json, write_table, write_text
    from spike_audit.pipelines.report import render_shard_report
    from spike_audit.pipelines.run import beam_options

    t0 = time.time()
    shards = discover(cfg.inputs, cfg.root)
    index = _load_index(cfg.state)
    if index and index.get("settings") != _settings_key(cfg):
        log.warning("state in %s was made with other settings; auditing every shard again", cfg.state)
        index = {}
    stored = index.get("shards", {})
    keep = frozenset((s.name, s.fingerprint) for s in shards
                     if stored.get(s.name, {}).get("fingerprint") == s.fingerprint)
    kept_names = {n for n, _ in keep}
    new = [s for s in shards if s.name not in kept_names]
    log.info("%d shards: %d unchanged since the last run, %d to read", len(shards), len(keep), len(new))
    good, bad = check_shards(new, cfg)
    if bad and not cfg.skip_bad:
        first = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UserError(f"{first['shard']}: {first['error']}{more}; --skip-bad audits the others and lists these")
    for b in bad:
        log.warning("skipping unreadable shard %s: %s", b["shard"], b["error"])
    todo = [(s, n) for s, n, _ in good]
    names = sorted(kept_names | {s.name for s, _ in todo})
    if not names:
        raise UserError("no readable shards to audit")
    run_id = uuid.uuid4().hex[:12]
    base = Path(cfg.out).resolve().parent
    base.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".spike-audit-staging-", dir=base))
    try:
        opts = PipelineOptions(beam_options(beam_args))
        old_parts = _old_parts(cfg.state, {stored[n]["run"] for n, _ in keep}) if cfg.state else {}
        run_pipeline(lambda p: build_pipeline(p, cfg, todo, old_parts, keep, names, str(staging)), opts)
        tables = collect_tables(str(staging), (SHARD_SCORES, DUPLICATES))
        n_tokens = int(sum(r["n_tokens"] for r in tables["shard_scores"].to_pylist() if r["shard"] in
                           {s.name for s, _ in todo}))
        q = shard_quarantine(tables["shard_scores"], bad, cfg.quarantine_z)
        with AtomicDir(cfg.out) as stage:
            write_table(tables["shard_scores"], stage / "shard_scores.parquet", SHARD_SCORES)
            write_table(tables["duplicates"], stage / "duplicates.parquet", DUPLICATES)
            write_json(q, stage / "quarantine.json")
            write_text(render_shard_report(tables, bad, cfg, excerpts(tables["shard_scores"], shards, cfg)),
                       stage / "report.html")
            write_json({"shards": len(names), "scanned": len(todo), "from_state": len(keep), "bad": bad,
                        "tokens_scanned": n_tokens, "seconds": round(time.time() - t0, 3)}, stage / "summary.json")
        if cfg.state:
            _save_state(cfg, staging, run_id, names, {s.name: s.fingerprint for s in shards}, keep, stored)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ShardAuditResult(Path(cfg.out), tables, len(names), len(todo), n_tokens, bad, time.time() - t0)


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


def shard_quarantine(scores: pa.Table, bad: list[dict], z: float) -> dict:
    rows = [r for r in scores.to_pylist() if r["anomaly_score"] >= z]
    return {"threshold_z": z,
            "shards": [{"shard": r["shard"], "rank": r["rank"], "anomaly_score": r["anomaly_score"],
                        "top_signal": r["top_signal"], "reason": r["reason"]} for r in rows],
            "unreadable": bad}


def excerpts(scores: pa.Table, shards: list[Shard], cfg: ShardAuditConfig, top: int = 8, rows: int = 2) -> dict:
    """The first rows of the most anomalous shards, for the report (bounded: top x rows)."""
    from spike_audit.pipelines.shards.read import read_slices

    paths = {s.name: s.path for s in shards}
    out = {}
    for r in scores.to_pylist()[:top]:
        try:
            rb = read_slices(None, paths[r["shard"]], np.array([[0, rows]]), unit="row", tokens_col=cfg.tokens_col,
                             text_col=cfg.text_col, dtype=cfg.dtype)
        except (UserError, OSError):
            continue
        texts = rb.column("text").to_pylist()
        toks = rb.column("tokens").to_pylist()
        out[r["shard"]] = [t[:300] if t is not None else (" ".join(map(str, k[:60])) if k else "")
                           for t, k in zip(texts, toks)]
    return out
