"""``spike-audit run``: audit a run's spikes end to end (see :mod:`pipelines.run`)."""

from __future__ import annotations

import argparse
import logging

from spike_audit.pipelines.cli.shard_root import add_confinement_arguments, shard_root_of

log = logging.getLogger(__name__)

EXIT_FOUND = 3  # --fail-on: the audit ran and found what the user asked to be told about


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log", required=True, help="the run's loss log (any supported format)")
    p.add_argument("--manifest", required=True, help="step manifest (Parquet, schemas: step_manifest)")
    p.add_argument("--shards", required=True, help="shard root the manifest's shard paths are relative to (names "
                   "outside it are refused)")
    p.add_argument("--out", required=True, help="output directory (replaced in one atomic step; refused if it is not a spike-audit output or overlaps an input)")
    p.add_argument("--format", dest="log_format", help="log format (default: detected)")
    p.add_argument("--metric", default="train_loss", help="loss metric to audit (default: train_loss)")
    p.add_argument("--method", default="robust", choices=("robust", "olmo", "metaseq"), help="spike detector")
    p.add_argument("--lookback", type=int, default=2, help="steps before a spike's start in its window (2)")
    p.add_argument("--merge-gap", type=int, default=3,
                   help="spikes of any metric (loss, grad norm) within this many steps form one event (3)")
    p.add_argument("--max-window", type=int, default=12,
                   help="most steps in an event's window, from its start (12: a data cause shows at the start; the "
                        "recovery tail consumes no new anomalous data)")
    p.add_argument("--controls", dest="n_controls", type=int, default=200,
                   help="control steps to sample (200; raised when the longest window needs more to reach alpha)")
    p.add_argument("--guard", type=int, default=20, help="min distance of a control step from any spike (20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the control sample and hashes (0)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of a data verdict (0.05)")
    p.add_argument("--min-rows", type=int, default=2,
                   help="a data verdict needs at least this many anomalous rows at one step (2)")
    p.add_argument("--dup-reference", choices=("manifest", "none"), default="manifest",
                   help="what 'seen elsewhere' duplicates are measured against: every row the manifest consumed "
                        "(one read of the consumed token columns; default) or nothing")
    p.add_argument("--tokens-column", dest="tokens_col", default="tokens")
    p.add_argument("--text-column", dest="text_col", default="text")
    from spike_audit.pipelines.cli.tokens import add_token_arguments

    add_token_arguments(p, "the run's tokenizer (tokenizer.json or a directory holding one): token-only shards "
                           "are decoded with it for the text signals and excerpts; EOS / pad ids from it")
    p.add_argument("--state", help="state directory: a rerun audits only spikes not audited before")
    p.add_argument("--allow-overlap", action="store_true",
                   help="accept slices of one shard that overlap within a step (Megatron epochs can do that)")
    add_confinement_arguments(p)
    p.add_argument("--allow-missing-steps", action="store_true",
                   help="the manifest covers only part of the log: judge spikes outside it (or without per-row losses) "
                   "inconclusive instead of failing")
    p.add_argument("--row-losses", help="per-row losses (Parquet, JSONL or a [steps, batch] .npy): adds the "
                   "model-based verdict (loss attribution) beside the data verdict")
    p.add_argument("--row-losses-first-step", type=int, default=1,
                   help="step of row 0 of a --row-losses .npy (default 1)")
    p.add_argument("--loss-baseline", choices=("auto", "preceding", "controls"), default="auto",
                   help="what the window's per-row losses are compared with (auto: the steps before the window "
                   "when the file has them, else the control steps)")
    p.add_argument("--replay-pack", help="also write the window and control rows, in batch order, to this "
                   "directory (Parquet + flat token .npy + README) for replaying from a checkpoint")
    p.add_argument("--fail-on", action="append", choices=("data", "quarantine"), default=[],
                   help=f"exit {EXIT_FOUND} (for schedulers) when a spike is judged data / a shard is quarantined; "
                        "the outputs are written either way")
    p.add_argument("--log-trainer", default=None,
                   help="whose step numbering the log uses when its format does not say (JSONL, CSV, TensorBoard, "
                   "--pattern): megatron, olmo, torchtitan, modded-nanogpt, hf, llm.c, nanogpt or batch-index")
    p.add_argument("--step-offset", type=int, default=None,
                   help="join manifest step = log step + K instead of the trainers' conventions; the log/manifest "
                   "checks then only warn (recorded in summary.json)")
    p.add_argument("--dtype", default=None,
                   help="token dtype of raw token files (default: the one the manifest records, else uint16)")


def config_from_args(args):
    from spike_audit.pipelines.run.plan import RunConfig

    fields = RunConfig.__dataclass_fields__
    kw = {k: v for k, v in vars(args).items() if k in fields}
    kw["shards"] = shard_root_of(args)  # the root carries --allow-outside-root / --allow-urls to every reader
    return RunConfig(**kw)


def print_summary(res) -> None:
    import pyarrow.compute as pc

    v = res.tables["verdicts"]
    print(f"{res.n_spikes} spikes, {res.tables['verdicts'].num_rows} events ({res.n_new_spikes} audited now); "
          f"{res.n_tokens:,} tokens scored in "
          f"{res.seconds:.1f} s; outputs in {res.out}/")
    for r in v.sort_by([("peak_step", "ascending")]).to_pylist():
        p = f"p={r['p_value']:.3g}" if r["p_value"] is not None else ""
        rows = f"{r['anomalous_rows']}/{r['n_rows']}" if r["anomalous_rows"] is not None else ""
        shards = ",".join(r["top_shards"][:2])
        model = f"  model: {r['model_verdict']}" if r.get("model_verdict") else ""
        print(f"  {r['spike_id']:<36} {r['verdict']:<13} {p:<10} {rows:>7} {r['top_signal'] or '':<26} {shards}{model}")
    n = len(pc.unique(v.column("verdict"))) if v.num_rows else 0
    log.debug("%d distinct verdicts", n)


def _run(args) -> int:
    from spike_audit.pipelines.run.audit import run_audit

    res = run_audit(config_from_args(args), beam_args=args.extra)
    print_summary(res)
    return found_code(args, res)


def found_code(args, res) -> int:
    """``--fail-on``: exit 3 when the audit found data verdicts or quarantined shards (0 otherwise)."""
    import sys

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


def register(sub) -> None:
    p = sub.add_parser("run", help="audit a run's loss spikes end to end",
                       description="Audit every loss spike of a run: what data it consumed and whether that data "
                                   "is unusual compared with normal steps. Any other --option is passed to Beam "
                                   "(e.g. --runner, --direct_num_workers, Dataflow/Flink/Spark options).")
    add_run_arguments(p)
    p.set_defaults(func=_run, accepts_extra=True)
