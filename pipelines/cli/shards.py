"""``spike-audit shards``: audit shards without a loss log (see :mod:`pipelines.shard_audit`)."""

from __future__ import annotations


def _shards(args) -> int:
    from spike_audit.pipelines.shard_audit.audit import run_shard_audit
    from spike_audit.pipelines.shard_audit.config import ShardAuditConfig

    fields = ShardAuditConfig.__dataclass_fields__
    cfg = ShardAuditConfig(**{k: v for k, v in vars(args).items() if k in fields and k != "inputs"},
                           inputs=tuple(args.inputs))
    res = run_shard_audit(cfg, beam_args=args.extra)
    scores = res.tables["shard_scores"].to_pylist()
    rate = res.n_tokens_scanned / res.seconds if res.seconds else 0.0
    print(f"{res.n_shards} shards ({res.n_scanned} read now, {res.n_shards - res.n_scanned} from state), "
          f"{res.n_tokens_scanned:,} tokens read in {res.seconds:.1f} s ({rate / 1e6:.2f}M tokens/s); "
          f"outputs in {res.out}/")
    from spike_audit.pipelines.shard_audit.outputs import is_quarantined, quarantine_threshold

    t = quarantine_threshold(len(scores), cfg.alpha)
    for r in scores[:10]:
        mark = "!" if is_quarantined(r, t, cfg.min_rows) else " "
        score = f"{r['anomaly_score']:.1f}" if r["anomaly_score"] < 1e4 else ">1e4"
        print(f" {mark}{r['rank']:>4}  {r['shard']:<40} {score:>8}  {r['reason']}")
    for b in res.bad:
        print(f"  unreadable: {b['shard']}: {b['error']}")
    for name in res.empty:
        print(f"  empty: {name}: 0 rows (listed, not scored)")
    if args.fail_on:
        import sys

        from spike_audit.pipelines.cli.run import EXIT_FOUND

        n = sum(is_quarantined(r, t, cfg.min_rows) for r in scores) + len(res.bad)
        if n:
            print(f"spike-audit shards: exit {EXIT_FOUND} (--fail-on quarantine): {n} shard(s) quarantined "
                  "(unreadable ones included)", file=sys.stderr)
            return EXIT_FOUND
    return 0


def register(sub) -> None:
    p = sub.add_parser("shards", help="audit shards without a loss log: which are anomalous, and why",
                       description="Rank shards by how unusual they are against the whole corpus, find duplicate "
                                   "clusters spanning shards, and write a quarantine list. Any other --option is "
                                   "passed to Beam (e.g. --runner).")
    p.add_argument("inputs", nargs="+", help="shard files, directories or globs (local or gs://, s3:// ...)")
    p.add_argument("--out", required=True, help="output directory (replaced in one atomic step; refused if it is not a spike-audit output or overlaps an input)")
    p.add_argument("--root", help="shard names are relative to this (default: the inputs' common directory)")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="accept files found in an input directory (or by a glob) that resolve outside it (symlinks)")
    p.add_argument("--state", help="state directory: a rerun reads only new or changed shards")
    p.add_argument("--skip-bad", action="store_true", help="continue without unreadable shards (they are listed)")
    p.add_argument("--tokens-column", dest="tokens_col", default="tokens")
    p.add_argument("--text-column", dest="text_col", default="text")
    p.add_argument("--dtype", help="token dtype of raw .bin files (default uint16)")
    p.add_argument("--batch-rows", type=int, default=4096, help="rows read per chunk (4096)")
    p.add_argument("--alpha", type=float, default=0.05,
                   help="significance of a quarantine, Bonferroni over shards, families and cuts (0.05)")
    p.add_argument("--min-rows", type=int, default=2, help="a shard is quarantined for at least this many rows (2)")
    p.add_argument("--threshold", type=float, default=0.8, help="Jaccard threshold of near duplicates (0.8)")
    from spike_audit.pipelines.cli.tokens import add_token_arguments

    add_token_arguments(p, "the corpus's tokenizer (tokenizer.json or a directory holding one): token-only shards "
                           "are decoded with it for the text signals; EOS / pad ids from it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fail-on", choices=("quarantine",), action="append", default=[],
                   help="exit 3 (for schedulers) when a shard is quarantined (unreadable ones listed by --skip-bad "
                        "included); the outputs are written either way")
    p.set_defaults(func=_shards, accepts_extra=True)
