"""Shared vectorised helpers: seeded 64-bit mixing, per-token positions, segment reductions.

Every hash here is pure uint64 arithmetic (wrapping multiply/add/xor/shift), so it is identical on
every platform and numpy version; nothing depends on Python's ``hash`` or on byte order.
"""

from __future__ import annotations

import numpy as np

M64 = (1 << 64) - 1
_C1 = np.uint64(0xFF51AFD7ED558CCD)  # murmur3 fmix64 constants
_C2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
GOLDEN = 0x9E3779B97F4A7C15

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


def token_mix(values: np.ndarray, key: int) -> np.ndarray:
    """``fmix64(token ^ key)`` for every token (uint64). Uses a vocab-sized table when ids are small."""
    if len(values) == 0:
        return np.zeros(0, dtype=np.uint64)
    vmax = int(values.max())
    if int(values.min()) < 0:
        raise ValueError("token ids must be non-negative")
    k = np.uint64(key)
    if vmax < _TABLE_MAX and vmax < 4 * len(values) + 65536:
        table = np.arange(vmax + 1, dtype=np.uint64)
        table ^= k
        fmix64(table, out=table)
        return table[values]
    x = values.astype(np.uint64)
    x ^= k
    return fmix64(x, out=x)


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


def segments_from_mask(offsets: np.ndarray, is_sep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split rows at separator tokens (e.g. EOS). Returns ``(starts, ends, row)`` of the documents.

    A document is a maximal run of non-separator tokens inside one row: separators belong to no
    document, row boundaries end documents, and empty documents (two separators in a row) do not
    exist. ``row`` is the row each document lies in.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    n = int(offsets[-1])
    if n == 0:
        z = np.zeros(0, np.int64)
        return z, z, z
    keep = ~np.asarray(is_sep[:n], dtype=bool)
    lengths = np.diff(offsets)
    row_starts = offsets[:-1][lengths > 0]
    row_lasts = offsets[1:][lengths > 0] - 1
    prev = np.empty(n, dtype=bool)
    prev[0] = False
    prev[1:] = keep[:-1]
    prev[row_starts] = False
    nxt = np.empty(n, dtype=bool)
    nxt[-1] = False
    nxt[:-1] = keep[1:]
    nxt[row_lasts] = False
    starts = np.flatnonzero(keep & ~prev)
    ends = np.flatnonzero(keep & ~nxt) + 1
    row = np.searchsorted(offsets, starts, side="right") - 1
    return starts, ends, row


def hash_segments(values: np.ndarray, starts: np.ndarray, ends: np.ndarray, seed: int) -> np.ndarray:
    """Seeded 64-bit hash of every segment ``values[starts[i]:ends[i]]`` (order and length sensitive).

    Definition: ``h = fmix64(sum_j T[t_j] * Q[j] + len * GOLDEN) `` (uint64, wrapping), where
    ``T[t] = fmix64(t ^ k1)``, ``Q[j] = fmix64(j ^ k2) | 1`` and ``k1, k2`` derive from ``seed``.
    Segments must not overlap and must be sorted.
    """
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    n_seg = len(starts)
    if n_seg == 0:
        return np.zeros(0, dtype=np.uint64)
    lengths = ends - starts
    # gather the covered tokens contiguously (a no-op slice when segments tile the array)
    tiles = starts[0] == 0 and np.array_equal(starts[1:], ends[:-1])
    if tiles:
        vals = values[: ends[-1]]
        offs = np.concatenate([starts, ends[-1:]])
    else:
        offs = np.zeros(n_seg + 1, np.int64)
        np.cumsum(lengths, out=offs[1:])
        idx = np.repeat(starts - offs[:-1], lengths)
        idx += np.arange(offs[-1], dtype=np.int64)
        vals = values[idx]
    k1, k2 = seed_key(seed, 1), seed_key(seed, 2)
    m = token_mix(vals, k1)
    maxlen = int(lengths.max()) if n_seg else 0
    q = np.arange(max(maxlen, 1), dtype=np.uint64)
    q ^= np.uint64(k2)
    fmix64(q, out=q)
    q |= np.uint64(1)
    if len(m):
        m *= q[positions(offs, len(m))]
    h = segment_reduce(np.add, m, offs, 0)
    h += lengths.astype(np.uint64) * np.uint64(GOLDEN)
    return fmix64(h, out=h)
