"""Step manifests (``schemas.STEP_MANIFEST``): which slices of which shards each optimizer step read.

:func:`read_manifest` validates a manifest file against the contract and checks it against the
shards: ``row_end > row_start >= 0``, ``unit`` in {row, token}, no overlapping slices of the same
shard within one step, every shard exists and no slice runs past a shard's end (one cheap metadata
lookup per distinct shard). Errors are one line naming the manifest row (0-based, in file order)
and the shard, e.g. ``manifest.parquet: row 17: slice [1000, 1024) of shard 'a/b.parquet' is past
its end (1000 rows)``.

Overlap rule: slices of the same shard within one step may not overlap, except by a single token
for ``unit='token'``: trainers that read ``seq_len + 1`` tokens per sequence (Megatron samples,
modded-nanogpt / llm.c windows) share the boundary token between consecutive sequences. Slices of
different ``epoch`` (passes over the data) never count as overlapping: Megatron shuffles samples
across all epochs, so a document can recur within a batch, and its builder records which pass each
slice is. Any other overlap (a hand-made manifest without epochs) needs ``allow_overlap=True``.

Metadata: the manifest's run description (``STEP_MANIFEST`` doc: step convention, trainer, token
dtype, sequence length, batch size, consumed samples before the first step) lives in the Parquet
schema metadata under :data:`META_KEY`. Builders attach it to the table they return
(:func:`with_meta`); :func:`write_manifest` keeps it and stamps the step convention;
:func:`read_meta` reads it from a file's footer (``{}`` when there is none).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spike_audit.pipelines.errors import UserError, reason
from spike_audit.pipelines.io import write_table
from spike_audit.pipelines.shards.read import _close, open_shard
from spike_audit.pipelines.shards.slices import UNITS
from spike_audit.schemas import STEP_MANIFEST, validate
from spike_audit.schemas.steps import STEP_CONVENTION

log = logging.getLogger(__name__)

TOKEN_OVERLAP_ALLOWED = 1
META_KEY = b"spike_audit.manifest"
#: the keys of the run description, in the order they are written (see the STEP_MANIFEST doc)
META_FIELDS = ("step_convention", "trainer", "token_dtype", "seq_len", "extra_token", "samples_per_step",
               "tokens_per_step", "first_step", "samples_before_first_step", "tokens_before_first_step",
               "flat_rows", "fed_pad_id")


def _name(path) -> str:
    """How an error names a manifest: the path as the user gave it (its base name alone was ambiguous)."""
    return str(path)


def load_manifest_table(path) -> pa.Table:
    """Read and validate a manifest file; ``unit`` nulls become ``'row'``. Rows stay in file order."""
    import pyarrow.parquet as pq

    from spike_audit.pipelines import fs
    from spike_audit.pipelines.files import check_regular

    src = str(path)
    if not fs.exists(src):
        from spike_audit.pipelines.files import missing

        raise missing(src, f"{src}: manifest not found")
    if not fs.is_url(src):
        check_regular(src, "Parquet manifest")
    try:
        if fs.is_url(src):
            with fs.open(src, "rb") as f:
                table = pq.read_table(f)
        else:
            table = pq.read_table(src)
        table.schema.names  # a corrupt footer can hold names that are not UTF-8
    except (pa.ArrowException, OSError, ValueError) as err:
        raise UserError(f"{src}: not a readable Parquet manifest ({reason(err)})") from None
    validate(table, STEP_MANIFEST, source=src)
    table = STEP_MANIFEST.conform(table, source=src)
    for col in ("shard", "unit"):
        _check_utf8(table.column(col), col, src)
    check_steps(table.column("step"), src)
    unit = pc.fill_null(table.column("unit"), "row")
    return table.set_column(table.schema.get_field_index("unit"), STEP_MANIFEST.schema.field("unit"), unit)


def check_steps(steps, src: str) -> None:
    """Every step a non-negative batch index that fits int64 (any integer column: a uint64 step beyond int64 is
    refused, never wrapped); a one-line error naming the first bad row."""
    if len(steps) == 0:
        return
    if pa.types.is_unsigned_integer(steps.type):
        bad = pc.greater(steps, pa.scalar(2 ** 63 - 1, pa.uint64()))
    else:
        bad = pc.less(steps, pa.scalar(0, pa.int64()))
    hits = pc.indices_nonzero(pc.fill_null(bad, False).combine_chunks() if isinstance(bad, pa.ChunkedArray) else
                              pc.fill_null(bad, False))
    if len(hits):
        i = hits[0].as_py()
        raise UserError(f"{src}: row {i}: step {steps[i].as_py()}, expected a non-negative batch index (0-based) "
                        f"that fits int64")


def _check_utf8(column: pa.ChunkedArray, name: str, src: str) -> None:
    """Parquet does not check that strings are UTF-8: a damaged file can hold bytes that are not (one-line error
    naming the first such row, instead of a UnicodeDecodeError wherever the value is first used)."""
    base = 0
    for chunk in column.chunks:
        try:
            chunk.validate(full=True)
        except pa.ArrowInvalid:
            for i in range(len(chunk)):  # the error path only: find the row to name
                try:
                    chunk[i].as_py()
                except UnicodeDecodeError:
                    raise UserError(f"{src}: row {base + i}: {name} is not valid UTF-8 (a damaged manifest?)") from None
            raise UserError(f"{src}: column {name} is not valid UTF-8 (a damaged manifest?)") from None
        base += len(chunk)


def meta_of(table_or_schema) -> dict:
    """The run description attached to a table or schema (``{}`` when there is none)."""
    schema = table_or_schema.schema if isinstance(table_or_schema, pa.Table) else table_or_schema
    raw = (schema.metadata or {}).get(META_KEY)
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


_META_INTS = ("seq_len", "samples_per_step", "tokens_per_step", "first_step", "samples_before_first_step",
              "tokens_before_first_step", "fed_pad_id")
_META_POSITIVE = ("seq_len", "samples_per_step", "tokens_per_step")  # divisors of the step join: never 0
_INT64_MAX = 2 ** 63 - 1


def check_meta(raw: bytes | None, source: str) -> dict:
    """A manifest's run description (its footer's ``spike_audit.manifest`` JSON), checked: a damaged or mistyped
    one is a one-line error, never dropped (dropping it would silently change the step join and the dtype)."""
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        raise UserError(f"{source}: the run description in its metadata (spike_audit.manifest) is not valid JSON; "
                        f"expected a JSON object (a damaged manifest? rebuild it)") from None
    if not isinstance(meta, dict):
        raise UserError(f"{source}: the run description in its metadata (spike_audit.manifest) is a "
                        f"{type(meta).__name__}, expected a JSON object")
    for key in ("step_convention", "trainer"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise UserError(f"{source}: manifest metadata {key} = {meta[key]!r}, expected a string or null")
    for key in _META_INTS:
        v = meta.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0 or v > _INT64_MAX):
            raise UserError(f"{source}: manifest metadata {key} = {v!r}"[:300] + ", expected a non-negative integer "
                            "(at most 2^63 - 1) or null")
        if key in _META_POSITIVE and v == 0:
            raise UserError(f"{source}: manifest metadata {key} = 0, expected a positive integer or null (a step "
                            f"or sequence of no samples or tokens)")
    if meta.get("extra_token") is not None and not isinstance(meta["extra_token"], bool):
        raise UserError(f"{source}: manifest metadata extra_token = {meta['extra_token']!r}, expected true, false or null")
    dt = meta.get("token_dtype")
    if dt is not None:
        from spike_audit.pipelines.settings import is_integer_dtype

        if not is_integer_dtype(dt):
            raise UserError(f"{source}: manifest metadata token_dtype = {dt!r}, expected an integer dtype name "
                            f"(uint16, uint32, int32, ...) or null")
    fr = meta.get("flat_rows")
    if fr is not None:
        good = isinstance(fr, dict) and (
            (fr.get("kind") == "windows" and type(fr.get("seq_len")) is int and fr["seq_len"] > 0)
            or (fr.get("kind") == "documents" and type(fr.get("eos_id")) is int and fr["eos_id"] >= 0)
            or fr.get("kind") == "idx")
        if not good:
            raise UserError(f"{source}: manifest metadata flat_rows = {json.dumps(fr)[:200]}, expected "
                            f'{{"kind": "windows", "seq_len": <positive int>}}, {{"kind": "documents", "eos_id": '
                            f'<int>}} or {{"kind": "idx"}}')
    return meta


def read_meta(path) -> dict:
    """The run description of a manifest file, from its footer only (``{}`` when it has none); a damaged or
    mistyped one is a :class:`UserError` (:func:`check_meta`)."""
    import pyarrow.parquet as pq

    from spike_audit.pipelines import fs

    if not fs.is_url(path):
        from spike_audit.pipelines.files import check_regular, missing

        if not fs.exists(path):
            raise missing(path, f"{path}: manifest not found")
        check_regular(path, "Parquet manifest")  # a FIFO blocks the footer read for ever
    try:
        if fs.is_url(path):  # the one filesystem layer, as every other read of a manifest
            with fs.open(str(path), "rb") as f:
                schema = pq.ParquetFile(f).schema_arrow
        else:
            schema = pq.read_schema(str(path))
    except (pa.ArrowInvalid, OSError) as err:
        raise UserError(f"{path}: not a readable Parquet manifest ({reason(err)})") from None
    return check_meta((schema.metadata or {}).get(META_KEY), _name(path))


def with_meta(table: pa.Table, **meta) -> pa.Table:
    """``table`` with the run description ``meta`` (merged over what it already carries; unknown keys are
    an error, so a typo cannot silently drop a fact)."""
    unknown = sorted(set(meta) - set(META_FIELDS))
    if unknown:
        raise ValueError(f"unknown manifest metadata {unknown}; expected some of {META_FIELDS}")
    merged = {**meta_of(table), **{k: v for k, v in meta.items()}}
    return _attach(table, merged)


def _encode(meta: dict) -> bytes:
    return json.dumps({k: meta.get(k) for k in META_FIELDS}, default=int).encode()


def _attach(table: pa.Table, meta: dict) -> pa.Table:
    return table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: _encode(meta)})


def fed_tokens(tokens: pa.Array, meta: dict) -> tuple[pa.Array, int]:
    """``tokens`` (list<int64>, as read from the shards) as the trainer fed them, and how many ids changed:
    the manifest's ``fed_pad_id`` becomes 0 (megatron-core's GPTDataset: ``tokens[tokens == pad] = 0``, loss
    masked there). Vectorised over the flat values; nulls and offsets unchanged."""
    pad = meta.get("fed_pad_id")
    if pad is None or len(tokens) == 0 or tokens.null_count == len(tokens):
        return tokens, 0
    tokens = tokens.combine_chunks() if isinstance(tokens, pa.ChunkedArray) else tokens
    flat = tokens.flatten()
    values = np.asarray(flat.to_numpy(zero_copy_only=False), np.int64)
    hit = values == int(pad)
    n = int(hit.sum())
    if not n:
        return tokens, 0
    values = np.where(hit, 0, values)
    offsets = tokens.offsets
    if tokens.offset or offsets[0].as_py():
        offsets = pa.array(np.asarray(offsets.to_numpy(), np.int64) - offsets[0].as_py(), pa.int32()
                           if offsets.type == pa.int32() else pa.int64())
    out = type(tokens).from_arrays(offsets, pa.array(values, tokens.type.value_type), mask=tokens.is_null())
    return out, n


def token_dtype(meta: dict, given=None, source: str = "manifest"):
    """The token dtype to read flat token files with: ``given`` (a --dtype) or the manifest's; both must
    agree when both are known."""
    recorded = meta.get("token_dtype")
    if given is not None:
        from spike_audit.pipelines.settings import is_integer_dtype

        if not is_integer_dtype(given):
            raise UserError(f"--dtype must be an integer token dtype (uint16, uint32, int32, ...), got {given!r}")
    if given is not None and recorded is not None and np.dtype(given) != np.dtype(recorded):
        raise UserError(f"{source}: --dtype {given} but the manifest records token dtype {recorded} (the "
                        f"trainer's data files): drop --dtype or rebuild the manifest")
    return given if given is not None else recorded


def check_ranges(table: pa.Table, source: str, row_ids: np.ndarray | None = None, *,
                 allow_overlap: bool = False) -> None:
    """Per-row and per-step checks that need no shard I/O (vectorised). ``allow_overlap`` skips the
    overlap check (a hand-made manifest of a trainer that repeats data within a step); slices of
    different epochs are never an overlap."""
    n = table.num_rows
    if n == 0:
        return
    ids = np.arange(n) if row_ids is None else np.asarray(row_ids)
    start = table.column("row_start").to_numpy()
    end = table.column("row_end").to_numpy()
    unit = np.asarray(table.column("unit").to_pylist(), dtype=object)
    bad_unit = np.flatnonzero(~np.isin(unit, np.array(UNITS, dtype=object)))
    if len(bad_unit):
        i = bad_unit[0]
        raise UserError(f"{source}: row {ids[i]}: unit {unit[i]!r}, expected 'row' or 'token'")
    bad = np.flatnonzero((end <= start) | (start < 0))
    if len(bad):
        i = bad[0]
        shard = table.column("shard")[int(i)].as_py()
        raise UserError(f"{source}: row {ids[i]}: slice [{start[i]}, {end[i]}) of shard '{shard}' is empty or "
                        f"negative, expected 0 <= row_start < row_end")
    if "batch_pos" in table.column_names and table.column("batch_pos").null_count < n:
        pos = np.asarray(pc.fill_null(table.column("batch_pos"), 0).to_numpy(zero_copy_only=False), np.int64)
        bad = np.flatnonzero(pos < 0)
        if len(bad):
            raise UserError(f"{source}: row {ids[bad[0]]}: batch_pos {pos[bad[0]]} is negative, expected a position "
                            f"in the step's global batch (or null)")
    if allow_overlap:
        return
    # Overlaps within (step, shard, unit, epoch): sort by start, compare each slice with the running end.
    step = table.column("step").to_numpy()
    shard_codes = pc.dictionary_encode(table.column("shard")).combine_chunks().indices.to_numpy()
    unit_codes = (unit == "token").astype(np.int64)
    epoch = (np.asarray(pc.fill_null(table.column("epoch"), -1).to_numpy(zero_copy_only=False), np.int64)
             if "epoch" in table.column_names else np.full(n, -1, np.int64))
    order = np.lexsort((end, start, epoch, unit_codes, shard_codes, step))
    s, e = start[order], end[order]
    same = np.zeros(n, bool)
    same[1:] = ((step[order][1:] == step[order][:-1]) & (shard_codes[order][1:] == shard_codes[order][:-1])
                & (unit_codes[order][1:] == unit_codes[order][:-1]) & (epoch[order][1:] == epoch[order][:-1]))
    group = np.cumsum(~same)
    # Running max of `end` within each group (segmented, via dense ranks so keys stay small).
    uniq_e, e_rank = np.unique(e, return_inverse=True)
    width = np.int64(len(uniq_e) + 1)
    g = group.astype(np.int64)
    run = uniq_e[np.maximum.accumulate(e_rank.astype(np.int64) + g * width) - g * width]
    allowed = np.where(unit_codes[order] == 1, TOKEN_OVERLAP_ALLOWED, 0)
    over = np.flatnonzero(same[1:] & (s[1:] < run[:-1] - allowed[1:])) + 1
    if len(over):
        k = over[0]
        gstart = int(np.flatnonzero(~same[:k + 1])[-1])
        i, j = order[gstart + int(np.argmax(e[gstart:k]))], order[k]
        shard = table.column("shard")[int(j)].as_py()
        raise UserError(
            f"{source}: row {ids[j]}: slice [{start[j]}, {end[j]}) of shard '{shard}' overlaps another slice "
            f"of the same shard in step {step[j]} (row {ids[i]}: [{start[i]}, {end[i]})); allow overlaps only if the "
            f"trainer really read the data twice in one step"
        )


def check_shard_bounds(table: pa.Table, source: str, shard_root: str | None, row_ids: np.ndarray | None = None,
                 *, dtype=None, tokens_col: str = "tokens", text_col: str = "text", rows=None) -> dict:
    """Every shard exists and no slice is past its end. Returns ``{(shard, unit): length}``. ``rows``: the
    row definition of flat token files (:class:`pipelines.shards.rows.RowDef`)."""
    n = table.num_rows
    lengths: dict = {}
    if n == 0:
        return lengths
    ids = np.arange(n) if row_ids is None else np.asarray(row_ids)
    end = table.column("row_end").to_numpy()
    start = table.column("row_start").to_numpy()
    shards = table.column("shard").combine_chunks()
    enc = pc.dictionary_encode(shards)
    codes = enc.indices.to_numpy()
    names = enc.dictionary.to_pylist()
    is_tok = np.asarray(pc.equal(table.column("unit"), "token").to_numpy(zero_copy_only=False), bool)
    key = codes * 2 + is_tok
    limit = np.full(len(names) * 2, -1, np.int64)
    for k in np.unique(key):
        shard, unit = names[k // 2], UNITS[k % 2]
        first = int(np.flatnonzero(key == k)[0])
        try:
            reader = open_shard(shard_root, shard, tokens_col=tokens_col, text_col=text_col, dtype=dtype, rows=rows)
            try:
                limit[k] = reader.length(unit)
            finally:
                _close(reader)
        except UserError as err:
            raise UserError(f"{source}: row {ids[first]}: {err}") from None
        lengths[(shard, unit)] = int(limit[k])
    past = np.flatnonzero(end > limit[key])
    if len(past):
        i = past[0]
        what = "tokens" if is_tok[i] else "rows"
        raise UserError(f"{source}: row {ids[i]}: slice [{start[i]}, {end[i]}) of shard '{names[codes[i]]}' is "
                        f"past its end ({limit[key[i]]} {what})")
    return lengths


def read_manifest(path, shard_root: str | None = None, check_shards: bool = True, *, dtype=None,
                  allow_overlap: bool = False, rows=None) -> pa.Table:
    """Read, validate and check a step manifest. Returns the table (STEP_MANIFEST schema, file order,
    ``unit`` filled with ``'row'`` where null). ``dtype`` is the token dtype of raw token files
    (default: the one the manifest records).
    ``allow_overlap`` accepts overlapping slices within a step (see :func:`check_ranges`)."""
    table = load_manifest_table(path)
    src = _name(path)
    check_ranges(table, src, allow_overlap=allow_overlap)
    if check_shards:
        check_shard_bounds(table, src, shard_root, dtype=token_dtype(read_meta(path), dtype, src),
                           rows=manifest_rows(path, rows))
    return table



def step_rows(table: pa.Table, step: int) -> np.ndarray:
    """Indices (file order) of the manifest rows of ``step``."""
    return np.flatnonzero(table.column("step").to_numpy() == step)


def write_manifest(table: pa.Table, path, **meta) -> Path:
    """Write a STEP_MANIFEST atomically (conformed, sorted by step, rank, micro_batch, shard, row_start),
    with the run description the table carries (and ``meta`` over it), stamped with the step convention:
    whatever spike-audit writes numbers steps by 0-based batch index."""
    merged = {**meta_of(table), **meta, "step_convention": STEP_CONVENTION}
    unknown = sorted(set(merged) - set(META_FIELDS))
    if unknown:
        raise ValueError(f"unknown manifest metadata {unknown}; expected some of {META_FIELDS}")
    return write_table(table, path, STEP_MANIFEST, metadata={META_KEY: _encode(merged)})


def manifest_from_arrays(step, shard, row_start, row_end, unit="row", rank=None, micro_batch=None, batch_pos=None,
                         seq_piece=None, epoch=None) -> pa.Table:
    """Build a STEP_MANIFEST table from column arrays (scalars broadcast), unsorted. ``batch_pos``: each
    slice's position in its step's global batch, where the builder knows the trainer's order (see the
    schema); ``seq_piece``: the slice's order within a sequence made of several slices; ``epoch``: the
    pass over the data each slice belongs to."""
    n = len(step)
    cols = {
        "step": np.asarray(step, np.int64),
        "shard": pa.array(shard, pa.string()) if not isinstance(shard, str) else pa.array([shard] * n, pa.string()),
        "row_start": np.asarray(row_start, np.int64),
        "row_end": np.asarray(row_end, np.int64),
        "unit": pa.array([unit] * n, pa.string()) if isinstance(unit, str) else pa.array(unit, pa.string()),
    }
    if rank is not None:
        cols["rank"] = np.asarray(rank, np.int32)
    if micro_batch is not None:
        cols["micro_batch"] = np.asarray(micro_batch, np.int32)
    if batch_pos is not None:
        cols["batch_pos"] = np.asarray(batch_pos, np.int64)
    if seq_piece is not None:
        cols["seq_piece"] = np.asarray(seq_piece, np.int32)
    if epoch is not None:
        cols["epoch"] = np.asarray(epoch, np.int32)
    return STEP_MANIFEST.from_arrays(cols, sort=False)


def manifest_rows(path, given=None):
    """The row definition to read a manifest's flat token files with: ``given`` (from a command's flags) or
    the one the manifest records (``flat_rows`` in its run description); both must agree when both are known."""
    from spike_audit.pipelines.shards.rows import RowDef, agree

    try:
        meta = read_meta(path)
    except UserError:
        return given
    return agree(given, RowDef.from_meta(meta.get("flat_rows"), _name(path)), _name(path))
