"""``spike-audit batch``: show what one optimizer step consumed, read exactly from the shards.

For every manifest slice of the step: shard, rows (or token range), rank / micro-batch when known,
sequence and token counts, and an excerpt of each sequence: the ``text`` column where the shard has
one, else the tokens decoded with ``--tokenizer``, else the first token ids.

``--step`` is the manifest's step, a 0-based batch index; ``--log-step`` takes the step as the
trainer's log numbers it (Megatron's iteration, OLMo's step, ...) and converts it with the trainer the
manifest records. Raw token files are read with the manifest's recorded token dtype unless ``--dtype``
is given (and the two must agree).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import numpy as np

from spike_audit.pipelines.cli.shard_root import add_confinement_arguments, shard_root_of
from spike_audit.pipelines.cli.terminal import json_printable, printable
from spike_audit.pipelines.errors import UserError

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "batch",
        help="show what one step consumed (shards, rows, tokens, text excerpts)",
        description="Print what optimizer step N read, per manifest slice: shard, rows, token counts and a "
        "text excerpt of every sequence (text column, or tokens decoded with --tokenizer).",
    )
    p.add_argument("--manifest", required=True, help="step manifest (Parquet, step_manifest schema)")
    p.add_argument("--shards", default=None, help="root the manifest's shard paths are relative to (default: the "
                   "current directory); names outside it are refused")
    add_confinement_arguments(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--step", type=int, help="the step as the manifest numbers it: 0-based global batch index")
    g.add_argument("--log-step", type=int,
                   help="the step as the trainer's log numbers it (e.g. Megatron iteration N = batch N - 1), "
                   "converted with the trainer the manifest records")
    from spike_audit.pipelines.cli.tokens import add_token_arguments

    add_token_arguments(p, "the run's tokenizer (tokenizer.json or a directory holding one) to decode token ids")
    p.add_argument("--max-chars", type=int, default=200, help="excerpt length per sequence (default 200)")
    p.add_argument("--limit", type=int, default=20,
                   help="sequences shown per slice (default 20; 0 = all); counts always cover all")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--tokens-column", dest="tokens_col", default="tokens",
                   help="token-id column of Parquet/JSONL/HF shards (default tokens)")
    p.add_argument("--tokens-col", dest="tokens_col", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # old spelling
    p.add_argument("--text-column", dest="text_col", default="text",
                   help="text column of Parquet/JSONL/HF shards (default text)")
    p.add_argument("--text-col", dest="text_col", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default=None,
                   help="dtype of raw token files (default: the manifest's recorded token dtype, else uint16; "
                   "headers auto-detected)")
    p.add_argument("--allow-overlap", action="store_true",
                   help="accept slices of one shard that overlap within the step (data the trainer read twice, "
                   "e.g. Megatron multi-epoch shuffles)")
    p.set_defaults(func=run)


def _excerpt(s: str, n: int) -> str:
    s = " ".join(s.split()) if s else ""
    return s if len(s) <= n else s[: max(0, n - 1)] + "…"


def step_report(manifest: str, shard_root: str | None, step: int, *, tokenizer: str | None = None,
                max_chars: int = 200, limit: int = 20, tokens_col: str = "tokens", text_col: str = "text",
                dtype=None, allow_overlap: bool = False, rows=None, log_step: int | None = None) -> dict:
    """What ``step`` consumed, as a JSON-able dict (the ``--json`` output). ``rows``: the row definition of
    flat token files (checked against the one the manifest records). ``log_step``: the step as the
    trainer's log numbers it instead (``step`` is then ignored)."""
    from spike_audit.pipelines.manifest import (_name, check_ranges, check_shard_bounds, fed_tokens,
                                                load_manifest_table, manifest_rows, read_meta, step_rows, token_dtype)
    from spike_audit.pipelines.shards.read import read_slices, token_id_columns
    from spike_audit.schemas.steps import STEP_CONVENTION, step_base

    table = load_manifest_table(manifest)
    src = _name(manifest)
    meta = read_meta(manifest)
    dtype = token_dtype(meta, dtype, src)
    trainer = meta.get("trainer")
    base = step_base(trainer) if meta.get("step_convention") == STEP_CONVENTION else None
    if log_step is not None:
        if base is None:
            why = (f"trainer {trainer!r} has no known step numbering" if trainer else "it records no trainer")
            raise UserError(f"{src}: --log-step needs the trainer's step numbering but {why}; give --step (the "
                            f"0-based batch index)")
        step = log_step - base
    ids = step_rows(table, step)
    if not len(ids):
        steps = table.column("step").to_numpy()
        have = f"steps {steps.min()}..{steps.max()}" if len(steps) else "no rows"
        if log_step is not None:  # name the join, so an off-by-one of the numbering is visible
            logged = f"; log steps {steps.min() + base}..{steps.max() + base}" if len(steps) else ""
            raise UserError(f"{src}: log step {log_step} is batch index {step} in {trainer}'s numbering (log step = batch "
                            f"index + {base}), not in the manifest ({have}{logged})")
        raise UserError(f"{src}: step {step} is not in the manifest ({have})")
    sub = table.take(ids)
    row_def = manifest_rows(manifest, rows)
    check_ranges(sub, src, ids, allow_overlap=allow_overlap)
    check_shard_bounds(sub, src, shard_root, ids, dtype=dtype, tokens_col=tokens_col, text_col=text_col,
                       rows=row_def)
    tok = None
    if tokenizer:
        from spike_audit.pipelines.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer)
    shard = np.asarray(sub.column("shard").to_pylist(), dtype=object)
    unit = np.asarray(sub.column("unit").to_pylist(), dtype=object)
    start = sub.column("row_start").to_numpy()
    end = sub.column("row_end").to_numpy()
    rank = sub.column("rank").to_pylist()
    micro = sub.column("micro_batch").to_pylist()
    epoch = sub.column("epoch").to_pylist()
    slices_out: list[dict | None] = [None] * len(ids)
    n_fed_pad = 0
    no_tokens: dict[str, list[str]] = {}  # shards read as text only -> their integer-list columns
    for s_name, u in sorted({(a, b) for a, b in zip(shard, unit)}):
        sel = np.flatnonzero((shard == s_name) & (unit == u))
        batch = read_slices(shard_root, s_name, np.stack([start[sel], end[sel]], axis=1), unit=u,
                            tokens_col=tokens_col, text_col=text_col, dtype=dtype, rows=row_def)
        per = (end[sel] - start[sel]) if u == "row" else np.ones(len(sel), np.int64)
        off = np.concatenate([[0], np.cumsum(per)])
        tokens, n_pad = fed_tokens(batch.column("tokens"), meta)  # what the trainer fed (Megatron's pad -> 0)
        n_fed_pad += n_pad
        n_tok = np.asarray(tokens.value_lengths().fill_null(0).to_numpy(zero_copy_only=False), np.int64)
        text_only = u == "row" and len(tokens) > 0 and tokens.null_count == len(tokens)
        if text_only and s_name not in no_tokens:  # no token column read: counts unknown, never "0 tokens"
            no_tokens[s_name] = token_id_columns(shard_root, s_name, tokens_col=tokens_col, text_col=text_col)
        texts = batch.column("text").to_pylist()
        rows = batch.column("row").to_numpy()
        row_end = batch.column("row_end").to_numpy()
        # Excerpts only for the sequences shown.
        shown = np.concatenate([np.arange(off[k], off[k] + (per[k] if limit <= 0 else min(per[k], limit)))
                                for k in range(len(sel))]).astype(np.int64)
        need_decode = [int(i) for i in shown if texts[i] is None and tokens[int(i)].is_valid]
        decoded = {}
        if need_decode and tok is not None:
            from spike_audit.pipelines.tokenizer import decode_batch

            seqs = [tokens[i].values.to_numpy(zero_copy_only=False) for i in need_decode]
            decoded = dict(zip(need_decode, decode_batch(tok, seqs)))
        for k, i in enumerate(sel):
            seqs = []
            lo, hi = int(off[k]), int(off[k + 1])
            show_hi = hi if limit <= 0 else min(hi, lo + limit)
            for j in range(lo, show_hi):
                if texts[j] is not None:
                    ex, kind = texts[j], "text"
                elif j in decoded:
                    ex, kind = decoded[j], "decoded"
                elif tokens[j].is_valid:
                    ids_ = tokens[j].values.to_numpy(zero_copy_only=False)[:32]
                    ex, kind = " ".join(map(str, ids_.tolist())), "token_ids"
                else:
                    ex, kind = "", "none"
                seqs.append({"row": int(rows[j]), "row_end": int(row_end[j]),
                             "n_tokens": None if text_only else int(n_tok[j]),
                             "excerpt_kind": kind, "excerpt": _excerpt(ex, max_chars)})
            slices_out[i] = {
                "manifest_row": int(ids[i]), "shard": s_name, "unit": u, "row_start": int(start[i]),
                "row_end": int(end[i]), "rank": rank[i], "micro_batch": micro[i], "epoch": epoch[i],
                "n_sequences": hi - lo, "n_tokens": None if text_only else int(n_tok[lo:hi].sum()),
                "tokens_read": not text_only, "sequences": seqs,
                "n_not_shown": (hi - lo) - len(seqs),
            }
    out = [s for s in slices_out if s is not None]
    return {
        "manifest": str(manifest), "step": step, "step_convention": meta.get("step_convention"),
        "trainer": trainer, "log_step": step + base if base is not None else None, "n_slices": len(out),
        "n_sequences": sum(s["n_sequences"] for s in out),
        "n_tokens": sum(s["n_tokens"] or 0 for s in out), "tokens_column": tokens_col,
        "text_only_shards": [{"shard": k, "integer_list_columns": v} for k, v in sorted(no_tokens.items())],
        "n_shards": len(set(shard)), "flat_rows": row_def.to_meta() if row_def is not None else None,
        "fed_pad_id": meta.get("fed_pad_id"), "n_pad_fed_as_0": n_fed_pad, "slices": out,
    }


def format_report(rep: dict) -> str:
    from spike_audit.pipelines.cli.terminal import one_line_text
    from spike_audit.schemas.steps import as_logged as _as_logged

    shown = _as_logged(rep.get("trainer"), rep["step"]) if rep.get("log_step") is not None else None
    as_logged = f" ({shown})" if shown else ""
    unread = sum(s["n_sequences"] for s in rep["slices"] if not s.get("tokens_read", True))
    tokens = f"{rep['n_tokens']:,} tokens" + (f" (and {unread:,} sequences of text only)" if unread else "")
    lines = [f"step {rep['step']}{as_logged}: {rep['n_slices']} slices, {rep['n_sequences']:,} sequences, "
             f"{tokens} from {rep['n_shards']} shard(s)  [{one_line_text(rep['manifest'])}]"]
    for t in rep.get("text_only_shards", []):
        cols = t["integer_list_columns"]
        hint = (f"; its integer-list column{'s' if len(cols) > 1 else ''} {', '.join(map(repr, cols))}: give "
                f"--tokens-column {cols[0]}" if cols else "; read as text only")
        lines.append(f"  {one_line_text(t['shard'])}: no {rep['tokens_column']!r} column, token counts not read{hint}")
    if rep.get("n_pad_fed_as_0"):
        lines.append(f"  {rep['n_pad_fed_as_0']:,} occurrence(s) of pad id {rep['fed_pad_id']} shown as 0, as the "
                     f"trainer fed them (loss masked)")
    for s in rep["slices"]:
        extra = "".join(f" {k}={s[k]}" for k in ("rank", "micro_batch", "epoch") if s.get(k) is not None)
        what = "rows" if s["unit"] == "row" else "tokens"
        lines.append(f"  {one_line_text(s['shard'])} {what} [{s['row_start']}, {s['row_end']}){extra}: "
                     f"{s['n_sequences']:,} sequences, "
                     + (f"{s['n_tokens']:,} tokens" if s.get("tokens_read", True) else "tokens not read"))
        for q in s["sequences"]:
            where = f"[{q['row']}]" if s["unit"] == "row" else f"[{q['row']}:{q['row_end']}]"
            n_tok = f"{q['n_tokens']} tok" if q["n_tokens"] is not None else "text"
            lines.append(f"    {where} {n_tok} | {one_line_text(q['excerpt'])}")
        if s["n_not_shown"]:
            lines.append(f"    ... {s['n_not_shown']:,} more sequences (use --limit 0 to show all)")
    return "\n".join(lines)


def run(args) -> int:
    from spike_audit.pipelines.cli.tokens import resolve_tokens

    from spike_audit.pipelines.errors import UserError

    for flag, v in (("--max-chars", args.max_chars), ("--limit", args.limit)):
        if v < 0:
            raise UserError(f"{flag} must be >= 0, got {v}")
    rows, _, _ = resolve_tokens(args.tokenizer, args.eos_id, args.pad_id, args.rows, args.seq_len)
    rep = step_report(args.manifest, shard_root_of(args), args.step, tokenizer=args.tokenizer,
                      max_chars=args.max_chars, limit=args.limit, tokens_col=args.tokens_col, text_col=args.text_col,
                      dtype=args.dtype, allow_overlap=args.allow_overlap, rows=rows, log_step=args.log_step)
    # Training text may carry terminal escape sequences: shown as escapes, never sent raw.
    if args.json:
        sys.stdout.write(json_printable(json.dumps(rep, indent=2, ensure_ascii=False)) + "\n")
    else:
        print(printable(format_report(rep)))
    return 0
