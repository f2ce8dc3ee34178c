"""Row-slice arithmetic (``[start, end)`` pairs: expand, coalesce, bounds) and the one output batch layout every
reader returns (:data:`SLICES_SCHEMA`: ``tokens`` always ``list<int64>``, so batches from any shard concatenate)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
    if len(offsets) and int(offsets[-1]) >= 2 ** 31:
        raise UserError(f"one read of {int(offsets[-1])} tokens exceeds 2^31 (list<int64> offsets); read fewer rows "
                        f"at once")
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values.astype(np.int64)))


# Token ids must be in [0, MAX_TOKEN_ID]: real vocabularies are far smaller (256k at most today), and the auditors'
# histograms are vocabulary-sized, so a corrupt id of 2^40 must be an error naming its row, not an allocation.
MAX_TOKEN_ID = 2 ** 24 - 1


def check_token_ids(values: np.ndarray | pa.Array, offsets: np.ndarray, where) -> None:
    """UserError naming the row (``where(i)`` for the i-th sequence) of the first token id that is negative,
    not an integer or larger than ``MAX_TOKEN_ID``."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        t = values.type
        if values.null_count:
            first = int(np.flatnonzero(~_valid(values))[0])
            seq = int(np.searchsorted(np.asarray(offsets), first, side="right") - 1)
            raise UserError(f"{where(seq)}: a null token id; expected integer token ids")
        if len(values) == 0 or (pa.types.is_unsigned_integer(t) and t.bit_width <= 16):
            return
        mm = pc.min_max(values)
        lo, hi = mm["min"].as_py(), mm["max"].as_py()
        if lo is None or (lo >= 0 and hi <= MAX_TOKEN_ID and pa.types.is_integer(t)):
            return
        values = values.to_numpy(zero_copy_only=False)
    else:
        dt = values.dtype
        if len(values) == 0 or (dt.kind == "u" and dt.itemsize <= 2) or dt.kind == "b":
            return
        if dt.kind in "iu" and int(values.min()) >= 0 and int(values.max()) <= MAX_TOKEN_ID:
            return
    v = np.asarray(values)
    with np.errstate(invalid="ignore"):
        bad = (v < 0) | (v > MAX_TOKEN_ID)
        if v.dtype.kind == "f":
            bad |= ~np.isfinite(v) | (np.round(v) != v)
    first = int(np.flatnonzero(bad)[0])
    seq = int(np.searchsorted(np.asarray(offsets), first, side="right") - 1)
    raise UserError(f"{where(seq)}: token id {v[first].item()!r} is not a token id (expected an integer in "
                    f"[0, {MAX_TOKEN_ID}])")


def _to_int64_lists(col: pa.ChunkedArray | pa.Array, shard: str, name: str, where=None) -> pa.Array:
    """A list<int> column as list<int64>, every id checked (see :func:`check_token_ids`); ``where(i)`` names
    the i-th row in an error."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    t = col.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) or not (
        pa.types.is_integer(t.value_type)
    ):
        raise UserError(f"{shard}: column {name!r} has type {t}, expected list<int> token ids")
    if pa.types.is_fixed_size_list(t):
        col = col.cast(pa.list_(t.value_type))
    if pa.types.is_large_list(col.type) and len(col) and col.offsets[-1].as_py() >= 2 ** 31:
        raise UserError(f"{shard}: column {name!r} holds more than 2^31 tokens in one read; read fewer rows at once")
    offsets = np.asarray(col.offsets, dtype=np.int64)
    values = col.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0])) if len(col) else col.values.slice(0, 0)
    check_token_ids(values, offsets - offsets[0], where or (lambda i: f"{shard}: row {i}"))
    return col.cast(pa.list_(pa.int64()))


def check_rows(tokens: pa.Array | None, text: pa.Array | None, where, tokens_col: str = "tokens",
               text_col: str = "text") -> tuple[pa.Array | None, pa.Array | None]:
    """A row whose tokens (or, in a text-only shard, whose text) are null is an error naming it, never read as an
    empty row (empty rows feed the duplicate signals). A tokens column that is null in every row of a shard that has
    text is no tokens column."""
    if tokens is not None and tokens.null_count:
        if text is not None and tokens.null_count == len(tokens):
            tokens = None
        else:
            i = int(np.flatnonzero(~_valid(tokens))[0])
            raise UserError(f"{where(i)}: {tokens_col!r} is null; expected a list of token ids")
    if tokens is None and text is not None and text.null_count:
        i = int(np.flatnonzero(~_valid(text))[0])
        raise UserError(f"{where(i)}: {text_col!r} is null; expected a string")
    if text is not None and (pa.types.is_string(text.type) or pa.types.is_large_string(text.type)):
        _check_utf8(text, where, text_col)
    return tokens, text


def _check_utf8(text: pa.Array, where, text_col: str) -> None:
    """A string column is UTF-8 by Arrow's contract, but a Parquet writer can store any bytes in it: one full
    validation (vectorised), and on failure a bisection to the first bad row, named."""
    if isinstance(text, pa.ChunkedArray):
        text = text.combine_chunks()
    try:
        text.validate(full=True)
        return
    except pa.ArrowInvalid:
        pass
    lo, hi = 0, len(text)  # the first row whose prefix [0, row] is invalid
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            text.slice(0, mid).validate(full=True)
            lo = mid
        except pa.ArrowInvalid:
            hi = mid
    raise UserError(f"{where(lo)}: {text_col!r} is not valid UTF-8 text (a writer stored other bytes in the text "
                    f"column)")


def _valid(arr: pa.Array) -> np.ndarray:
    v = pc.is_valid(arr)
    bits = np.frombuffer(v.buffers()[1], np.uint8)
    return np.unpackbits(bits, bitorder="little")[v.offset:v.offset + len(v)].astype(bool)


def _to_string(col, shard: str, name: str) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_dictionary(col.type) and (pa.types.is_string(col.type.value_type)
                                             or pa.types.is_large_string(col.type.value_type)):
        col = col.dictionary_decode()  # a dictionary-encoded text column (pandas categorical): the same strings
    if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
        # text stored as bytes (Spark without binaryAsString, some writers): the same bytes as a string column,
        # no copy; check_rows then validates them as UTF-8 and names the first row that is not
        col = col.view(pa.large_string() if pa.types.is_large_binary(col.type) else pa.string())
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
