"""``run_audit``: plan, run the graph, merge with state, publish the tables, skip list, quarantine, summary
and report atomically."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
import numpy as np
import pyarrow as pa

from spike_audit.pipelines.errors import UserError
from spike_audit.schemas import LOSS_ROWS, SPIKES
from spike_audit.pipelines.beam.options import beam_options
from spike_audit.pipelines.run.graph import build_pipeline
from spike_audit.pipelines.run.outputs import OUTPUT_SPECS, control_calibration, quarantine, skip_list
from spike_audit.pipelines.run.plan import (RunConfig, join_steps, plan_audit, read_loss_and_spikes, resolve_tokens,
                                            token_summary)
from spike_audit.pipelines.run.state import load_state, merge_with_state, save_state


log = logging.getLogger(__name__)


@dataclass
class RunResult:
    out: Path
    tables: dict[str, pa.Table]
    n_spikes: int
    n_new_spikes: int  # events audited in this run (an event: the spikes of every metric within a few steps)
    n_tokens: int
    seconds: float
    summary: dict | None = None


def _prepare(cfg: RunConfig):
    """The driver's small work before any shard is read: the log, its spikes, the state, the plan."""
    from spike_audit.pipelines import fs

    for path, what in ((cfg.log, "log"), (cfg.manifest, "manifest"), (cfg.shards, "shard root")):
        if not fs.exists(path):
            raise UserError(f"{path}: {what} not found")
    loss, report, spikes = read_loss_and_spikes(cfg)
    join, dtype = join_steps(cfg, loss, report)
    state = load_state(cfg.state, cfg)
    done = frozenset()
    if state is not None:
        done = frozenset(state["spikes_done"]) & frozenset(spikes.column("spike_id").to_pylist())
    plan = plan_audit(cfg, loss, spikes, skip_spikes=done,
                      fixed_controls=state["controls"] if state is not None else None, offset=join.offset, dtype=dtype)
    return loss, report, spikes, state, done, plan, join, dtype


def plan_totals(cfg: RunConfig, plan) -> dict:
    """What the plan will read: slices, rows (sequences), tokens of token slices, shards, bytes."""
    from spike_audit.pipelines import fs
    from spike_audit.pipelines.shards.paths import resolve

    per: dict[str, dict] = {}
    for _, (shard, a, b, unit) in plan.slices:
        e = per.setdefault(shard, {"shard": shard, "slices": 0, "rows": 0, "tokens": 0, "units": set()})
        e["slices"] += 1
        e["units"].add(unit)
        if unit == "token":
            e["rows"] += 1
            e["tokens"] += b - a
        else:
            e["rows"] += b - a
    est = 0
    for shard, e in per.items():
        try:
            e["size_bytes"] = fs.stat_tree(resolve(cfg.shards, shard))[0]
        except (OSError, UserError):
            e["size_bytes"] = None
        frac = []
        for unit in sorted(e.pop("units")):
            n = plan.shard_lengths.get((shard, unit))
            done = e["tokens"] if unit == "token" else e["rows"]
            if n:
                frac.append(min(1.0, done / n))
        e["bytes_to_read"] = int(round((e["size_bytes"] or 0) * max(frac, default=1.0)))
        est += e["bytes_to_read"]
    shards = [per[k] for k in sorted(per)]
    return {"slices": len(plan.slices), "rows": sum(e["rows"] for e in shards),
            "tokens_of_token_slices": sum(e["tokens"] for e in shards), "shards": len(shards),
            "shard_bytes": sum(e["size_bytes"] or 0 for e in shards), "bytes_to_read": est, "per_shard": shards}


def plan_run(cfg: RunConfig) -> dict:
    """The plan of :func:`run_audit` without reading any shard's data (``run --dry-run``): the spikes, their
    windows, the control steps and what would be read (slices, rows, shards, bytes). Shards' metadata is
    opened to check every slice against its shard, as the real run does first."""
    cfg = resolve_tokens(cfg)
    _load_baseline(cfg)  # a bad baseline fails the dry run too
    loss, report, spikes, state, done, plan, join, _ = _prepare(cfg)
    from dataclasses import replace

    from spike_audit.pipelines.run import control_cache as cc

    kept = state.get("control_cache") if state is not None else None
    use_kept = bool(plan.windows) and cc.usable(kept, plan.controls, bool(cfg.baseline))
    ctrl = set(plan.controls)
    totals = plan_totals(cfg, replace(plan, slices=[s for s in plan.slices if s[0] not in ctrl]) if use_kept else plan)
    totals["controls_from_state"] = len(plan.controls) if use_kept else 0
    rows = spikes.to_pylist()
    return {"log": report.to_dict() if hasattr(report, "to_dict") else str(report),
            "spikes": [{"spike_id": r["spike_id"], "run": r["run"], "metric": r["metric"], "kind": r["kind"],
                        "start_step": r["start_step"], "peak_step": r["peak_step"], "end_step": r["end_step"],
                        "audit": "from state" if r["spike_id"] in done else "now",
                        "window": plan.windows.get(r["spike_id"], []),
                        "window_steps_without_data": plan.missing.get(r["spike_id"], [])} for r in rows],
            "n_spikes": spikes.num_rows, "n_to_audit": len(plan.windows), "n_from_state": len(done),
            "events": [{"event_id": k, "start": ev.get("start"), "end": ev.get("end"), "peak_step": ev.get("peak_step"),
                        "members": ev.get("members"), "window": plan.windows.get(k, [])}
                       for k, ev in sorted(plan.events.items())],
            "controls": list(plan.controls), "n_controls": len(plan.controls),
            "step_join": join.to_dict(), "read": totals}


def run_inputs(cfg: RunConfig) -> list[tuple[str, str]]:
    return [("log", cfg.log), ("manifest", cfg.manifest), ("shard root", cfg.shards), ("tokenizer", cfg.tokenizer),
            ("row losses", cfg.row_losses), ("baseline", cfg.baseline)]


def run_audit(cfg: RunConfig, beam_args: list[str] | None = None) -> RunResult:
    """The spike audit. ``--out`` (and ``--state``) are checked, created, marked and locked first; the new
    output is published in one atomic step (:mod:`spike_audit.pipelines.outdir`), so a failure, a kill or a
    signal leaves the previous output complete."""
    from contextlib import ExitStack

    from spike_audit.pipelines.outdir import OutDir, check_apart

    from spike_audit.pipelines import fs
    from spike_audit.pipelines.io import RemoteOut

    t0 = time.time()
    flags = beam_options(beam_args)  # first: a misspelled option fails before any work
    for path, what in ((cfg.log, "log"), (cfg.manifest, "manifest"), (cfg.shards, "shard root")):
        if not fs.exists(path):
            raise UserError(f"{path}: {what} not found")
    cfg = resolve_tokens(cfg)
    baseline = _load_baseline(cfg)
    inputs = run_inputs(cfg)
    if cfg.replay_pack:
        check_apart(cfg.replay_pack, inputs + [("output directory", cfg.out), ("state directory", cfg.state)],
                    flag="--replay-pack")
    with ExitStack() as stack:
        out = stack.enter_context(RemoteOut(cfg.out) if fs.is_url(cfg.out) else
                                  OutDir(cfg.out, "run", inputs + [("state directory", cfg.state)]))
        st = None
        if cfg.state:
            st = stack.enter_context(OutDir(cfg.state, "run-state", inputs + [("output directory", cfg.out)],
                                            flag="--state"))
        return _audit(cfg, flags, out, st, t0, beam_args, baseline)


def _load_baseline(cfg: RunConfig):
    """The saved baseline of ``--baseline``, validated (refused if made with other token settings)."""
    if not cfg.baseline:
        return None
    from spike_audit.pipelines.beam.baseline import RUN_KEYS, load_baseline

    return load_baseline(cfg.baseline, cfg, RUN_KEYS)


def _reference_summary(cfg: RunConfig, baseline) -> dict:
    """What the rows were judged against (``summary.json``)."""
    out = {"natural_rates": "control rows (leave-one-out)", "calibration": "control steps (exact ranks)",
           "unigram": "control steps' tokens (leave-one-step-out)", "baseline": None}
    if baseline is not None:
        out.update(unigram="saved baseline", baseline=baseline.path, baseline_shards=baseline.meta["shards"],
                   baseline_rows=baseline.meta["rows"], baseline_tokens=baseline.meta.get("tokens"))
    return out


def _audit(cfg: RunConfig, flags: list[str], out, st, t0: float, beam_args=None, baseline=None) -> RunResult:
    from apache_beam.options.pipeline_options import PipelineOptions

    from spike_audit.pipelines.io import write_json, write_table, write_text
    from spike_audit.pipelines.progress import Progress
    from spike_audit.pipelines.report.run_page import render_run_report
    from spike_audit.pipelines.settings import write_done_marker, write_run_metadata

    loss, report, spikes, state, done, plan, join, dtype = _prepare(cfg)
    new_ids = sorted(plan.windows)
    log.info("%d spikes in the log, %d events already audited, %d to audit", spikes.num_rows, len(done),
             len(new_ids))

    stage = out.stage()
    from dataclasses import replace

    from spike_audit.pipelines.run import control_cache as cc

    kept = state.get("control_cache") if state is not None else None
    use_kept = bool(new_ids) and cc.usable(kept, plan.controls, baseline is not None)
    if kept is not None and new_ids and not use_kept:
        log.info("the control draw changed since the kept control scores: reading the control steps again")
    control_set = set(plan.controls)
    read_plan = replace(plan, slices=[s for s in plan.slices if s[0] not in control_set]) if use_kept else plan
    st_stage = st.stage() if st is not None and new_ids else None
    roots = {k: str(st_stage) for k in cc.KINDS} if st_stage is not None and not use_kept else None
    read = {"slices": 0, "rows": 0, "tokens_of_token_slices": 0, "controls_from_state": len(plan.controls)
            if use_kept else 0}
    if new_ids:
        opts = PipelineOptions(flags)
        if not any(f.split("=")[0] in ("--pipeline_type_check", "--no_pipeline_type_check") for f in flags):
            from apache_beam.options.pipeline_options import TypeOptions

            # Beam's construction-time type inference checks nothing this graph relies on (its elements are
            # tuples of arrays and dicts; the coders are Beam's generic ones) and costs about 0.5 CPU s a run
            opts.view_as(TypeOptions).pipeline_type_check = False
        log.info("running the audit pipeline (%s)", opts.get_all_options().get("runner"))
        from spike_audit.pipelines.beam.runner import run_pipeline
        from spike_audit.pipelines.beam.sink import collect_tables

        parts = stage / "parts"
        totals = plan_totals(cfg, read_plan)
        read.update(slices=totals["slices"], rows=totals["rows"], tokens_of_token_slices=totals["tokens_of_token_slices"])
        with Progress("audit: reading the planned rows", total_rows=totals["rows"], total_shards=totals["shards"],
                      total_bytes=totals["bytes_to_read"]):
            run_pipeline(lambda p: build_pipeline(p, cfg, read_plan, str(parts), dtype=dtype, baseline=baseline,
                                                  kept_controls=kept if use_kept else None, roots=roots),
                         opts, where=cfg.out)
        new_tables = collect_tables(str(parts), OUTPUT_SPECS)
        shutil.rmtree(parts, ignore_errors=True)
    else:
        new_tables = {spec.name: spec.empty() for spec in OUTPUT_SPECS}

    tables = merge_with_state(state, new_tables, done)
    loss_rows, loss_summary = None, None
    if cfg.row_losses and new_ids:
        from spike_audit.pipelines.run.model_verdict import model_verdicts

        tables["verdicts"], loss_rows, loss_summary = model_verdicts(cfg, plan, tables["verdicts"],
                                                                     tables["row_flags"])
    bs = new_tables["batch_scores"]  # a step has a row per spike window holding it: count each step once
    n_tokens = int(sum(dict(zip(bs.column("step").to_pylist(), bs.column("n_tokens").to_pylist())).values()))

    files = stage / "files"
    try:
        files.mkdir()
        write_table(spikes, files / "spikes.parquet", SPIKES)
        write_table(loss, files / "loss_series.parquet")
        for spec in OUTPUT_SPECS:
            write_table(tables[spec.name], files / f"{spec.name}.parquet", spec)
        write_json(skip_list(tables["verdicts"], tables["row_flags"], join), files / "skip_list.json")
        write_json(quarantine(tables["verdicts"], tables["row_flags"], tables["shard_scores"], cfg.alpha, cfg.min_rows),
                   files / "quarantine.json")
        if loss_rows is not None:
            write_table(loss_rows, files / "loss_rows.parquet", LOSS_ROWS)
        write_text(render_run_report(loss, spikes, dict(tables, loss_rows=loss_rows) if loss_rows is not None
                                     else tables, cfg), files / "report.html")
        summary = {"log": report.__dict__ if hasattr(report, "__dict__") else str(report),
                   "spikes": spikes.num_rows, "audited_now": len(new_ids), "from_state": len(done),
                   "controls": len(plan.controls) if not done or new_ids else len(state["controls"]),
                   "verdicts": {v: int(c) for v, c in zip(*np.unique(
                       np.asarray(tables["verdicts"].column("verdict").to_pylist(), dtype=str), return_counts=True))},
                   "control_calibration": control_calibration(tables["batch_scores"], cfg),
                   "tokens": token_summary(cfg), "reference": _reference_summary(cfg, baseline),
                   "step_join": join.to_dict()}
        summary["slices_read"] = read["slices"]
        summary["read"] = read  # what this run read of the shards (window and control slices; not the dup reference)
        if loss_summary is not None:
            summary["row_losses"] = loss_summary
        write_json(summary, files / "summary.json")
        write_run_metadata(files, "run", cfg, [("log", cfg.log), ("manifest", cfg.manifest),
                                               ("row_losses", cfg.row_losses)], beam_args)
        write_done_marker(files, time.time() - t0)
    except OSError as err:
        from spike_audit.pipelines.outdir import os_error

        raise os_error(cfg.out, err, "cannot write the new output (the previous output is intact)") from None
    out.publish(files)
    if st is not None:
        save_state(st, cfg, tables, plan, state, stage=st_stage, cache_used=use_kept)
    if cfg.replay_pack:
        from spike_audit.pipelines.run.replay_pack import write_plan_pack

        write_plan_pack(cfg, plan)
    dt = time.time() - t0
    return RunResult(Path(cfg.out), tables, spikes.num_rows, len(new_ids), n_tokens, dt, summary)
