"""Beam transform that reads manifest slices, opening each shard once.

``ReadSlices(shard_root, **reader_opts)`` takes elements ``(key, (shard, row_start, row_end, unit))``
(optionally a fifth field ``order``: an int giving the slice's position in the manifest) and yields
``(key, pa.RecordBatch)`` with :data:`pipelines.shards.SLICES_SCHEMA`:

1. key every slice by its shard and ``GroupByKey``;
2. per shard, coalesce overlapping / adjacent ranges (per unit) and read them in one
   :func:`pipelines.shards.read_slices` call, so a shard is opened once and every byte is read once;
3. split the rows back: one output batch per (key, shard, unit) holding exactly that key's rows,
   ordered by ``order`` when given, else by ``row_start`` (the manifest's own sort order within a
   shard).

A key whose slices span several shards therefore gets several batches (one per shard). The DoFn
holds only its constructor arguments (picklable, no module state).
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pyarrow as pa

from spike_audit.pipelines.progress import tick
from spike_audit.pipelines.shards.read import read_slices
from spike_audit.pipelines.shards.slices import SLICES_SCHEMA, coalesce, expand_rows


def _key_by_shard(element):
    key, value = element
    shard, start, end, unit = value[:4]
    order = value[4] if len(value) > 4 else None
    return str(shard), (key, int(start), int(end), unit or "row", order)


def split_back(batch: pa.RecordBatch, merged: np.ndarray, slices: np.ndarray, unit: str, shard: str) -> pa.RecordBatch:
    """Rows of ``slices`` (in that order) out of ``batch``, the result of reading ``merged`` (the
    coalesced, sorted ranges covering ``slices``)."""
    if unit == "row":
        rows_read = batch.column("row").to_numpy()
        return batch.take(pa.array(np.searchsorted(rows_read, expand_rows(slices))))
    # token: each merged range is one list; cut each slice out of its range's values.
    tokens = batch.column("tokens")
    list_off = np.asarray(tokens.offsets, np.int64)
    values = tokens.values.to_numpy(zero_copy_only=False)
    m = np.searchsorted(merged[:, 0], slices[:, 0], side="right") - 1
    lengths = slices[:, 1] - slices[:, 0]
    local = np.empty_like(slices)
    local[:, 0] = list_off[m] + (slices[:, 0] - merged[m, 0])
    local[:, 1] = local[:, 0] + lengths
    offsets = np.zeros(len(slices) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    toks = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values[expand_rows(local)]))
    n = len(slices)
    return pa.RecordBatch.from_arrays(
        [toks, pa.nulls(n, pa.string()), pa.array([shard] * n, pa.string()), pa.array(slices[:, 0]),
         pa.array(slices[:, 1]), pa.array([unit] * n, pa.string())],
        schema=SLICES_SCHEMA,
    )


class _ReadShardFn(beam.DoFn):
    def __init__(self, shard_root, reader_opts):
        self.shard_root = shard_root
        self.reader_opts = dict(reader_opts)

    def process(self, element):
        shard, items = element
        items = list(items)
        keys = [it[0] for it in items]
        start = np.fromiter((it[1] for it in items), np.int64, len(items))
        end = np.fromiter((it[2] for it in items), np.int64, len(items))
        units = np.array([it[3] for it in items], dtype=object)
        order = np.array([it[4] if it[4] is not None else -1 for it in items], np.int64)
        key_ids: dict = {}
        kid = np.fromiter((key_ids.setdefault(k, len(key_ids)) for k in keys), np.int64, len(items))
        key_list = list(key_ids)
        n_rows = n_tokens = 0
        for unit in ("row", "token"):
            sel = np.flatnonzero(units == unit)
            if not len(sel):
                continue
            slices = np.stack([start[sel], end[sel]], axis=1)
            merged = coalesce(slices)
            batch = read_slices(self.shard_root, shard, merged, unit=unit, **self.reader_opts)
            n_rows += int((slices[:, 1] - slices[:, 0]).sum()) if unit == "row" else len(slices)
            n_tokens += _n_tokens(batch)
            # Sort this unit's slices by (key, order, start) and cut per key.
            srt = np.lexsort((end[sel], start[sel], order[sel], kid[sel]))
            ordered = slices[srt]
            out = split_back(batch, merged, ordered, unit, shard)
            rows_per_slice = (ordered[:, 1] - ordered[:, 0]) if unit == "row" else np.ones(len(srt), np.int64)
            row_off = np.concatenate([[0], np.cumsum(rows_per_slice)])
            k_sorted = kid[sel][srt]
            bounds = np.flatnonzero(np.diff(k_sorted)) + 1
            firsts = np.concatenate([[0], bounds])
            lasts = np.concatenate([bounds, [len(srt)]])
            for a, b in zip(firsts, lasts):
                lo, hi = int(row_off[a]), int(row_off[b])
                # take (not slice) so each output owns compact buffers when pickled between stages
                yield key_list[k_sorted[a]], out.take(pa.array(np.arange(lo, hi)))
        tick("read", rows=n_rows, tokens=n_tokens, shards=1)


def _n_tokens(batch: pa.RecordBatch) -> int:
    """Tokens in a read batch (its token lists; text-only rows count 0)."""
    tokens = batch.column("tokens")
    if tokens.null_count == len(tokens):
        return 0
    off = np.asarray(tokens.offsets)
    return int(off[-1] - off[0])


def fill_text(rb: pa.RecordBatch, tok, source: str = "") -> pa.RecordBatch:
    """``rb`` (:data:`SLICES_SCHEMA`) with the ``text`` of its token-only rows decoded by ``tok`` (rows that
    have text keep it), in one batch decode."""
    import pyarrow.compute as pc

    from spike_audit.pipelines.tokenizer import decode_tokens

    text, tokens = rb.column("text"), rb.column("tokens")
    need = pc.and_(pc.is_null(text), pc.is_valid(tokens))
    n_need = pc.sum(need).as_py() or 0
    if not n_need:
        return rb
    decoded = decode_tokens(tok, pc.filter(tokens, need), source=source)
    new_text = pc.replace_with_mask(text, need, decoded)
    return rb.set_column(rb.schema.get_field_index("text"), rb.schema.field("text"), new_text)


class DecodeText(beam.DoFn):
    """``(key, RecordBatch)`` -> the same with the text of token-only rows decoded by the run's tokenizer
    (``Tokenizer.decode_batch``, one call per batch), so the text signals apply to token-only shards. The
    tokenizer is loaded once per DoFn instance (``setup``); only its path is pickled."""

    def __init__(self, tokenizer_path: str):
        super().__init__()
        self.tokenizer_path = tokenizer_path
        self._tok = None

    def setup(self):
        from spike_audit.pipelines.tokenizer import load_tokenizer

        self._tok = load_tokenizer(self.tokenizer_path)

    def process(self, kv):
        if self._tok is None:
            self.setup()
        key, rb = kv
        shard = rb.column("shard")[0].as_py() if rb.num_rows else ""
        yield key, fill_text(rb, self._tok, source=shard)


class ReadSlices(beam.PTransform):
    """``(key, (shard, row_start, row_end, unit[, order]))`` -> ``(key, pa.RecordBatch)`` of exactly those
    rows, one batch per (key, shard, unit). ``reader_opts`` go to :func:`pipelines.shards.read_slices`
    (``tokens_col``, ``text_col``, ``dtype``, ``rows``)."""

    def __init__(self, shard_root: str | None, **reader_opts):
        super().__init__()
        self.shard_root = shard_root
        self.reader_opts = reader_opts

    def expand(self, pcoll):
        return (
            pcoll
            | "KeyByShard" >> beam.Map(_key_by_shard)
            | "GroupByShard" >> beam.GroupByKey()
            | "ReadShard" >> beam.ParDo(_ReadShardFn(self.shard_root, self.reader_opts))
        )
