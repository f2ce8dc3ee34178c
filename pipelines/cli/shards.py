"""``spike-audit shards``: audit shards without a loss log (see :mod:`pipelines.shard_audit`)."""

from __future__ import annotations

import json
import sys

from spike_audit.pipelines.cli.terminal import one_line_text
from spike_audit.pipelines.cli.options import S, add_columns, add_config, add_json, opt, settings_from_args
from spike_audit.pipelines.shard_audit.config import ShardAuditConfig


def config_from_args(args) -> tuple[ShardAuditConfig, list[str]]:
    extra = {"inputs": tuple(args.inputs)} if getattr(args, "inputs", None) else {}
    return settings_from_args(args, ShardAuditConfig, "shards", required=("inputs", "out"), extra=extra)


def _score(x: float) -> str:
    return f"{x:.1f}" if x < 1e4 else ">1e4"


def result_summary(res, cfg) -> dict:
    from spike_audit.pipelines.shard_audit.outputs import is_quarantined, quarantine_threshold

    scores = res.tables["shard_scores"].to_pylist()
    t = quarantine_threshold(len(scores), cfg.alpha)
    keep = ("rank", "shard", "anomaly_score", "top_signal", "reason", "n_rows", "n_tokens")
    return {"empty": list(res.empty), "out": str(res.out), "n_shards": res.n_shards, "n_read_now": res.n_scanned,
            "n_from_state": res.n_shards - res.n_scanned, "tokens_read": res.n_tokens_scanned,
            "seconds": round(res.seconds, 3), "alpha": cfg.alpha, "min_rows": cfg.min_rows,
            "quarantined": [r["shard"] for r in scores if is_quarantined(r, t, cfg.min_rows)],
            "unreadable": res.bad, "shards": [{k: r.get(k) for k in keep} for r in scores]}


def _size(n) -> str:
    from spike_audit.pipelines.cli.run import _size as size

    return size(n)


def format_plan(plan: dict) -> str:
    lines = [f"plan: {plan['n_shards']} shards ({plan['n_to_read']} to read, {plan['n_unchanged']} unchanged in the "
             f"state), {_size(plan['bytes_to_read'])} to read of {_size(plan['bytes_total'])}"
]
    for e in plan["shards"][:20]:
        lines.append(f"  {'read' if e['read'] else 'kept':<5} {one_line_text(e['shard']):<48} {_size(e['size_bytes']):>10}")
    if len(plan["shards"]) > 20:
        lines.append(f"  ... {len(plan['shards']) - 20} more shards")
    return "\n".join(lines)


def _shards(args) -> int:
    from spike_audit.pipelines.beam.options import beam_options
    from spike_audit.pipelines.shard_audit.audit import plan_shard_audit, run_shard_audit

    cfg, beam = config_from_args(args)
    if args.dry_run:
        beam_options(beam)
        plan = plan_shard_audit(cfg)
        if args.json:
            _dump(plan)
        else:
            print(format_plan(plan))
        return 0
    res = run_shard_audit(cfg, beam_args=beam)
    if args.json:
        _dump(result_summary(res, cfg))
        return _found(args, res, cfg)
    scores = res.tables["shard_scores"].to_pylist()
    rate = res.n_tokens_scanned / res.seconds if res.seconds else 0.0
    print(f"{res.n_shards} shards ({res.n_scanned} read now, {res.n_shards - res.n_scanned} from state), "
          f"{res.n_tokens_scanned:,} tokens read in {res.seconds:.1f} s ({rate / 1e6:.2f}M tokens/s); "
          f"outputs in {one_line_text(res.out)}/")
    from spike_audit.pipelines.shard_audit.outputs import is_quarantined, quarantine_threshold

    t = quarantine_threshold(len(scores), cfg.alpha)
    for r in scores[:10]:
        mark = "!" if is_quarantined(r, t, cfg.min_rows) else " "
        print(f" {mark}{r['rank']:>4}  {one_line_text(r['shard']):<40} {_score(r['anomaly_score']):>8}  "
              f"{one_line_text(r['reason'])}")
    for b in res.bad:
        print(f"  unreadable: {one_line_text(b['shard'])}: {one_line_text(b['error'])}")
    for name in res.empty:
        print(f"  empty: {one_line_text(name)}: 0 rows (listed, not scored)")
    return _found(args, res, cfg)


def _found(args, res, cfg) -> int:
    if args.fail_on:
        from spike_audit.pipelines.cli.run import EXIT_FOUND

        from spike_audit.pipelines.shard_audit.outputs import is_quarantined, quarantine_threshold

        scores = res.tables["shard_scores"].to_pylist()
        t = quarantine_threshold(len(scores), cfg.alpha)
        n = sum(is_quarantined(r, t, cfg.min_rows) for r in scores) + len(res.bad)
        if n:
            print(f"spike-audit shards: exit {EXIT_FOUND} (--fail-on quarantine): {n} shard(s) quarantined "
                  "(unreadable ones included)", file=sys.stderr)
            return EXIT_FOUND
    return 0


def _dump(doc) -> None:
    from spike_audit.pipelines.cli.spikes import _clean

    json.dump(_clean(doc), sys.stdout, indent=2, sort_keys=True, allow_nan=False, default=str)
    sys.stdout.write("\n")


def register(sub) -> None:
    c = ShardAuditConfig
    p = sub.add_parser("shards", help="audit shards without a loss log: which are anomalous, and why",
                       description="Rank shards by how unusual they are against the whole corpus, find duplicate "
                                   "clusters spanning shards, and write a quarantine list. Any other --option is "
                                   "passed to Beam (e.g. --runner).")
    p.add_argument("inputs", nargs="*", default=S,
                   help="shard files, directories or globs (local or s3://, gs:// ...); or `inputs` in --config")
    opt(p, "--out", cls=c, dest="out", help="output directory (replaced in one atomic step; refused if it is not a "
        "spike-audit output or overlaps an input; a URL is uploaded, _SUCCESS last); required")
    add_config(p)
    opt(p, "--root", cls=c, dest="root", help="shard names are relative to this (default: the inputs' common "
        "directory)")
    opt(p, "--allow-outside-root", cls=c, dest="allow_outside_root", action="store_true",
        help="accept files found in an input directory (or by a glob) that resolve outside it (symlinks)")
    opt(p, "--state", cls=c, dest="state", help="state directory: a rerun reads only new or changed shards")
    opt(p, "--save-baseline", cls=c, dest="save_baseline",
        help="save this (trusted) corpus as a baseline directory: later audits judge new shards against it "
             "(--baseline) without reading this corpus again")
    opt(p, "--baseline", cls=c, dest="baseline",
        help="judge the shards against a baseline saved by --save-baseline (its rows' natural rates, unigram "
             "histogram and row hashes) instead of against each other")
    opt(p, "--skip-bad", cls=c, dest="skip_bad", action="store_true",
        help="continue without shards found unreadable before scoring (not Parquet, a damaged footer, missing "
             "columns; they are listed); damage found while decoding a shard's data still stops the run")
    add_columns(p, c)
    opt(p, "--dtype", cls=c, dest="dtype", help="token dtype of raw .bin files (default uint16)")
    opt(p, "--batch-rows", cls=c, dest="batch_rows", type=int, help="rows read per chunk")
    opt(p, "--alpha", cls=c, dest="alpha", type=float,
        help="significance of a quarantine, Bonferroni over shards, families and cuts")
    opt(p, "--min-rows", cls=c, dest="min_rows", type=int, help="a shard is quarantined for at least this many rows")
    opt(p, "--threshold", cls=c, dest="threshold", type=float, help="Jaccard threshold of near duplicates")
    from spike_audit.pipelines.cli.tokens import add_token_arguments

    add_token_arguments(p, "the corpus's tokenizer (tokenizer.json or a directory holding one): token-only shards "
                           "are decoded with it for the text signals; EOS / pad ids from it")
    for a in p._actions:  # config fields: only what the user gave overrides the config file
        if a.dest in ("tokenizer", "eos_id", "pad_id", "rows", "seq_len"):
            a.default = S
    opt(p, "--seed", cls=c, dest="seed", type=int, help="seed of the row hashes and MinHash")
    p.add_argument("--fail-on", choices=("quarantine",), action="append", default=[],
                   help="exit 3 (for schedulers) when a shard is quarantined (unreadable ones listed by --skip-bad "
                        "included); the outputs are written either way")
    add_json(p, "the result summary")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (shards and bytes to read, what the state keeps) and stop before reading "
                        "any shard")
    p.set_defaults(func=_shards, accepts_extra=True)
