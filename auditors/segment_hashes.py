"""Position-weighted 64-bit hashes of token segments (rows, EOS-separated documents): the reference definition
(:func:`hash_segments`) and the one-pass row-and-document version the dedup auditor uses."""

from __future__ import annotations

import numpy as np

from spike_audit.auditors.batch_cache import BatchCache
from spike_audit.auditors.hashing import GOLDEN, _pos_weights, fmix64, seed_key, take, token_mix
from spike_audit.auditors.segments import chunk_bounds, positions, segment_reduce


#: Tokens per chunk of the chunked per-token loops (temporaries stay in the L2 cache).
_CHUNK = 1 << 17


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
    return cache.memo(("row_doc_hashes", seed, sep_id), lambda: _hash_rows_and_docs(cache, seed, sep_id))


def _hash_rows_and_docs(cache: BatchCache, seed: int, sep_id: int | None):
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
