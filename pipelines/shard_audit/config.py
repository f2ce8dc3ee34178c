"""The shard audit's configuration, a shard as the audit sees it (name, path, fingerprint), and the node-id
layout of rows (shard index in the high bits)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from spike_audit.pipelines.shards.rows import RowDef


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
    alpha: float = 0.05
    min_rows: int = 2
    threshold: float = 0.5
    buckets: int = 16
    max_group: int = 1000
    cc_iterations: int = 32
    eos_id: int | None = None
    pad_id: int | None = None
    tokenizer: str | None = None  # token-only shards are decoded with it for the text signals
    rows: str | None = None  # row definition of flat token files: windows / documents / idx (shards.rows)
    seq_len: int | None = None
    flat_rows: RowDef | None = None  # resolved by resolve_tokens (flags and the tokenizer's EOS)
    tokenizer_special: tuple | None = None  # what the tokenizer says: (key, value) pairs, for the outputs
    vocab_size: int | None = None
    seed: int = 0
    allow_outside_root: bool = False  # files found in an input directory may resolve outside it (symlinks)
    baseline: str | None = None  # judge against a saved baseline (pipelines.beam.baseline), not leave-one-out
    save_baseline: str | None = None  # save this corpus as a baseline


def resolve_tokens(cfg: ShardAuditConfig) -> ShardAuditConfig:
    """``cfg`` with the EOS / pad ids taken from the tokenizer where not given and the row definition of flat
    token files resolved."""
    from dataclasses import replace

    from spike_audit.pipelines.settings import check_values
    from spike_audit.pipelines.shards.rows import row_def
    from spike_audit.pipelines.tokenizer import resolve_special

    check_values(cfg)  # a ShardAuditConfig built by hand (the Python API) is checked too
    eos, pad, special = resolve_special(cfg.tokenizer, cfg.eos_id, cfg.pad_id)
    return replace(cfg, eos_id=eos, pad_id=pad, flat_rows=cfg.flat_rows or row_def(cfg.rows, cfg.seq_len, eos),
                   tokenizer_special=tuple(sorted(special.items())) if special else None)


def token_summary(cfg: ShardAuditConfig) -> dict:
    """How token ids were read and interpreted (``summary.json``): row definition, EOS / pad, tokenizer."""
    return {"flat_rows": cfg.flat_rows.to_meta() if cfg.flat_rows is not None else None, "eos_id": cfg.eos_id,
            "pad_id": cfg.pad_id, "tokenizer": cfg.tokenizer,
            "tokenizer_special_tokens": dict(cfg.tokenizer_special) if cfg.tokenizer_special else None,
            "text_decoded_from_tokens": bool(cfg.tokenizer)}


@dataclass(frozen=True)
class Shard:
    name: str  # relative to the root: the id in every output
    path: str
    size: int
    mtime: float

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.path}\0{self.size}\0{self.mtime!r}".encode()).hexdigest()[:20]
