"""Shared vectorised helpers: seeded 64-bit mixing, per-token positions, segment reductions.

Every hash here is pure uint64 arithmetic (wrapping multiply/add/xor/shift), so it is identical on
every platform and numpy version; nothing depends on Python's ``hash`` or on byte order.
"""

from __future__ import annotations

import sys
from functools import lru_cache
from itertools import pairwise

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

M64 = (1 << 64) - 1
_C1 = np.uint64(0xFF51AFD7ED558CCD)  # murmur3 fmix64 constants
_C2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
GOLDEN = 0x9E3779B97F4A7C15

#: Tokens per chunk of the chunked per-token loops (temporaries stay in the L2 cache).
_CHUNK = 1 << 17

#: Largest token id for which per-token mixes are looked up in a table instead of computed.
_TABLE_MAX = 1 << 22


def fmix64(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """murmur3's 64-bit finaliser, vectorised (a bijection on uint64). Works in place on ``out``."""
    if out is None:
        out = np.array(x, dtype=np.uint64, copy=True)
    elif out is not x:
        np.copyto(out, x, casting="unsafe")
    out ^= out >> _S33
    out *= _C1
    out ^= out >> _S33
    out *= _C2
    out ^= out >> _S33
    return out


def fmix64_int(x: int) -> int:
    """Scalar fmix64 on a Python int (for deriving constants from seeds)."""
    x &= M64
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & M64
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & M64
    x ^= x >> 33
    return x


def seed_key(seed: int, salt: int) -> int:
    """A 64-bit key derived from a user seed and a per-use salt."""
    return fmix64_int(fmix64_int((seed & M64) ^ (salt * GOLDEN & M64)) + salt)


@lru_cache(maxsize=4)
def _mix_table(key: int, size: int) -> np.ndarray:
    """``fmix64(t ^ key)`` for ``t < size`` (read-only; cached per key and size)."""
    table = np.arange(size, dtype=np.uint64)
    table ^= np.uint64(key)
    fmix64(table, out=table)
    table.flags.writeable = False
    return table


@lru_cache(maxsize=4)
def _mix_table_hi32(key: int, size: int) -> np.ndarray:
    table = (_mix_table(key, size) >> np.uint64(32)).astype(np.uint32)
    table.flags.writeable = False
    return table


def take(table: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``table[idx]`` for a 1-D numeric ``table`` and integer indices (the result may be read-only).

    Large gathers go through Arrow's ``take`` kernel (bounds-checked), several times faster than
    numpy's fancy indexing on small-integer indices; the values are the same.
    """
    if len(idx) < 4096 or idx.dtype.kind not in "iu" or table.dtype.kind not in "iuf":
        return table[idx]
    idx = np.ascontiguousarray(idx)
    return pc.take(pa.array(table), pa.array(idx)).to_numpy(zero_copy_only=True)


def _table_size(values: np.ndarray) -> int:
    """Size of the lookup table for ``values`` (a power of two >= 65536), or 0 to compute directly."""
    if len(values) == 0:
        return 0
    vmax = int(values.max())
    if values.dtype.kind == "i" and int(values.min()) < 0:
        raise ValueError("token ids must be non-negative")
    if vmax < _TABLE_MAX and vmax < 4 * len(values) + 65536:
        return max(65536, 1 << vmax.bit_length())
    return 0


def token_mix(values: np.ndarray, key: int, hi32: bool = False) -> np.ndarray:
    """``fmix64(token ^ key)`` for every token (uint64). Uses a vocab-sized table when ids are small.

    With ``hi32`` the result is the high 32 bits of the same value (uint32).
    """
    if len(values) == 0:
        return np.zeros(0, dtype=np.uint32 if hi32 else np.uint64)
    size = _table_size(values)
    if size:
        return take((_mix_table_hi32 if hi32 else _mix_table)(key, size), values)
    x = values.astype(np.uint64)
    x ^= np.uint64(key)
    fmix64(x, out=x)
    return (x >> np.uint64(32)).astype(np.uint32) if hi32 else x


def positions(offsets: np.ndarray, n: int | None = None) -> np.ndarray:
    """Position of every token inside its row (int64, length ``offsets[-1]``)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    n = int(offsets[-1]) if n is None else n
    lengths = np.diff(offsets)
    pos = np.arange(n, dtype=np.int64)
    pos -= np.repeat(offsets[:-1], lengths)
    return pos


def segment_reduce(ufunc: np.ufunc, x: np.ndarray, offsets: np.ndarray, empty) -> np.ndarray:
    """``ufunc.reduce`` over ``x[offsets[i]:offsets[i+1]]`` for every segment; ``empty`` for empty ones.

    ``np.ufunc.reduceat`` mishandles empty segments (it returns the next element); this wraps it so
    empty segments get ``empty`` and trailing empty segments do not index past the end.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    n_seg = len(offsets) - 1
    out = np.full(n_seg, empty, dtype=x.dtype)
    if n_seg <= 0:
        return out
    lengths = np.diff(offsets)
    nonempty = lengths > 0
    if not nonempty.any():
        return out
    x = x[: offsets[-1]]
    starts = offsets[:-1][nonempty]
    out[nonempty] = ufunc.reduceat(x, starts)
    return out


def _sorted_union(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sorted distinct values of two sorted int64 arrays."""
    c = np.concatenate([a, b])
    c.sort(kind="stable")  # two sorted runs: a merge
    keep = np.ones(len(c), dtype=bool)
    np.not_equal(c[1:], c[:-1], out=keep[1:])
    return c[keep]


def segments_from_mask(offsets: np.ndarray, is_sep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split rows at separator tokens (e.g. EOS). Returns ``(starts, ends, row)`` of the documents.

    A document is a maximal run of non-separator tokens inside one row: separators belong to no
    document, row boundaries end documents, and empty documents (two separators in a row) do not
    exist. ``row`` is the row each document lies in.

    Only the separator positions are examined after one pass over the mask: a document starts at a
    row start or right after a separator, and ends at a row end or at a separator, when the token
    there (resp. just before) is not a separator.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    n = int(offsets[-1])
    if n == 0:
        z = np.zeros(0, np.int64)
        return z, z, z
    is_sep = np.asarray(is_sep[:n], dtype=bool)
    sep = np.flatnonzero(is_sep)
    lengths = np.diff(offsets)
    nonempty = lengths > 0
    cand = _sorted_union(offsets[:-1][nonempty], sep + 1)
    cand = cand[cand < n]
    starts = cand[~is_sep[cand]]
    cand = _sorted_union(offsets[1:][nonempty], sep)
    cand = cand[cand > 0]
    ends = cand[~is_sep[cand - 1]]
    row = np.searchsorted(offsets, starts, side="right") - 1
    return starts, ends, row


def chunk_bounds(bounds: np.ndarray, size: int) -> list[tuple[int, int]]:
    """Split segments with sorted boundaries ``bounds`` (``len = n_seg + 1``) into consecutive groups
    ``[a, b)`` spanning about ``size`` elements each (a longer segment forms its own group), so that
    the per-element temporaries of a group stay in cache. Empty when there is no segment."""
    n_seg = len(bounds) - 1
    if n_seg <= 0:
        return []
    lo, hi = int(bounds[0]), int(bounds[-1])
    if hi - lo <= size:
        return [(0, n_seg)]
    cuts = np.searchsorted(bounds, np.arange(lo + size, hi, size), side="right") - 1
    cuts = np.unique(np.concatenate([[0], cuts, [n_seg]])).tolist()
    return list(pairwise(cuts))


@lru_cache(maxsize=16)
def _pos_table(key: int, size: int) -> np.ndarray:
    """``Q[j] = fmix64(j ^ key) | 1`` for ``j < size`` (read-only; cached)."""
    q = np.arange(size, dtype=np.uint64)
    q ^= np.uint64(key)
    fmix64(q, out=q)
    q |= np.uint64(1)
    q.flags.writeable = False
    return q


def _pos_weights(key: int, length: int) -> np.ndarray:
    return _pos_table(key, max(4096, 1 << max(length - 1, 0).bit_length()))


def hash_segments(values: np.ndarray, starts: np.ndarray, ends: np.ndarray, seed: int) -> np.ndarray:
    """Seeded 64-bit hash of every segment ``values[starts[i]:ends[i]]`` (order and length sensitive).

    Definition: ``h = fmix64(sum_j T[t_j] * Q[j] + len * GOLDEN) `` (uint64, wrapping), where
    ``T[t] = fmix64(t ^ k1)``, ``Q[j] = fmix64(j ^ k2) | 1`` and ``k1, k2`` derive from ``seed``.
    Segments must not overlap and must be sorted. This is the plain reference implementation (it
    gathers the covered tokens); :func:`hash_rows_and_docs` computes the same values for the rows
    and documents of a batch without gathering.
    """
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    n_seg = len(starts)
    if n_seg == 0:
        return np.zeros(0, dtype=np.uint64)
    lengths = ends - starts
    offs = np.zeros(n_seg + 1, np.int64)
    np.cumsum(lengths, out=offs[1:])
    idx = np.repeat(starts - offs[:-1], lengths)
    idx += np.arange(offs[-1], dtype=np.int64)
    m = token_mix(values[idx], seed_key(seed, 1))
    if len(m):
        m *= take(_pos_weights(seed_key(seed, 2), int(lengths.max())), positions(offs, len(m)))
    h = segment_reduce(np.add, m, offs, 0)
    h += lengths.astype(np.uint64) * np.uint64(GOLDEN)
    return fmix64(h, out=h)


def _ramp(n: int, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Position of every element inside its segment, for segments tiling ``[0, n)`` (int32/int64)."""
    dt = np.int32 if n < 2**31 else np.int64
    pos = np.arange(n, dtype=dt)
    pos -= np.repeat(starts.astype(dt), lengths)
    return pos


def hash_rows_and_docs(cache: BatchCache, seed: int, sep_id: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """:func:`hash_segments` of every row and (with ``sep_id``) of every document of a batch.

    Returns ``(row_hashes, doc_hashes, doc_row)`` (the last two None without ``sep_id``); documents
    as :func:`segments_from_mask` defines them. Same values as :func:`hash_segments`, computed in
    one pass over the tokens, in row groups of about ``_CHUNK`` tokens so temporaries stay in cache:

    * rows: ``T[t] * Q[position in row]``, summed per row; equal-length rows need no position array;
    * documents: a document that begins its row has the row's products, so only the documents
      starting after a separator are recomputed (when they hold most tokens of the group, all
      products are recomputed over each document extended up to the next one); separator tokens
      get weight 0 and the products are summed from each document's start to the next one's.
    """
    c = cache
    off, lengths = c.offsets, c.lengths()
    n_rows = len(lengths)
    k2 = seed_key(seed, 2)
    rsum = np.zeros(n_rows, dtype=np.uint64)
    dsum = starts = ends = drow = None
    if sep_id is not None:
        starts, ends, drow = c.docs(sep_id)
        dsum = np.zeros(len(starts), dtype=np.uint64)
        mid = starts != off[drow]  # documents not beginning their row
    if c.n:
        mix = c.token_mix(seed_key(seed, 1))
        q = _pos_weights(k2, int(lengths.max()))
        for a, b in chunk_bounds(off, _CHUNK):
            s0, s1 = int(off[a]), int(off[b])
            m = mix[s0:s1]
            ln = lengths[a:b]
            width = int(ln[0])
            if width and (ln == width).all():
                prod2 = m.reshape(b - a, width) * q[:width]
                rsum[a:b] = prod2.sum(axis=1, dtype=np.uint64)
                prod = prod2.reshape(-1)
            else:
                prod = np.multiply(take(q, _ramp(s1 - s0, off[a:b] - s0, ln)), m)
                rsum[a:b] = segment_reduce(np.add, prod, off[a : b + 1] - s0, 0)
            if sep_id is None:
                continue
            da, db = np.searchsorted(drow, [a, b]).tolist()
            if da == db:
                continue
            ds, de = starts[da:db] - s0, ends[da:db] - s0
            lo, hi = int(ds[0]), int(de[-1])
            ext = np.append(ds, hi) - lo  # documents extended to the next one's start
            ext_len = np.diff(ext)
            dl = de - ds
            mm = mid[da:db]
            n_mid = int(dl[mm].sum())
            if 2 * n_mid > hi - lo:
                qd = _pos_weights(k2, int(ext_len.max()))
                region = np.multiply(take(qd, _ramp(hi - lo, ext[:-1], ext_len)), m[lo:hi])
            else:
                if n_mid:
                    ml = dl[mm]
                    pos = _ramp(n_mid, np.cumsum(ml) - ml, ml)
                    idx = np.repeat(ds[mm], ml)
                    idx += pos
                    prod[idx] = np.multiply(take(m, idx), take(q, pos))
                region = prod[lo:hi]
            gap = ext_len - dl  # separators after each document
            n_gap = int(gap.sum())
            if n_gap:
                region[_ramp(n_gap, np.cumsum(gap) - gap, gap) + np.repeat(de - lo, gap)] = 0
            dsum[da:db] = segment_reduce(np.add, region, ext, 0)
    rsum += lengths.astype(np.uint64) * np.uint64(GOLDEN)
    fmix64(rsum, out=rsum)
    if dsum is not None:
        dsum += (ends - starts).astype(np.uint64) * np.uint64(GOLDEN)
        fmix64(dsum, out=dsum)
    return rsum, dsum, drow


class BatchCache:
    """Arrays derived from one batch that several auditors need, each computed at most once.

    ``Suite.add`` builds one per batch and hands it to every auditor; an auditor used alone builds
    its own. Entries are keyed by what they depend on (a hash key, a separator id), so auditors with
    different parameters never share a wrong array. Cached arrays must not be modified.
    """

    __slots__ = ("_memo", "batch", "n", "offsets", "values")

    def __init__(self, batch):
        self.batch = batch
        self.offsets = np.asarray(batch.offsets, dtype=np.int64)
        self.n = int(self.offsets[-1]) if len(self.offsets) else 0
        self.values = batch.values[: self.n]
        self._memo: dict = {}

    def memo(self, key, fn):
        try:
            return self._memo[key]
        except KeyError:
            out = self._memo[key] = fn()
            return out

    def lengths(self) -> np.ndarray:
        return self.memo("lengths", lambda: np.diff(self.offsets))

    def token_mix(self, key: int, hi32: bool = False) -> np.ndarray:
        """:func:`token_mix` of the batch's tokens; the uint32 high halves reuse the uint64 mixes
        when those are already cached."""
        if hi32 and ("mix", key, False) in self._memo and sys.byteorder == "little":
            full = self._memo[("mix", key, False)]
            return self.memo(("mix", key, True), lambda: np.ascontiguousarray(full.view(np.uint32)[1::2]))
        return self.memo(("mix", key, hi32), lambda: token_mix(self.values, key, hi32))

    def docs(self, sep_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:func:`segments_from_mask` of the batch at ``sep_id`` tokens: ``(starts, ends, row)``."""
        return self.memo(("docs", sep_id), lambda: segments_from_mask(self.offsets, self.values == sep_id))
