"""The entry points: a shard's format from its name, ``open_shard`` (the right reader), ``read_slices`` and
``shard_length``."""

from __future__ import annotations

import os
import re

import numpy as np
import pyarrow as pa

from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.shards.base import ShardReader
from spike_audit.pipelines.shards.hf import HFReader
from spike_audit.pipelines.shards.jsonl import JsonlReader, _COMPRESSIONS, _JSONL_SUFFIXES
from spike_audit.pipelines.shards.parquet import ParquetReader
from spike_audit.pipelines.shards.paths import _exists, _isdir, _open, _size, confine_tree, is_url, resolve
from spike_audit.pipelines.shards.rows import RowDef
from spike_audit.pipelines.shards.tokens import (FlatReader, MegatronReader, TokenFile, _NPY_MAGIC,
                                                 _read_npy_header, megatron_paths, open_token_file)


#: litdata's chunk files (``litdata.optimize``): ``chunk-RANK-INDEX[.COMPRESSION].bin`` beside an index.json
_LITDATA_CHUNK = re.compile(r"^chunk-\d+-\d+(\.[a-z0-9]+)?\.bin$")


def shard_format(path: str) -> str:
    """``parquet`` | ``jsonl`` | ``hf`` | ``npy`` | ``bin`` | ``megatron`` from the shard's name."""
    p = str(path).rstrip("/")
    low = p.lower()
    from spike_audit.pipelines.shards.mds import is_mds

    if is_mds(p):
        return "mds"
    if low.endswith((".parquet", ".pq")):
        return "parquet"
    for suf in _JSONL_SUFFIXES:
        for comp in _COMPRESSIONS:
            if low.endswith(suf + comp):
                return "jsonl"
    if low.endswith(".arrow"):
        return "hf"
    if low.endswith(".idx"):
        return "megatron"
    if low.endswith(".bin"):
        if _exists(p[:-4] + ".idx"):
            return "megatron"
        if _LITDATA_CHUNK.match(os.path.basename(low)) and _exists(os.path.join(os.path.dirname(p), "index.json")):
            raise UserError(f"{p}: a litdata (litgpt) chunk: its format is not a flat token file and is not supported")
        return "bin"
    if low.endswith(".npy"):
        with _open(p) as f:
            magic = f.read(len(_NPY_MAGIC))
        return "npy" if magic == _NPY_MAGIC else "bin"
    if _isdir(p):
        return "hf"
    if low.endswith((".u16", ".u32", ".tokens", ".ids")):
        return "bin"
    raise UserError(
        f"{p}: unknown shard format (expected .parquet, .jsonl[.gz|.zst], .arrow or a datasets directory, "
        f".npy, .bin or Megatron .bin/.idx)"
    )


def open_shard(shard_root: str | None, shard: str, *, tokens_col: str = "tokens", text_col: str = "text",
               dtype=None, rows: RowDef | None = None) -> ShardReader:
    """Open ``shard`` (relative to ``shard_root``) with the reader for its format. Raises
    :class:`UserError` naming the shard if it is missing or unreadable. ``rows``: what a row of a flat
    token file is (:mod:`pipelines.shards.rows`); shards with rows of their own ignore it."""
    path = resolve(shard_root, shard)
    if not _exists(path):
        where = f" under {shard_root}" if shard_root and not os.path.isabs(str(shard)) and not is_url(shard) else ""
        raise UserError(f"shard '{shard}' not found{where} ({path})")
    fmt = shard_format(path)
    if fmt in ("hf", "mds"):
        confine_tree(shard_root, shard, path)  # a directory's files: regular, and inside the root
    if fmt == "megatron":
        for sibling in megatron_paths(shard):  # the .idx / .bin next to the named file obey the rule too
            if not is_url(shard) or is_url(sibling):
                resolve(shard_root, sibling)
    if fmt == "parquet":
        return ParquetReader(path, shard, tokens_col, text_col)
    if fmt == "jsonl":
        return JsonlReader(path, shard, tokens_col, text_col)
    if fmt == "hf":
        return HFReader(path, shard, tokens_col, text_col)
    if fmt == "megatron":
        return MegatronReader(path, shard, rows)
    if fmt == "mds":
        from spike_audit.pipelines.shards.mds import MDSReader

        return MDSReader(path, shard, tokens_col, text_col, dtype)
    if fmt == "npy":
        shape, fortran, dt, offset = _read_npy_header(path)
        if fortran and len(shape) > 1:
            raise UserError(f"{shard}: Fortran-ordered .npy arrays are not supported (save with C order)")
        if not np.issubdtype(dt, np.integer):
            raise UserError(f"{shard}: .npy holds {dt}, expected integer token ids")
        if len(shape) not in (1, 2):
            raise UserError(f"{shard}: .npy has shape {shape}, expected 1-D tokens or 2-D (rows, tokens)")
        n = int(np.prod(shape))
        if not is_url(path) and offset + n * dt.itemsize > _size(path):
            raise UserError(f"{shard}: .npy header says shape {shape} of {dt} ({offset + n * dt.itemsize} bytes), the "
                            f"file has {_size(path)} bytes (truncated?)")
        return FlatReader(path, shard, TokenFile(path, offset, dt, n), shape[1] if len(shape) == 2 else None,
                          fmt="npy", rows=rows)
    return FlatReader(path, shard, open_token_file(path, dtype), None, fmt="bin", rows=rows)


def _close(reader: ShardReader) -> None:
    close = getattr(reader, "close", None)
    if close:
        close()


def read_slices(shard_root: str | None, shard: str, slices, *, unit: str = "row", tokens_col: str = "tokens",
                text_col: str = "text", dtype=None, rows: RowDef | None = None) -> pa.RecordBatch:
    """Read exactly ``slices`` (an ``(n, 2)`` int64 array of ``[start, end)``) of one shard.

    Returns ONE batch with :data:`SLICES_SCHEMA`: one row per sequence in the order of ``slices``
    (each slice expanded row by row for ``unit='row'``; one sequence per slice for ``unit='token'``).
    ``tokens`` is ``list<int64>`` (null where the shard has only text), ``text`` is null where the
    shard has no text, ``row`` is the row index (or token start), ``row_end`` the exclusive end
    (``row + 1`` for rows). ``dtype`` applies to raw token files only (default uint16); ``rows`` defines
    the rows of flat token files.
    """
    reader = open_shard(shard_root, shard, tokens_col=tokens_col, text_col=text_col, dtype=dtype, rows=rows)
    try:
        return reader.read(slices, unit or "row")
    finally:
        _close(reader)


def token_id_columns(shard_root: str | None, shard: str, *, tokens_col: str = "tokens",
                     text_col: str = "text") -> list[str]:
    """Columns of a table shard (Parquet, datasets; JSONL from its first line) holding lists of integers when
    ``tokens_col`` is not among its columns: where its token ids probably are. Empty for other formats."""
    reader = open_shard(shard_root, shard, tokens_col=tokens_col, text_col=text_col)
    try:
        find = getattr(reader, "token_id_columns", None)
        return find() if find else []
    finally:
        _close(reader)


def shard_length(shard_root: str | None, shard: str, unit: str = "row", *, dtype=None,
                 rows: RowDef | None = None) -> int:
    """Rows (``unit='row'``) or tokens (``unit='token'``) in the shard, from metadata where it exists
    (JSONL is counted by one streaming pass, EOS-delimited documents by one scan)."""
    reader = open_shard(shard_root, shard, dtype=dtype, rows=rows)
    try:
        return reader.length(unit or "row")
    finally:
        _close(reader)
