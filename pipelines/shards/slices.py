"""Row-slice arithmetic (``[start, end)`` pairs: expand, coalesce, bounds) and the one output batch layout every
reader returns (:data:`SLICES_SCHEMA`: ``tokens`` always ``list<int64>``, so batches from any shard concatenate)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from spike_audit.pipelines.errors import UserError


UNITS = ("row", "token")


SLICES_SCHEMA = pa.schema(
    [
        pa.field("tokens", pa.list_(pa.int64())),
        pa.field("text", pa.string()),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),
        pa.field("row_end", pa.int64(), nullable=False),
        pa.field("unit", pa.string(), nullable=False),
    ]
)


def as_slices(slices) -> np.ndarray:
    arr = np.asarray(slices, dtype=np.int64)
    if arr.size == 0:
        return np.zeros((0, 2), np.int64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"slices must be an (n, 2) array of [start, end), got shape {arr.shape}")
    return arr


def expand_rows(slices: np.ndarray) -> np.ndarray:
    """All row indices covered by ``slices``, slice by slice, in order (vectorised)."""
    lengths = slices[:, 1] - slices[:, 0]
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    starts = np.repeat(slices[:, 0] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return starts + np.arange(total, dtype=np.int64)


def coalesce(slices: np.ndarray, gap: int = 0) -> np.ndarray:
    """Merge overlapping or adjacent (within ``gap``) ranges; returns sorted disjoint ``(m, 2)``."""
    s = as_slices(slices)
    if len(s) == 0:
        return s
    s = s[np.lexsort((s[:, 1], s[:, 0]))]
    run_end = np.maximum.accumulate(s[:, 1])
    new = np.ones(len(s), bool)
    new[1:] = s[1:, 0] > run_end[:-1] + gap
    group = np.cumsum(new) - 1
    starts = s[new, 0]
    ends = np.zeros(len(starts), np.int64)
    np.maximum.at(ends, group, s[:, 1])
    return np.stack([starts, ends], axis=1)


def _check_bounds(shard: str, slices: np.ndarray, n: int, what: str) -> None:
    if len(slices) == 0:
        return
    bad = np.flatnonzero((slices[:, 0] < 0) | (slices[:, 1] < slices[:, 0]) | (slices[:, 1] > n))
    if len(bad):
        a, b = slices[bad[0]]
        if b > n:
            raise UserError(f"{shard}: slice [{a}, {b}) is past its end ({n} {what})")
        raise UserError(f"{shard}: slice [{a}, {b}) is not a valid half-open range")


def _list_array(values: np.ndarray, offsets: np.ndarray) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values.astype(np.int64)))


def _to_int64_lists(col: pa.ChunkedArray | pa.Array, shard: str, name: str) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    t = col.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) or not (
        pa.types.is_integer(t.value_type)
    ):
        raise UserError(f"{shard}: column {name!r} has type {t}, expected list<int> token ids")
    return col.cast(pa.list_(pa.int64()))


def _to_string(col, shard: str, name: str) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_null(col.type)):
        raise UserError(f"{shard}: column {name!r} has type {col.type}, expected string text")
    return col.cast(pa.string())


def _batch(tokens: pa.Array | None, text: pa.Array | None, shard: str, row: np.ndarray, row_end: np.ndarray,
           unit: str) -> pa.RecordBatch:
    n = len(row)
    return pa.RecordBatch.from_arrays(
        [
            tokens if tokens is not None else pa.nulls(n, pa.list_(pa.int64())),
            text if text is not None else pa.nulls(n, pa.string()),
            pa.array(np.full(n, shard, dtype=object), pa.string()),
            pa.array(row.astype(np.int64)),
            pa.array(row_end.astype(np.int64)),
            pa.array(np.full(n, unit, dtype=object), pa.string()),
        ],
        schema=SLICES_SCHEMA,
    )


def empty_batch() -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([], schema=SLICES_SCHEMA)
