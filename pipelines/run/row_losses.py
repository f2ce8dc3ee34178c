"""Per-row losses (``schemas.ROW_LOSSES``): read, validate against the manifest, join to batch rows.

A per-row loss table holds one loss per sequence of a step's global batch, keyed either by the
sequence's **batch position** (``step``, ``position``: needs a manifest with ``batch_pos``) or by its
**data identity** (``step``, ``shard``, ``row``: the row index for ``unit='row'`` slices, the token
offset where the sequence starts for ``unit='token'``). Accepted files:

* Parquet with the ``row_losses`` columns (``position`` or ``shard`` + ``row`` per row);
* JSONL (``.gz``/``.zst`` too), one object per line with the same keys;
* a ``[steps, batch]`` float ``.npy``: row ``i`` is step ``first_step + i``, column ``j`` position
  ``j`` (NaN where a loss was not logged).

Only the rows of the steps asked for are kept (Parquet by predicate push-down, JSONL streamed once,
``.npy`` memory-mapped). :func:`join_losses` checks them against the manifest rows of those steps:
a position past the step's batch, a (shard, row) the step did not consume, a key given twice, or
position keys without batch positions in the manifest are one-line errors naming the file and row.
NaN and inf losses are counted (``LossJoin.n_nonfinite``) and left out of the statistics.

:class:`BatchIndex` turns manifest rows into the sequences of each step, in batch order: a
``unit='row'`` slice of ``k`` rows holds ``k`` sequences at positions ``batch_pos .. batch_pos + k - 1``;
a ``unit='token'`` slice is one sequence, or one piece of one (Megatron samples that cross
documents: the slices sharing a ``batch_pos``, in ``seq_piece`` order). Without ``batch_pos`` (older
manifests) each sequence is its own unit, ordered as the manifest lists them.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spike_audit.pipelines.errors import UserError
from spike_audit.schemas import SchemaError, validate
from spike_audit.schemas import ROW_LOSSES

log = logging.getLogger(__name__)

_BIG = np.int64(1) << np.int64(40)  # step * _BIG + position: positions stay below 2**40


def _col(table: pa.Table, name: str):
    return table.column(name) if name in table.column_names else None


def _int_or_minus1(col, n: int) -> np.ndarray:
    if col is None:
        return np.full(n, -1, np.int64)
    return np.asarray(pc.fill_null(col, -1).to_numpy(zero_copy_only=False), np.int64)


# ------------------------------------------------------------------------------ batch index


@dataclass
class BatchIndex:
    """The sequences (units) of the audited steps, each at its batch position.

    Per unit: ``step``, ``position`` (sorted by step, then position). Per piece (a row of a
    ``unit='row'`` slice, or a ``unit='token'`` slice): ``piece_step``, ``piece_shard``,
    ``piece_row`` (row index or token offset), ``piece_end``, ``piece_unit`` (its unit), ``piece_kind``
    (``row``/``token``), ``piece_order`` (order within its unit) and ``piece_slice`` (the manifest row)."""

    step: np.ndarray
    position: np.ndarray
    known_positions: bool
    piece_step: np.ndarray
    piece_shard: pa.Array
    piece_row: np.ndarray
    piece_end: np.ndarray
    piece_kind: np.ndarray
    piece_unit: np.ndarray
    piece_order: np.ndarray
    piece_slice: np.ndarray

    @property
    def n_units(self) -> int:
        return len(self.step)

    def units_of(self, step: int) -> np.ndarray:
        """Unit ids of ``step``, in batch order."""
        lo, hi = np.searchsorted(self.step, [step, step + 1])
        return np.arange(lo, hi)

    def batch_size(self) -> dict[int, int]:
        """Per step: positions in its batch (largest position + 1)."""
        if not self.n_units:
            return {}
        last = np.flatnonzero(np.r_[self.step[1:] != self.step[:-1], True])
        return dict(zip(self.step[last].tolist(), (self.position[last] + 1).tolist()))

    @classmethod
    def from_manifest(cls, man: pa.Table, source: str = "manifest") -> "BatchIndex":
        n = man.num_rows
        step = np.asarray(man.column("step").to_numpy(zero_copy_only=False), np.int64)
        start = np.asarray(man.column("row_start").to_numpy(zero_copy_only=False), np.int64)
        end = np.asarray(man.column("row_end").to_numpy(zero_copy_only=False), np.int64)
        kind = np.asarray(pc.fill_null(man.column("unit"), "row").to_numpy(zero_copy_only=False), dtype=object)
        is_row = kind == "row"
        bp_col = _col(man, "batch_pos")
        n_null = bp_col.null_count if bp_col is not None else n
        if 0 < n_null < n:
            first = int(np.flatnonzero(np.asarray(bp_col.is_null().to_numpy(zero_copy_only=False)))[0])
            raise UserError(f"{source}: row {first}: batch_pos is null while other rows of the audited steps have "
                            f"one; a manifest records batch positions for every slice or for none")
        known = n > 0 and n_null == 0
        bp = _int_or_minus1(bp_col, n)
        piece = _int_or_minus1(_col(man, "seq_piece"), n)
        counts = np.where(is_row, end - start, 1)
        total = int(counts.sum())
        sl = np.repeat(np.arange(n, dtype=np.int64), counts)
        offs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        within = np.arange(total, dtype=np.int64) - offs[sl]
        p_step = step[sl]
        p_row = start[sl] + within
        p_end = np.where(is_row[sl], p_row + 1, end[sl])
        if known:
            if (bp < 0).any():
                i = int(np.flatnonzero(bp < 0)[0])
                raise UserError(f"{source}: row {i}: batch_pos {bp[i]} is negative")
            p_pos = bp[sl] + within
            p_order = np.where(piece[sl] >= 0, piece[sl], 0)
        else:  # each sequence is its own unit, numbered in manifest order within its step
            o = np.lexsort((np.arange(total), p_step))
            p_pos = np.empty(total, np.int64)
            s_sorted = p_step[o]
            first = np.r_[0, np.flatnonzero(s_sorted[1:] != s_sorted[:-1]) + 1]
            rank = np.arange(total) - np.repeat(first, np.diff(np.r_[first, total]))
            p_pos[o] = rank
            p_order = np.zeros(total, np.int64)
        key = p_step * _BIG + p_pos
        ukeys, p_unit = np.unique(key, return_inverse=True)
        if known and len(ukeys) < total:
            # only the token pieces of one sequence may share a position, each with its own seq_piece
            cnt = np.bincount(p_unit)
            shared = cnt[p_unit] > 1
            o = np.lexsort((p_order, p_unit))
            dup = np.zeros(total, bool)
            dup[o[1:]] = (p_unit[o][1:] == p_unit[o][:-1]) & (p_order[o][1:] == p_order[o][:-1])
            bad = np.flatnonzero(shared & (is_row[sl] | dup))
            if len(bad):
                i = int(bad[0])
                other = int(np.flatnonzero((p_unit == p_unit[i]) & (sl != sl[i]))[0]) if (
                    (p_unit == p_unit[i]) & (sl != sl[i])).any() else i
                raise UserError(f"{source}: rows {min(sl[i], sl[other])} and {max(sl[i], sl[other])} both hold "
                                f"position {p_pos[i]} of step {p_step[i]}; only the token slices of one sequence "
                                f"share a position, each with its own seq_piece")
        shards = man.column("shard").combine_chunks() if n else pa.array([], pa.string())
        return cls(step=ukeys // _BIG, position=ukeys % _BIG, known_positions=known, piece_step=p_step,
                   piece_shard=shards.take(pa.array(sl)) if n else shards, piece_row=p_row, piece_end=p_end,
                   piece_kind=kind[sl], piece_unit=p_unit.astype(np.int64), piece_order=p_order, piece_slice=sl)

    def lookup_rows(self, step, shard, row) -> np.ndarray:
        """Unit id of each (step, shard, row) (-1 where the step did not consume that row)."""
        step = np.asarray(step, np.int64)
        if not len(step):
            return np.zeros(0, np.int64)
        left = pa.table({"step": pa.array(step), "shard": pa.array(shard, pa.string()),
                         "row": pa.array(np.asarray(row, np.int64)), "__i": pa.array(np.arange(len(step)))})
        right = pa.table({"step": pa.array(self.piece_step), "shard": self.piece_shard.cast(pa.string()),
                          "row": pa.array(self.piece_row), "__unit": pa.array(self.piece_unit)})
        # (step, shard, row) names one piece (slices of a step do not overlap); a manifest accepted
        # with --allow-overlap can list a row twice: it then names the first of its units
        right = right.group_by(["step", "shard", "row"]).aggregate([("__unit", "min")])
        j = left.join(right, keys=["step", "shard", "row"], join_type="left outer").sort_by("__i")
        return np.asarray(pc.fill_null(j.column("__unit_min"), -1).to_numpy(zero_copy_only=False), np.int64)


# ------------------------------------------------------------------------------- reading


def _fmt(path: str) -> str:
    low = path.lower()
    for suf in (".gz", ".zst", ".zstd"):
        if low.endswith(suf):
            low = low[: -len(suf)]
    if low.endswith(".npy"):
        return "npy"
    if low.endswith((".parquet", ".pq")):
        return "parquet"
    if low.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    raise UserError(f"{path}: per-row losses must be Parquet (.parquet), JSONL (.jsonl[.gz|.zst]) or a "
                    f"[steps, batch] .npy")


def _wanted_mask(steps_col: np.ndarray, steps) -> np.ndarray:
    if steps is None:
        return np.ones(len(steps_col), bool)
    return np.isin(steps_col, np.asarray(sorted(steps), np.int64))


def _read_npy(path: str, steps, first_step: int) -> pa.Table:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise UserError(f"{path}: not a readable .npy ({err})") from None
    if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise UserError(f"{path}: expected a 2-D [steps, batch] array of losses, got {arr.dtype} {arr.shape}")
    all_steps = first_step + np.arange(arr.shape[0], dtype=np.int64)
    rows = np.flatnonzero(_wanted_mask(all_steps, steps))
    sub = np.asarray(arr[rows], dtype=np.float64)  # only the wanted steps are read from the memmap
    b = arr.shape[1]
    return pa.table({"step": pa.array(np.repeat(all_steps[rows], b)),
                     "position": pa.array(np.tile(np.arange(b, dtype=np.int64), len(rows))),
                     "loss": pa.array(sub.reshape(-1)),
                     "__row": pa.array(np.repeat(rows, b) * b + np.tile(np.arange(b), len(rows)))})


def _read_parquet(path: str, steps) -> pa.Table:
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise UserError(f"{path}: not a readable Parquet file ({err})") from None
    validate(schema, ROW_LOSSES, path)
    ds = pads.dataset(path, format="parquet")
    # file row numbers for error messages, without reading more than the wanted steps' rows
    parts, base = [], 0
    filt = None if steps is None else pads.field("step").isin(pa.array(sorted(steps), pa.int64()))
    for frag in ds.get_fragments():
        for rg in frag.split_by_row_group():
            n = rg.metadata.num_rows if rg.metadata is not None else rg.count_rows()
            t = rg.to_table(use_threads=False)
            if filt is not None:
                keep = _wanted_mask(np.asarray(t.column("step").to_numpy(zero_copy_only=False), np.int64), steps)
                t = t.append_column("__row", pa.array(np.arange(base, base + t.num_rows))).filter(pa.array(keep))
            else:
                t = t.append_column("__row", pa.array(np.arange(base, base + t.num_rows)))
            parts.append(t)
            base += n
    return _conform(pa.concat_tables(parts, promote_options="default") if parts else None, path)


def _jsonl_stream(path: str):
    from spike_audit.pipelines.shards.paths import _open

    raw = _open(path)
    low = path.lower()
    if low.endswith(".gz"):
        import gzip

        return gzip.GzipFile(fileobj=raw)
    if low.endswith((".zst", ".zstd")):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
    return raw


def _jsonl_first_bad_line(path: str) -> str:
    """The first line that is not a JSON object with the expected keys (error path only)."""
    with _jsonl_stream(path) as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                return f"{path}:{no}: not valid JSON"
            if not isinstance(obj, dict):
                return f"{path}:{no}: expected a JSON object, got {type(obj).__name__}"
            for k, ok in (("step", int), ("position", int), ("row", int), ("n_tokens", int), ("shard", str),
                          ("loss", (int, float))):
                v = obj.get(k)
                if v is not None and (not isinstance(v, ok) or isinstance(v, bool)):
                    return f"{path}:{no}: {k!r} is {v!r}, expected {'a number' if k == 'loss' else ok.__name__}"
    return f"{path}: not valid JSONL"


def _jsonl_line_of(path: str, record: int) -> int:
    """1-based line of the ``record``-th (0-based) non-blank line (error path only)."""
    seen = -1
    with _jsonl_stream(path) as f:
        for no, line in enumerate(f, 1):
            if line.strip():
                seen += 1
                if seen == record:
                    return no
    return record + 1


def _read_jsonl(path: str, steps) -> pa.Table:
    import pyarrow.json as pj

    from spike_audit.pipelines.files import first_non_object_line

    schema = pa.schema([(f.name, f.type) for f in ROW_LOSSES.fields])
    opts = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    parts, base = [], 0
    with _jsonl_stream(path) as f:  # a line `null` crashes Arrow's reader (files.first_non_object_line)
        if first_non_object_line(f) is not None:
            raise UserError(_jsonl_first_bad_line(path))
    try:
        with _jsonl_stream(path) as f:
            reader = pj.open_json(f, parse_options=opts, read_options=pj.ReadOptions(block_size=8 << 20))
            for rb in reader:
                t = pa.Table.from_batches([rb]).append_column("__row", pa.array(np.arange(base, base + rb.num_rows)))
                base += rb.num_rows
                keep = _wanted_mask(np.asarray(pc.fill_null(t.column("step"), -1).to_numpy(zero_copy_only=False),
                                               np.int64), steps)
                if t.column("step").null_count:
                    i = int(np.flatnonzero(np.asarray(t.column("step").is_null().to_numpy(zero_copy_only=False)))[0])
                    rec = int(t.column("__row")[i].as_py())
                    raise UserError(f"{path}:{_jsonl_line_of(path, rec)}: no 'step', expected step, loss and "
                                    f"position or shard + row")
                parts.append(t.filter(pa.array(keep)))
    except pa.ArrowInvalid:
        raise UserError(_jsonl_first_bad_line(path)) from None
    return _conform(pa.concat_tables(parts) if parts else None, path)


def _conform(t: pa.Table | None, path: str) -> pa.Table:
    cols = {f.name: f.type for f in ROW_LOSSES.fields}
    cols["__row"] = pa.int64()
    if t is None:
        return pa.schema(list(cols.items())).empty_table()
    arrays = []
    for name, typ in cols.items():
        if name in t.column_names:
            c = t.column(name)
            try:
                arrays.append(c.cast(typ) if c.type != typ else c)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise UserError(f"{path}: column {name!r} has type {c.type}, expected {typ}") from None
        else:
            arrays.append(pa.nulls(t.num_rows, typ))
    return pa.Table.from_arrays(arrays, names=list(cols))


@dataclass
class LossFile:
    path: str
    fmt: str
    table: pa.Table  # ROW_LOSSES columns + __row (0-based record number in the file)

    def where(self, record: int) -> str:
        if self.fmt == "jsonl":
            return f"{self.path}:{_jsonl_line_of(self.path, record)}"
        if self.fmt == "npy":
            return f"{self.path}: entry {record}"
        return f"{self.path}: row {record}"

    @property
    def steps(self) -> set[int]:
        return set(np.unique(np.asarray(self.table.column("step"))).tolist()) if self.table.num_rows else set()


def read_row_losses(path: str, steps=None, *, first_step: int = 1) -> LossFile:
    """The per-row losses of ``steps`` (all steps when None) from ``path`` (see the module docstring).
    ``first_step``: the step of row 0 of a ``.npy``."""
    path = str(path)
    if "://" not in path and not os.path.exists(path):
        raise UserError(f"{path}: per-row losses not found")
    if "://" not in path:
        from spike_audit.pipelines.files import check_regular

        check_regular(path, "per-row losses file")  # a FIFO or a device is refused, never read
    fmt = _fmt(path)
    try:
        if fmt == "npy":
            t = _read_npy(path, steps, first_step)
            t = _conform(t, path)
        elif fmt == "parquet":
            t = _read_parquet(path, steps)
        else:
            t = _read_jsonl(path, steps)
    except SchemaError as err:
        raise UserError(str(err)) from None
    return LossFile(path, fmt, t)


# ------------------------------------------------------------------------------- joining


@dataclass
class LossJoin:
    """Per-row losses on the units of a :class:`BatchIndex` (NaN where none was given)."""

    loss: np.ndarray
    n_given: int
    n_nonfinite: int
    steps_with_losses: set
    missing_rows: dict  # step -> units of that step without a loss (steps that have some losses)


def join_losses(index: BatchIndex, lf: LossFile) -> LossJoin:
    """Attach the losses of ``lf`` to the units of ``index``; one-line errors for keys that do not fit."""
    t = lf.table
    n = t.num_rows
    loss = np.full(index.n_units, np.nan)
    if n == 0:
        return LossJoin(loss, 0, 0, set(), {})
    step = np.asarray(t.column("step").to_numpy(zero_copy_only=False), np.int64)
    rec = np.asarray(t.column("__row").to_numpy(zero_copy_only=False), np.int64)
    pos = _int_or_minus1(t.column("position"), n)
    has_pos = np.asarray(t.column("position").is_valid().to_numpy(zero_copy_only=False), bool)
    has_key = np.asarray(pc.and_(t.column("shard").is_valid(), t.column("row").is_valid())
                         .to_numpy(zero_copy_only=False), bool)
    neither = np.flatnonzero(~has_pos & ~has_key)
    if len(neither):
        raise UserError(f"{lf.where(int(rec[neither[0]]))}: no position and no shard + row: cannot tell which "
                        f"sequence of step {step[neither[0]]} the loss belongs to")
    unit = np.full(n, -1, np.int64)
    by_pos = np.flatnonzero(has_pos)
    if len(by_pos):
        if not index.known_positions:
            raise UserError(f"{lf.path}: per-row losses are keyed by batch position but the manifest records no "
                            f"batch positions (batch_pos; a manifest from an older spike-audit or a builder that "
                            f"does not know the trainer's order): rebuild it with `spike-audit manifest`, or key "
                            f"the losses by shard and row")
        sizes = index.batch_size()
        bs = np.array([sizes.get(int(s), 0) for s in step[by_pos]], np.int64) if len(sizes) < 64 else \
            _lookup_sizes(sizes, step[by_pos])
        bad = np.flatnonzero((pos[by_pos] < 0) | (pos[by_pos] >= bs))
        if len(bad):
            i = by_pos[bad[0]]
            if bs[bad[0]] == 0:
                raise UserError(f"{lf.where(int(rec[i]))}: step {step[i]} has no rows in the manifest")
            raise UserError(f"{lf.where(int(rec[i]))}: position {pos[i]} is past the batch of step {step[i]} "
                            f"({bs[bad[0]]} sequences in the manifest)")
        keys = step[by_pos] * _BIG + pos[by_pos]
        ukeys = index.step * _BIG + index.position
        u = np.searchsorted(ukeys, keys)
        u = np.minimum(u, len(ukeys) - 1)
        hole = np.flatnonzero(ukeys[u] != keys)
        if len(hole):
            i = by_pos[hole[0]]
            raise UserError(f"{lf.where(int(rec[i]))}: step {step[i]} has no sequence at position {pos[i]} in the "
                            f"manifest")
        unit[by_pos] = u
    by_key = np.flatnonzero(~has_pos)
    if len(by_key):
        sub = t.take(pa.array(by_key))
        u = index.lookup_rows(step[by_key], sub.column("shard").combine_chunks(),
                              sub.column("row").to_numpy(zero_copy_only=False))
        bad = np.flatnonzero(u < 0)
        if len(bad):
            i = by_key[bad[0]]
            raise UserError(f"{lf.where(int(rec[i]))}: step {step[i]} did not consume row {t.column('row')[int(i)]} "
                            f"of shard '{t.column('shard')[int(i)]}' according to the manifest")
        unit[by_key] = u
    order = np.argsort(unit, kind="stable")
    dup = np.flatnonzero(unit[order][1:] == unit[order][:-1])
    if len(dup):
        i, j = order[dup[0]], order[dup[0] + 1]
        raise UserError(f"{lf.where(int(rec[max(i, j)]))}: a second loss for step {step[j]} position "
                        f"{index.position[unit[j]]} (also at {lf.where(int(rec[min(i, j)]))})")
    vals = np.asarray(pc.fill_null(t.column("loss"), np.nan).to_numpy(zero_copy_only=False), np.float64)
    loss[unit] = vals
    nonfinite = int(np.count_nonzero(~np.isfinite(vals)))
    have_steps = set(np.unique(step).tolist())
    missing = {}
    for s in sorted(have_steps):
        us = index.units_of(s)
        k = int(np.count_nonzero(np.isnan(loss[us]) & ~np.isin(us, unit)))
        if k:
            missing[s] = k
    return LossJoin(loss, n, nonfinite, have_steps, missing)


def _lookup_sizes(sizes: dict, steps: np.ndarray) -> np.ndarray:
    ks = np.asarray(sorted(sizes), np.int64)
    vs = np.asarray([sizes[k] for k in ks], np.int64)
    i = np.minimum(np.searchsorted(ks, steps), len(ks) - 1)
    return np.where(ks[i] == steps, vs[i], 0)


def flag_units(index: BatchIndex, row_flags: pa.Table, spike_id: str | None = None) -> np.ndarray:
    """Boolean per unit: some piece of the unit is a flagged row (of ``spike_id`` if given)."""
    out = np.zeros(index.n_units, bool)
    if row_flags.num_rows == 0:
        return out
    t = row_flags
    if spike_id is not None:
        t = t.filter(pc.equal(t.column("spike_id"), spike_id))
    if t.num_rows == 0:
        return out
    u = index.lookup_rows(pc.fill_null(t.column("step"), -1).to_numpy(zero_copy_only=False),
                          t.column("shard").combine_chunks(), t.column("row").to_numpy(zero_copy_only=False))
    out[u[u >= 0]] = True
    return out


def losses_table(index: BatchIndex, loss: np.ndarray, n_tokens: np.ndarray | None = None,
                 units: np.ndarray | None = None) -> pa.Table:
    """ROW_LOSSES table of ``units`` (all by default): step, position (where the manifest records
    batch positions), the first piece's shard and row, loss."""
    units = np.arange(index.n_units) if units is None else np.asarray(units, np.int64)
    first = np.full(index.n_units, -1, np.int64)
    o = np.lexsort((index.piece_order, index.piece_unit))[::-1]
    first[index.piece_unit[o]] = o  # the last write per unit wins: the first piece in (unit, order)
    p = first[units]
    cols = {"step": index.step[units], "shard": index.piece_shard.take(pa.array(p)),
            "row": index.piece_row[p], "loss": np.asarray(loss, np.float64)[units]}
    if index.known_positions:
        cols["position"] = index.position[units]
    if n_tokens is not None:
        cols["n_tokens"] = np.asarray(n_tokens, np.int64)[units]
    return ROW_LOSSES.from_arrays(cols, sort=False)  # unit order; writers sort
