"""``spike-audit run``: audit a run's spikes end to end (see :mod:`pipelines.run`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from spike_audit.pipelines.cli.options import (S, add_columns, add_config, add_json, add_log_reading, opt,
                                               settings_from_args)
from spike_audit.pipelines.cli.shard_root import add_confinement_arguments, shard_root_of
from spike_audit.pipelines.run.plan import RunConfig
from spike_audit.pipelines.settings import CHOICES

from spike_audit.pipelines.cli.terminal import one_line_text

log = logging.getLogger(__name__)

REQUIRED = ("log", "manifest", "shards", "out")
EXIT_FOUND = 3  # --fail-on: the audit ran and found what the user asked to be told about


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    c = RunConfig
    opt(p, "--log", cls=c, dest="log", help="the run's loss log (any supported format; a file, a TensorBoard logdir "
        "or a URL); required here or in --config")
    opt(p, "--manifest", cls=c, dest="manifest", help="step manifest (Parquet, schemas: step_manifest); required")
    opt(p, "--shards", cls=c, dest="shards", help="shard root the manifest's shard paths are relative to; required")
    opt(p, "--out", cls=c, dest="out", help="output directory (replaced in one atomic step; refused if it is not a "
        "spike-audit output or overlaps an input; a URL is uploaded, _SUCCESS last); required")
    add_config(p)
    add_log_reading(p, c)
    opt(p, "--run", cls=c, dest="run", help="the run to audit when the log holds several (TensorBoard run "
        "subfolders, a W&B export of several runs)")
    opt(p, "--metric", cls=c, dest="metric", help="loss metric to audit")
    opt(p, "--method", cls=c, dest="method", choices=CHOICES["method"], help="spike detector")
    opt(p, "--lookback", cls=c, dest="lookback", type=int, help="steps before a spike's start in its window")
    opt(p, "--merge-gap", cls=c, dest="merge_gap", type=int,
        help="spikes of any metric (loss, grad norm) within this many steps form one event")
    opt(p, "--max-window", cls=c, dest="max_window", type=int,
        help="most steps in an event's window, from its start (a data cause shows at the start; the recovery tail "
             "consumes no new anomalous data)")
    opt(p, "--controls", cls=c, dest="n_controls", type=int,
        help="control steps to sample (raised when the longest window needs more for p <= alpha / --p-resolution)")
    opt(p, "--p-resolution", cls=c, dest="p_resolution", type=int,
        help="controls are drawn (at least --controls) so that p <= alpha / this is reachable over the longest "
             "window: a window step must then beat all but the few most extreme controls, not only their maximum, "
             "a noisier bar; 1 draws the fewest controls that can reach alpha")
    opt(p, "--guard", cls=c, dest="guard", type=int, help="min distance of a control step from any spike")
    opt(p, "--seed", cls=c, dest="seed", type=int, help="seed of the control sample and hashes")
    opt(p, "--alpha", cls=c, dest="alpha", type=float, help="significance level of a data verdict")
    opt(p, "--min-rows", cls=c, dest="min_rows", type=int,
        help="a data verdict needs at least this many anomalous rows at one step")
    opt(p, "--dup-reference", cls=c, dest="dup_reference", choices=CHOICES["dup_reference"],
        help="what 'seen elsewhere' duplicates are measured against: every row the manifest consumed (one read of "
             "the consumed token columns) or nothing")
    add_columns(p, c)
    from spike_audit.pipelines.cli.tokens import add_token_arguments

    add_token_arguments(p, "the run's tokenizer (tokenizer.json or a directory holding one): token-only shards "
                           "are decoded with it for the text signals and excerpts; EOS / pad ids from it")
    for a in p._actions:  # config fields: only what the user gave overrides the config file
        if a.dest in ("tokenizer", "eos_id", "pad_id", "rows", "seq_len"):
            a.default = S
    opt(p, "--log-trainer", cls=c, dest="log_trainer",
        help="whose step numbering the log uses when its format does not say (JSONL, CSV, TensorBoard, --pattern): "
             "megatron, olmo, torchtitan, modded-nanogpt, hf, llm.c, nanogpt or batch-index")
    opt(p, "--step-offset", cls=c, dest="step_offset", type=int,
        help="join manifest step = log step + K instead of the trainers' conventions; the log/manifest checks then "
             "only warn (recorded in summary.json)")
    opt(p, "--dtype", cls=c, dest="dtype", help="token dtype of raw token files (default: the one the manifest "
        "records, else uint16)")
    opt(p, "--state", cls=c, dest="state", help="state directory: a rerun audits only spikes not audited before")
    opt(p, "--baseline", cls=c, dest="baseline",
        help="a baseline saved by shards --save-baseline: its unigram histogram is the reference of the "
             "baseline-relative signals (the control steps still give the natural rates and calibrate p)")
    opt(p, "--allow-overlap", cls=c, dest="allow_overlap", action="store_true",
        help="accept slices of one shard that overlap within a step (Megatron epochs can do that)")
    add_confinement_arguments(p)
    opt(p, "--allow-missing-steps", cls=c, dest="allow_missing_steps", action="store_true",
        help="the manifest covers only part of the log: judge spikes outside it (or without per-row losses) "
             "inconclusive instead of failing")
    opt(p, "--row-losses", cls=c, dest="row_losses", help="per-row losses (Parquet, JSONL or a [steps, batch] .npy): "
        "adds the model-based verdict (loss attribution) beside the data verdict")
    opt(p, "--row-losses-first-step", cls=c, dest="row_losses_first_step", type=int,
        help="step of row 0 of a --row-losses .npy")
    opt(p, "--loss-baseline", cls=c, dest="loss_baseline", choices=CHOICES["loss_baseline"],
        help="what the window's per-row losses are compared with (auto: the steps before the window when the file "
             "has them, else the control steps)")
    opt(p, "--replay-pack", cls=c, dest="replay_pack", help="also write the window and control rows, in batch order, "
        "to this directory (Parquet + flat token .npy + README) for replaying from a checkpoint")
    p.add_argument("--fail-on", action="append", choices=("data", "quarantine"), default=[],
                   help=f"exit {EXIT_FOUND} (for schedulers) when a spike is judged data / a shard is quarantined; "
                        "the outputs are written either way")
    add_json(p, "the result summary")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (spikes, windows, controls, slices, shards and bytes to read) and stop "
                        "before reading any shard's data")


def config_from_args(args) -> tuple[RunConfig, list[str]]:
    import dataclasses

    cfg, beam = settings_from_args(args, RunConfig, "run", required=REQUIRED)
    # the root carries --allow-outside-root / --allow-urls to every reader
    return dataclasses.replace(cfg, shards=shard_root_of(argparse.Namespace(
        shards=cfg.shards, allow_outside_root=getattr(args, "allow_outside_root", False),
        allow_urls=getattr(args, "allow_urls", False)))), beam


def result_summary(res) -> dict:
    """The machine-readable result of a run (``--json``)."""
    v = res.tables["verdicts"].sort_by([("peak_step", "ascending"), ("spike_id", "ascending")])
    keep = ("spike_id", "run", "peak_step", "verdict", "p_value", "anomalous_rows", "n_rows", "effect_size",
            "margin", "top_signal", "top_step", "top_shards", "reason", "model_verdict")
    return {"out": str(res.out), "n_spikes": res.n_spikes, "n_audited_now": res.n_new_spikes,
            "tokens_scored": res.n_tokens, "seconds": round(res.seconds, 3),
            "summary": res.summary, "verdicts": [{k: r.get(k) for k in keep} for r in v.to_pylist()]}


def print_summary(res) -> None:
    import pyarrow.compute as pc

    v = res.tables["verdicts"]
    print(f"{res.n_spikes} spikes, {res.tables['verdicts'].num_rows} events ({res.n_new_spikes} audited now); "
          f"{res.n_tokens:,} tokens scored in "
          f"{res.seconds:.1f} s; outputs in {one_line_text(res.out)}/")
    for r in v.sort_by([("peak_step", "ascending")]).to_pylist():
        p = f"p={r['p_value']:.3g}" if r["p_value"] is not None else ""
        rows = f"{r['anomalous_rows']}/{r['n_rows']}" if r["anomalous_rows"] is not None else ""
        shards = one_line_text(",".join(r["top_shards"][:2]))
        model = f"  model: {r['model_verdict']}" if r.get("model_verdict") else ""
        print(f"  {one_line_text(r['spike_id']):<36} {r['verdict']:<13} {p:<10} {rows:>7} {r['top_signal'] or '':<26} "
              f"{shards}{model}")
    n = len(pc.unique(v.column("verdict"))) if v.num_rows else 0
    log.debug("%d distinct verdicts", n)


def _size(n) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def format_plan(plan: dict) -> str:
    r = plan["read"]
    lines = [f"plan: {plan['n_spikes']} spikes ({plan['n_to_audit']} to audit, {plan['n_from_state']} from state), "
             f"{plan['n_controls']} control steps" + (" (from the state: not read again)" if plan.get("controls_from_state") else "")]
    for e in plan["events"]:
        w = e["window"]
        win = f"window {w[0]}..{w[-1]} ({len(w)} steps)" if w else "(from state, or no window steps with data)"
        lines.append(f"  {one_line_text(e['event_id']):<36} peak {e['peak_step']:<7} {win}  [{len(e['members'])} spike(s)]")
    c = plan["controls"]
    if c:
        lines.append(f"  controls: {', '.join(map(str, c[:12]))}{', ...' if len(c) > 12 else ''}")
    lines.append(f"would read {r['slices']:,} manifest slices, {r['rows']:,} rows"
                 + (f" ({r['tokens_of_token_slices']:,} tokens in token slices)" if r["tokens_of_token_slices"] else "")
                 + f" from {r['shards']} shards ({_size(r['shard_bytes'])} on disk, about {_size(r['bytes_to_read'])} "
                 f"to read)")
    for e in r["per_shard"][:10]:
        lines.append(f"  {one_line_text(e['shard']):<40} {e['slices']:>5} slices {e['rows']:>8,} rows  "
                     f"~{_size(e['bytes_to_read'])}")
    if len(r["per_shard"]) > 10:
        lines.append(f"  ... {len(r['per_shard']) - 10} more shards")
    return "\n".join(lines)


def _run(args) -> int:
    from spike_audit.pipelines.beam.options import beam_options
    from spike_audit.pipelines.run.audit import plan_run, run_audit

    cfg, beam = config_from_args(args)
    if args.dry_run:
        beam_options(beam)  # a misspelled option is an error in a dry run too
        plan = plan_run(cfg)
        if args.json:
            _dump(plan)
        else:
            print(format_plan(plan))
        return 0
    res = run_audit(cfg, beam_args=beam)
    if args.json:
        _dump(result_summary(res))
    else:
        print_summary(res)
    return found_code(args, res)


def found_code(args, res) -> int:
    """``--fail-on``: exit 3 when the audit found data verdicts or quarantined shards (0 otherwise)."""
    from spike_audit.pipelines.run.outputs import quarantine

    v = res.tables["verdicts"]
    found = []
    if "data" in args.fail_on:
        n = sum(x == "data" for x in v.column("verdict").to_pylist())
        if n:
            found.append(f"{n} spike(s) judged data")
    if "quarantine" in args.fail_on:
        n = len(quarantine(v, res.tables["row_flags"])["shards"])
        if n:
            found.append(f"{n} shard(s) quarantined")
    if found:
        print(f"spike-audit {args.command}: exit {EXIT_FOUND} (--fail-on): {'; '.join(found)}", file=sys.stderr)
        return EXIT_FOUND
    return 0


def _dump(doc) -> None:
    from spike_audit.pipelines.cli.spikes import _clean

    json.dump(_clean(doc), sys.stdout, indent=2, sort_keys=True, allow_nan=False, default=str)
    sys.stdout.write("\n")


def register(sub) -> None:
    p = sub.add_parser("run", help="audit a run's loss spikes end to end",
                       description="Audit every loss spike of a run: what data it consumed and whether that data "
                                   "is unusual compared with normal steps. Any other --option is passed to Beam "
                                   "(e.g. --runner, --direct_num_workers, Dataflow/Flink/Spark options).")
    add_run_arguments(p)
    p.set_defaults(func=_run, accepts_extra=True)
