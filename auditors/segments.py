"""Ragged-array arithmetic over a batch's offsets: per-token positions, segment reductions, documents as maximal
runs between separator tokens, and chunk bounds for the chunked per-token loops."""

from __future__ import annotations

from itertools import pairwise
import numpy as np


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
