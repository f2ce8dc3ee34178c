"""``spike-audit replay``: recompute per-row losses of the audited batches with a local checkpoint
(see :mod:`pipelines.replay`)."""

from __future__ import annotations

import logging

from spike_audit.pipelines.cli.shard_root import add_confinement_arguments, shard_root_of
from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.settings import CHOICES

log = logging.getLogger(__name__)

MAX_STEP = 2 ** 62
MAX_STEPS = 1_000_000  # steps replayed through a model in one call: far more than any audit needs


def _parse_steps(text: str | None) -> list[int] | None:
    if not text:
        return None
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            a, _, b = part.partition(":")
            lo, hi = int(a), int(b or a)
        except ValueError:
            raise UserError(f"--steps: expected a list like 10,20:25 (inclusive ranges), got {text!r}") from None
        if hi < lo:
            raise UserError(f"--steps: range {part!r} ends before it starts")
        if lo < 0 or hi > MAX_STEP:
            raise UserError(f"--steps: {part!r}: expected step numbers in [0, 2^62], as the trainer's log numbers them")
        if len(out) + (hi - lo + 1) > MAX_STEPS:
            raise UserError(f"--steps: {text!r} names more than {MAX_STEPS:,} steps; expected the few steps to replay "
                            f"through the model")
        out.extend(range(lo, hi + 1))
    return out


def register(sub) -> None:
    p = sub.add_parser("replay", help="per-row losses of the audited batches from a local checkpoint",
                       description="Replay the batches `spike-audit run` audits (each spike's window and the "
                       "control steps) through a local Hugging Face causal-LM checkpoint and write their per-row "
                       "losses, the table `run --row-losses` reads. No network. Needs the `replay` extra "
                       "(torch, transformers).")
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + weights, save_pretrained)")
    p.add_argument("--manifest", required=True, help="step manifest (Parquet)")
    p.add_argument("--shards", required=True, help="shard root the manifest's shard paths are relative to")
    p.add_argument("--out", required=True, help="per-row loss table to write (.parquet, or .jsonl)")
    p.add_argument("--log", help="the run's loss log: replay the steps `run` would audit (same options)")
    p.add_argument("--steps", help="or replay exactly these steps, e.g. 118:120,300, numbered as the trainer's log "
                   "numbers them (Megatron iterations...: converted with the trainer the manifest records)")
    p.add_argument("--format", dest="log_format", help="log format (default: detected)")
    p.add_argument("--metric", default="train_loss")
    p.add_argument("--method", default="robust", choices=CHOICES["method"])
    p.add_argument("--lookback", type=int, default=2)
    p.add_argument("--controls", dest="n_controls", type=int, default=100)
    p.add_argument("--guard", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (8)")
    p.add_argument("--dtype", default="float32", help="model dtype: float32 (default), bfloat16, float16")
    p.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1, mps")
    p.add_argument("--max-length", type=int, help="truncate sequences to this many tokens")
    p.add_argument("--tokens-column", dest="tokens_col", default="tokens")
    p.add_argument("--text-column", dest="text_col", default="text")
    p.add_argument("--tokenizer", help="tokenizer.json for text-only shards (default: the checkpoint's)")
    p.add_argument("--token-dtype", help="dtype of header-less token files (default uint16)")
    add_confinement_arguments(p)
    p.add_argument("--allow-missing-steps", action="store_true")
    p.add_argument("--log-trainer", default=None,
                   help="whose step numbering --log uses when its format does not say (as for run)")
    p.add_argument("--step-offset", type=int, default=None, help="manifest step = log step + K (as for run)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from spike_audit.pipelines.run.replay import ReplayConfig, run_replay

    fields = ReplayConfig.__dataclass_fields__
    kw = {k: v for k, v in vars(args).items() if k in fields and k != "steps"}
    kw["shards"] = shard_root_of(args)  # --allow-outside-root / --allow-urls travel with the root
    res = run_replay(ReplayConfig(steps=_parse_steps(args.steps), **kw))
    print(f"{res['out']}: per-row losses of {res['sequences']} sequences over {res['steps']} steps "
          f"({res['nan']} without a loss) in {res['seconds']:.1f} s")
    return 0
