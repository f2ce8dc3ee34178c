"""Exact duplication: seeded 64-bit hashes of rows and of EOS-separated documents.

Hash (definition: :func:`auditors._util.hash_segments`; computed for the rows and documents of a batch
in one pass by :func:`auditors._util.hash_rows_and_docs`), for a token sequence ``t_0..t_{L-1}``::

    h = fmix64( sum_j T[t_j] * Q[j]  +  L * 0x9E3779B97F4A7C15 )      (uint64, wrapping)
    T[t] = fmix64(t XOR k1),   Q[j] = fmix64(j XOR k2) OR 1,   k1, k2 = f(seed)

``fmix64`` is murmur3's 64-bit finaliser. The hash depends on token order, length and seed; it is
pure uint64 arithmetic, so identical on every platform. Two different rows collide with probability
about 2^-64.

Signals (``result``):

* ``dup_row_frac`` - within each batch passed to ``add``: fraction of rows whose hash occurs at
  least twice in that same batch (every copy counts, the first one too). Summed over batches.
* ``dup_row_frac_acc`` - within the accumulator (a shard, a step, or everything merged): fraction
  of rows whose hash occurs at least twice among all rows added to it.
* ``dup_doc_frac`` - same as ``dup_row_frac_acc`` for documents: maximal runs of non-EOS tokens
  inside a row (EOS tokens belong to no document; a row boundary ends a document). NaN without
  ``eos_id`` or when there is no document.

Rows seen at more than one step (a cross-accumulator join) are pipeline-side: group
:func:`row_hashes` by value. :func:`cross_dup_frac` gives, for one accumulator, the fraction of its
rows whose hash also occurs outside it, given the accumulator of everything audited.

The accumulator holds the distinct hashes with their counts (a few sorted uint64 + int64 arrays,
merged LSM-style), so it grows with the number of distinct rows and documents, not with tokens.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from spike_audit.auditors.batch_cache import BatchCache
from spike_audit.auditors.segment_hashes import hash_rows_and_docs
from spike_audit.auditors.base import TokenBatch

SIGNALS = {
    "dup_row_frac": "Fraction of rows whose 64-bit token hash occurs at least twice within the same batch "
    "(every copy counts); summed over batches.",
    "dup_row_frac_acc": "Fraction of rows whose 64-bit token hash occurs at least twice among all rows of the "
    "accumulator (shard, step, or everything merged).",
    "dup_doc_frac": "Fraction of EOS-separated documents (maximal non-EOS runs inside a row) whose hash occurs "
    "at least twice in the accumulator; NaN without eos_id.",
    "cross_dup_frac": "Fraction of rows whose 64-bit token hash also occurs at another audited step (spike-audit "
    "run: epoch or resume repeats) or in another shard (spike-audit shards); computed by the pipeline's join on "
    "row hashes (seen_elsewhere), NaN outside a pipeline.",
}


def row_hashes(batch: TokenBatch, seed: int = 0, cache: BatchCache | None = None) -> np.ndarray:
    """Seeded 64-bit hash of every row (uint64, length ``n_rows``); deterministic across runs."""
    c = cache if cache is not None else BatchCache(batch)
    return hash_rows_and_docs(c, seed)[0]


def doc_hashes(batch: TokenBatch, eos_id: int, seed: int = 0, cache: BatchCache | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of the EOS-separated documents of a batch and the row each lies in."""
    c = cache if cache is not None else BatchCache(batch)
    _, h, row = hash_rows_and_docs(c, seed, eos_id)
    return h, row


def _counts(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u, c = np.unique(h, return_counts=True)
    return u, c.astype(np.int64)


def _merge_counts(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    parts = [p for p in parts if len(p[0])]
    if not parts:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    if len(parts) == 1:
        return parts[0]
    keys = np.concatenate([p[0] for p in parts])
    cnts = np.concatenate([p[1] for p in parts])
    u, inv = np.unique(keys, return_inverse=True)
    return u, np.bincount(inv, weights=cnts, minlength=len(u)).astype(np.int64)


def _push(parts: list, part: tuple[np.ndarray, np.ndarray]) -> list:
    """Append a (hashes, counts) part, merging runs of similar size (LSM style: O(n log n) overall)."""
    parts = [p for p in parts if len(p[0])] + ([part] if len(part[0]) else [])
    while len(parts) >= 2 and len(parts[-2][0]) <= 2 * len(parts[-1][0]):
        parts[-2:] = [_merge_counts(parts[-2:])]
    return parts


def _dup_share(counts: np.ndarray) -> tuple[int, int]:
    """(items in groups of size >= 2, items)."""
    return int(counts[counts >= 2].sum()), int(counts.sum())


class ExactDup:
    """Exact row and document duplication (see module docstring)."""

    name = "dedup"

    def __init__(self, eos_id: int | None = None, seed: int = 0):
        self.eos_id = eos_id
        self.seed = seed

    def create(self) -> dict:
        return {"rows": [], "docs": [], "batch_dup_rows": 0, "n_rows": 0}

    def add(self, acc: dict, batch: TokenBatch, cache: BatchCache | None = None) -> dict:
        c = cache if cache is not None else BatchCache(batch)
        h, dh, _ = hash_rows_and_docs(c, self.seed, self.eos_id)
        u, c_ = _counts(h)
        rows = _push(acc["rows"], (u, c_))
        docs = acc["docs"]
        if self.eos_id is not None:
            docs = _push(docs, _counts(dh))
        return {
            "rows": rows,
            "docs": docs,
            "batch_dup_rows": acc["batch_dup_rows"] + _dup_share(c_)[0],
            "n_rows": acc["n_rows"] + batch.n_rows,
        }

    def merge(self, accs: Iterable[dict]) -> dict:
        accs = list(accs)
        if not accs:
            return self.create()
        return {
            "rows": [_merge_counts([p for a in accs for p in a["rows"]])],
            "docs": [_merge_counts([p for a in accs for p in a["docs"]])],
            "batch_dup_rows": sum(a["batch_dup_rows"] for a in accs),
            "n_rows": sum(a["n_rows"] for a in accs),
        }

    def result(self, acc: dict) -> dict[str, float]:
        n = acc["n_rows"]
        dup_rows, _ = _dup_share(_merge_counts(acc["rows"])[1])
        dup_docs, n_docs = _dup_share(_merge_counts(acc["docs"])[1])
        return {
            "dup_row_frac": acc["batch_dup_rows"] / n if n else float("nan"),
            "dup_row_frac_acc": dup_rows / n if n else float("nan"),
            "dup_doc_frac": dup_docs / n_docs if (self.eos_id is not None and n_docs) else float("nan"),
        }

    def row_signals(self, batch: TokenBatch, cache: BatchCache | None = None) -> dict[str, np.ndarray]:
        """Per row: ``dup_row_frac`` is 1.0 when the row has an identical row in the batch, and
        ``dup_doc_frac`` is the share of the row's documents that occur twice or more in the batch
        (NaN for rows without documents or without ``eos_id``)."""
        h, dh, drow = hash_rows_and_docs(cache if cache is not None else BatchCache(batch), self.seed, self.eos_id)
        _, inv, c = np.unique(h, return_inverse=True, return_counts=True)
        out = {"dup_row_frac": (c[inv] >= 2).astype(np.float64)}
        n = batch.n_rows
        if self.eos_id is None:
            out["dup_doc_frac"] = np.full(n, np.nan)
        else:
            _, dinv, dc = np.unique(dh, return_inverse=True, return_counts=True)
            per_row_docs = np.bincount(drow, minlength=n).astype(np.float64)
            per_row_dup = np.bincount(drow, weights=(dc[dinv] >= 2), minlength=n)
            with np.errstate(invalid="ignore", divide="ignore"):
                out["dup_doc_frac"] = np.where(per_row_docs > 0, per_row_dup / per_row_docs, np.nan)
        return out


def later_copies(acc: dict) -> int:
    """Rows of an :class:`ExactDup` accumulator that copy an earlier row of it: ``k - 1`` for each group of ``k``
    identical rows (a pair of copies is one duplicate)."""
    _, c = _merge_counts(acc["rows"])
    return int((c[c >= 2] - 1).sum()) if len(c) else 0


def seen_elsewhere(hashes: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose hash also occurs under another key (another step, another shard).

    ``hashes`` and ``keys`` (int64) are parallel arrays, one entry per row. Returns ``(keys, counts)``:
    for each key with at least one such row, how many of its rows have a hash that some row of a
    different key shares. Vectorised (one lexsort); the pipelines call it per hash bucket, which is
    exact because equal hashes always land in the same bucket."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    keys = np.asarray(keys, dtype=np.int64)
    if not len(hashes):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.lexsort((keys, hashes))
    h, k = hashes[order], keys[order]
    new_h = np.r_[True, h[1:] != h[:-1]]
    group = np.cumsum(new_h) - 1
    new_key = new_h | np.r_[True, k[1:] != k[:-1]]
    n_keys = np.bincount(group, weights=new_key.astype(np.float64))
    shared = n_keys[group] >= 2
    return np.unique(k[shared], return_counts=True)


#: A row hash held by more than this many keys (shards) is common boilerplate, not a copied block: it is left out
#: of :func:`shared_blocks` (which also keeps the pair expansion bounded, at most ``k * (k - 1)`` pairs a hash).
MAX_BLOCK_KEYS = 16


def shared_blocks(hashes: np.ndarray, keys: np.ndarray, max_keys: int = MAX_BLOCK_KEYS, chunk: int = 1 << 22
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct row hashes each pair of keys shares: ``(a, b, count)`` for every ordered pair of different keys
    with at least one common hash, over the hashes held by 2 to ``max_keys`` keys (identical rows under one key
    count once). A block of rows copied from one shard into another is a large count for one pair; natural
    duplicates spread over many shards give small counts to many pairs. Vectorised; exact per hash bucket (equal
    hashes share a bucket), and the counts of several buckets add up."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    keys = np.asarray(keys, dtype=np.int64)
    empty = np.zeros(0, np.int64)
    if not len(hashes):
        return empty, empty, empty
    order = np.lexsort((keys, hashes))  # distinct (hash, key), sorted: one flat sort, no 2-D unique
    h, k = hashes[order], keys[order]
    first = np.r_[True, (h[1:] != h[:-1]) | (k[1:] != k[:-1])]
    h, k = h[first], k[first]
    starts = np.flatnonzero(np.r_[True, h[1:] != h[:-1]])
    n = np.diff(np.r_[starts, len(h)])
    ok = (n >= 2) & (n <= max_keys)
    if not ok.any():
        return empty, empty, empty
    starts, n = starts[ok], n[ok]
    # an ordered key pair (a, b) as one code, (a - lo) * span + (b - lo): codes sort as the pairs do; keys spread
    # wider than 2^32 values are replaced by their ranks first (fewer than 2^32 of them)
    names = None
    lo = int(k.min())
    span = int(k.max()) - lo + 1
    if span >= 1 << 32:
        names, k = np.unique(k, return_inverse=True)
        k = np.asarray(k, dtype=np.int64).reshape(-1)
        lo, span = 0, len(names)
    # every ordered pair (i, j), i != j, of each kept hash's keys: n * n index pairs per hash, the diagonal dropped;
    # expanded a chunk of hashes at a time (at most about ``chunk`` pairs), so memory stays bounded
    sq = n * n
    ends = np.cumsum(sq)
    parts_code, parts_c = [], []
    i0 = 0
    while i0 < len(n):
        i1 = max(i0 + 1, int(np.searchsorted(ends, (ends[i0] - sq[i0]) + chunk, side="right")))
        nn, ss, st = n[i0:i1], sq[i0:i1], starts[i0:i1]
        g = np.repeat(np.arange(len(nn)), ss)
        local = np.arange(int(ss.sum())) - np.repeat(np.cumsum(ss) - ss, ss)
        i, j = local // nn[g], local % nn[g]
        keep = i != j
        a, b = k[st[g] + i][keep] - lo, k[st[g] + j][keep] - lo
        code, count = np.unique(a.astype(np.uint64) * np.uint64(span) + b.astype(np.uint64), return_counts=True)
        parts_code.append(code)
        parts_c.append(count)
        i0 = i1
    if len(parts_code) == 1:
        code, count = parts_code[0], parts_c[0]
    else:
        code, inv = np.unique(np.concatenate(parts_code), return_inverse=True)
        count = np.bincount(np.asarray(inv).reshape(-1), weights=np.concatenate(parts_c), minlength=len(code))
    a = (code // np.uint64(span)).astype(np.int64) + lo
    b = (code % np.uint64(span)).astype(np.int64) + lo
    if names is not None:
        a, b = names[a], names[b]
    return a, b, count.astype(np.int64)


def cross_dup_frac(acc: dict, everything: dict) -> float:
    """Fraction of the rows of ``acc`` whose hash also occurs outside ``acc``, where ``everything``
    is the merged accumulator of all that was audited (including ``acc``)."""
    u, c = _merge_counts(acc["rows"])
    if not len(u):
        return float("nan")
    gu, gc = _merge_counts(everything["rows"])
    idx = np.searchsorted(gu, u)
    idx = np.minimum(idx, max(len(gu) - 1, 0))
    found = (gu[idx] == u) if len(gu) else np.zeros(len(u), bool)
    total = np.where(found, gc[idx] if len(gu) else 0, c)
    return float(c[total > c].sum() / c.sum())
