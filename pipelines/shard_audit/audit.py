"""``run_shard_audit``: discover, check, run the graph, publish the tables, quarantine, summary and report
atomically, and update the state."""

from __future__ import annotations

import glob
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
import numpy as np
import pyarrow as pa

from spike_audit.pipelines.errors import UserError
from spike_audit.schemas import DUPLICATES, ROW_FLAGS, SHARD_SCORES
from spike_audit.pipelines.shard_audit.config import ShardAuditConfig, resolve_tokens, token_summary
from spike_audit.pipelines.shard_audit.discover import check_shards, discover
from spike_audit.pipelines.shard_audit.graph import build_pipeline
from spike_audit.pipelines.shard_audit.outputs import cluster_texts, shard_quarantine
from spike_audit.pipelines.shard_audit.state import _load_index, _old_parts, _save_state, _settings_key


log = logging.getLogger(__name__)


@dataclass
class ShardAuditResult:
    out: Path
    tables: dict[str, pa.Table]
    n_shards: int
    n_scanned: int
    n_tokens_scanned: int
    bad: list[dict]
    seconds: float
    empty: list[str] = ()  # shards with 0 rows: listed, not scored


def _prepare(cfg: ShardAuditConfig):
    """Discover the shards and split them by the state into kept (unchanged) and to read."""
    shards = discover(cfg.inputs, cfg.root, cfg.allow_outside_root)
    index = _load_index(cfg.state)
    if index and index.get("settings") != _settings_key(cfg):
        log.warning("state in %s was made with other settings; auditing every shard again", cfg.state)
        index = {}
    stored = index.get("shards", {})
    keep = frozenset((s.name, s.fingerprint) for s in shards
                     if stored.get(s.name, {}).get("fingerprint") == s.fingerprint)
    kept_names = {n for n, _ in keep}
    new = [s for s in shards if s.name not in kept_names]
    return shards, stored, keep, kept_names, new


def plan_shard_audit(cfg: ShardAuditConfig) -> dict:
    """What :func:`run_shard_audit` would do, without opening any shard (``shards --dry-run``): the shards found,
    which the state keeps, and the bytes to read."""
    cfg = resolve_tokens(cfg)
    ref = None
    if cfg.baseline:  # a bad baseline fails the dry run too
        from spike_audit.pipelines.beam.baseline import load_baseline

        ref = _reference_summary(load_baseline(cfg.baseline, cfg))
    shards, _, keep, kept_names, new = _prepare(cfg)
    return {"reference": ref or _reference_summary(None), "save_baseline": cfg.save_baseline,"n_shards": len(shards), "n_to_read": len(new), "n_unchanged": len(keep),
            "bytes_total": sum(s.size for s in shards), "bytes_to_read": sum(s.size for s in new),
            "state": cfg.state,
            "shards": [{"shard": s.name, "path": s.path, "size_bytes": s.size, "read": s.name not in kept_names}
                       for s in shards]}


def run_shard_audit(cfg: ShardAuditConfig, beam_args: list[str] | None = None) -> ShardAuditResult:
    """The shard audit. ``--out`` and ``--state`` are checked against every input, created, marked and
    locked first; the new output is published in one atomic step (:mod:`spike_audit.pipelines.outdir`)."""
    from contextlib import ExitStack

    from spike_audit.pipelines.beam.options import beam_options
    from spike_audit.pipelines import fs
    from spike_audit.pipelines.io import RemoteOut
    from spike_audit.pipelines.outdir import OutDir, check_apart

    t0 = time.time()
    flags = beam_options(beam_args)  # first: a misspelled option fails before any work
    cfg = resolve_tokens(cfg)
    given = [("input", i) for i in cfg.inputs if not glob.has_magic(i)] + [("shard root", cfg.root)]
    if cfg.baseline and cfg.save_baseline:
        raise UserError("--baseline and --save-baseline: give one (save a baseline from a trusted corpus, then judge "
                        "new shards against it)")
    bl = None
    if cfg.baseline:  # validated before anything is created
        from spike_audit.pipelines.beam.baseline import load_baseline

        bl = load_baseline(cfg.baseline, cfg)
        given = given + [("baseline", cfg.baseline)]
    check_apart(cfg.out, given + [("state directory", cfg.state), ("baseline", cfg.save_baseline)])
    if cfg.state:
        check_apart(cfg.state, given + [("output directory", cfg.out), ("baseline", cfg.save_baseline)],
                    flag="--state")
    shards = discover(cfg.inputs, cfg.root, cfg.allow_outside_root)
    found = [("shard", s.path) for s in shards]
    with ExitStack() as stack:
        out = stack.enter_context(RemoteOut(cfg.out) if fs.is_url(cfg.out) else
                                  OutDir(cfg.out, "shards", given + found + [("state directory", cfg.state),
                                                                           ("baseline", cfg.save_baseline)]))
        st = None
        if cfg.state:
            st = stack.enter_context(OutDir(cfg.state, "shards-state", given + found + [("output directory", cfg.out),
                                                                                     ("baseline", cfg.save_baseline)],
                                            flag="--state"))
        sb = None
        if cfg.save_baseline:
            sb = stack.enter_context(OutDir(cfg.save_baseline, "baseline", given + found + [
                ("output directory", cfg.out), ("state directory", cfg.state)], flag="--save-baseline"))
        return _audit(cfg, flags, shards, out, st, t0, beam_args, baseline=bl, save=sb)


def _audit(cfg: ShardAuditConfig, flags, shards, out, st, t0: float, beam_args=None, baseline=None,
           save=None) -> ShardAuditResult:
    from apache_beam.options.pipeline_options import PipelineOptions

    from spike_audit.pipelines.beam.runner import run_pipeline
    from spike_audit.pipelines.beam.sink import collect_tables
    from spike_audit.pipelines.io import write_json, write_table, write_text
    from spike_audit.pipelines.outdir import os_error
    from spike_audit.pipelines.progress import Progress
    from spike_audit.pipelines.report.shard_page import render_shard_report
    from spike_audit.pipelines.settings import write_done_marker, write_run_metadata

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
    with Progress("shards: checking", total_shards=len(new)):
        good, bad = check_shards(new, cfg)
    if bad and not cfg.skip_bad:
        first = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        named = first["shard"] in first["error"]  # the reader's message names the file already
        raise UserError(f"{'' if named else first['shard'] + ': '}{first['error']}{more}; --skip-bad audits the "
                        f"others and lists these")
    for b in bad:
        log.warning("skipping unreadable shard %s: %s", b["shard"], b["error"])
    # A shard with no rows has nothing to score: it is listed (summary.json, the command's output), not lost.
    empty = sorted(s.name for s, n, _ in good if n == 0)
    for name in empty:
        log.warning("shard %s has 0 rows: listed as empty, not scored", name)
    todo = [(s, n) for s, n, _ in good if n != 0]  # n None: EOS-delimited documents, counted by the pipeline
    names = sorted(kept_names | {s.name for s, _ in todo})
    if not names:
        raise UserError("no readable shards to audit" + (f" ({len(empty)} empty: {', '.join(empty[:5])})"
                                                          if empty else ""))
    run_id = uuid.uuid4().hex[:12]
    stage = out.stage()
    parts = stage / "parts"
    state_stage = st.stage() if st is not None else None  # state parts land in the state's own file system
    opts = PipelineOptions(flags)
    if not any(f.split("=")[0] in ("--pipeline_type_check", "--no_pipeline_type_check") for f in flags):
        from apache_beam.options.pipeline_options import TypeOptions

        # Beam's construction-time type inference costs about half of building this graph (0.5 CPU s) and checks
        # nothing the graph relies on (its elements are tuples of arrays; every coder is Beam's generic one)
        opts.view_as(TypeOptions).pipeline_type_check = False
    old_parts = _old_parts(cfg.state, {stored[n]["run"] for n, _ in keep}, index.get("runs")) if cfg.state else {}
    roots = {k: str(state_stage) for k in ("state_accs", "state_keys")} if state_stage is not None else {}
    save_stage = save.stage() if save is not None else None
    if save_stage is not None:
        from spike_audit.pipelines.beam.baseline import HASH_KIND

        roots[HASH_KIND] = str(save_stage)
    known = [n for _, n in todo]
    with Progress("shards: reading", total_rows=sum(known) if None not in known else None, total_shards=len(todo),
                  total_bytes=sum(s.size for s, _ in todo)):
        run_pipeline(lambda p: build_pipeline(p, cfg, todo, old_parts, keep, names, str(parts), roots,
                                              baseline=baseline, paths={s.name: s.path for s in shards}),
                     opts, where=cfg.out)
    tables = collect_tables(str(parts), (SHARD_SCORES, DUPLICATES, ROW_FLAGS))
    counts = _baseline_counts(parts) if save is not None else None  # before publishing removes the parts
    n_tokens = int(sum(r["n_tokens"] for r in tables["shard_scores"].to_pylist() if r["shard"] in
                       {s.name for s, _ in todo}))
    q = shard_quarantine(tables["shard_scores"], bad, cfg.alpha, cfg.min_rows)
    files = stage / "files"
    try:
        files.mkdir()
        write_table(tables["shard_scores"], files / "shard_scores.parquet", SHARD_SCORES)
        write_table(tables["duplicates"], files / "duplicates.parquet", DUPLICATES)
        write_table(tables["row_flags"], files / "row_flags.parquet", ROW_FLAGS)
        write_json(q, files / "quarantine.json")
        write_text(render_shard_report(tables, bad, cfg, {}, q,
                                       cluster_texts(tables["duplicates"], shards, cfg)),
                   files / "report.html")
        # no timings here: the outputs of identical inputs are byte-identical (the command prints the time)
        write_json({"shards": len(names), "scanned": len(todo), "from_state": len(keep), "bad": bad,
                    "empty": [{"shard": n, "n_rows": 0} for n in empty],
                    "tokens_scanned": n_tokens, "tokens": token_summary(cfg),
                    "reference": _reference_summary(baseline)}, files / "summary.json")
        write_run_metadata(files, "shards", cfg, [("shards", i) for i in cfg.inputs],
                           beam_args)
        write_done_marker(files, time.time() - t0)
    except OSError as err:
        raise os_error(cfg.out, err, "cannot write the new output (the previous output is intact)") from None
    out.publish(files)
    if save is not None:
        _save_baseline(cfg, save, save_stage, counts, len(names))
    if st is not None:
        _save_state(cfg, state_stage, run_id, names, {s.name: s.fingerprint for s in shards}, keep, stored,
                    index.get("runs"))
    return ShardAuditResult(Path(cfg.out), tables, len(names), len(todo), n_tokens, bad, time.time() - t0, empty)


def _reference_summary(baseline) -> dict:
    """What the shards were judged against (``summary.json``): each other, or a saved baseline."""
    if baseline is None:
        return {"kind": "leave-one-out", "baseline": None}
    m = baseline.meta
    return {"kind": "baseline", "baseline": baseline.path, "baseline_shards": m["shards"], "baseline_rows": m["rows"],
            "baseline_tokens": m.get("tokens"), "baseline_tool_version": m.get("tool_version")}


def _baseline_counts(parts: Path) -> dict:
    """The corpus counts the pipeline wrote for ``--save-baseline`` (one small record: unigram, reference)."""
    from spike_audit.pipelines import records as rec_io

    found = sorted((parts / "baseline_counts").glob(f"part-*{rec_io.SUFFIX}"))
    recs = [r for p in found for r in rec_io.from_bytes(p.read_bytes(), str(p), "baseline_counts")]
    if len(recs) != 1:
        raise RuntimeError(f"expected one baseline_counts record, got {len(recs)}")
    sig = sorted((parts / "baseline_shard_signals").glob(f"part-*{rec_io.SUFFIX}"))
    shards = [r for p in sig for r in rec_io.from_bytes(p.read_bytes(), str(p), "baseline_shard_signals")]
    return dict(recs[0], shard_signals=shards)


def _save_baseline(cfg: ShardAuditConfig, save, stage: Path, counts: dict, n_shards: int) -> None:
    """``--save-baseline``: the corpus counts and its row-hash parts (moved, never read by the driver) published
    as one version of the baseline directory."""
    from spike_audit.pipelines.beam.baseline import write_baseline
    from spike_audit.pipelines.outdir import os_error

    files = stage / "files"
    try:
        files.mkdir()
        meta = write_baseline(files, stage, counts["unigram"], counts["reference"], n_shards, cfg,
                              counts["shard_signals"])
    except OSError as err:
        raise os_error(cfg.save_baseline, err, "cannot write the baseline (the previous one is intact)") from None
    save.publish(files)
    log.info("baseline saved in %s: %d shards, %d rows, %d tokens", cfg.save_baseline, meta["shards"], meta["rows"],
             meta["tokens"])
