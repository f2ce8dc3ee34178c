"""The token flags ``batch``, ``run`` and ``shards`` share: the run's tokenizer, EOS / pad ids and what a row
of a flat token file is; resolved once per command (ids from the tokenizer when not given)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def add_token_arguments(p, tokenizer_help: str) -> None:
    from spike_audit.pipelines.shards.rows import KINDS

    p.add_argument("--tokenizer", default=None, help=tokenizer_help)
    p.add_argument("--eos-id", type=int, default=None,
                   help="end-of-document token id (document signals, --rows documents); default: the tokenizer's")
    p.add_argument("--pad-id", type=int, default=None, help="padding token id (pad_density); default: the tokenizer's")
    p.add_argument("--rows", choices=KINDS, default=None,
                   help="what a row of a flat token file (.bin, 1-D .npy) is: windows (of --seq-len tokens), "
                        "documents (EOS-delimited) or idx (a Megatron .idx's sequences); default windows when "
                        "--seq-len is given")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row of a flat token file (fixed windows)")


def resolve_tokens(tokenizer: str | None, eos_id: int | None, pad_id: int | None, rows: str | None,
                   seq_len: int | None):
    """``(row definition, eos_id, pad_id)``: EOS and pad from the tokenizer where not given, then the row
    definition (documents need the EOS)."""
    from spike_audit.pipelines.shards.rows import row_def
    from spike_audit.pipelines.tokenizer import resolve_special

    eos_id, pad_id, _ = resolve_special(tokenizer, eos_id, pad_id)
    return row_def(rows, seq_len, eos_id), eos_id, pad_id
