"""The shard audit's configuration, a shard as the audit sees it (name, path, fingerprint), and the node-id
layout of rows (shard index in the high bits)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


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
    quarantine_z: float = 8.0
    threshold: float = 0.8
    buckets: int = 16
    max_group: int = 1000
    cc_iterations: int = 32
    eos_id: int | None = None
    vocab_size: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class Shard:
    name: str  # relative to the root: the id in every output
    path: str
    size: int
    mtime: float

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.path}\0{self.size}\0{self.mtime!r}".encode()).hexdigest()[:20]
