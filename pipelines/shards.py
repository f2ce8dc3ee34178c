"""Exact readers for the shard formats trainers read: fetch just the rows (or token ranges) asked for.

Formats (chosen by the shard's name; see :func:`shard_format`):

===============  ============================================  =====================================
format           files                                         units
===============  ============================================  =====================================
``parquet``      ``*.parquet``, ``*.pq``                       ``row`` (a ``tokens`` list<int> column
                                                               and/or a ``text`` column)
``jsonl``        ``*.jsonl``, ``*.jsonl.gz``, ``*.jsonl.zst``  ``row`` = line (0-based)
                 (also ``.json``/``.ndjson`` variants)
``hf``           ``datasets`` ``save_to_disk`` directories     ``row``
                 and ``*.arrow`` files
``npy``          ``*.npy`` with a NumPy header                 1-D: ``token``; 2-D: ``row`` (and
                                                               ``token`` over the flattened array)
``bin``          raw token memmaps (``*.bin``, header-less     ``token``
                 ``*.npy`` as written by OLMo / OLMo-core
                 with ``np.memmap``, ``*.u16``...)
``megatron``     ``X.bin`` with ``X.idx`` (``MMIDIDX``)        ``row`` = sequence (document),
                                                               ``token`` = offset into ``X.bin``
===============  ============================================  =====================================

Raw token files default to ``uint16`` (pass ``dtype``); a 256 x int32 header (modded-nanogpt / llm.c:
magic 20240520 version 1 = uint16 GPT-2 tokens; llm.c's magic 20240801 version 7 = uint32 Llama-3
tokens) is detected and skipped, so token offsets count tokens after the 1024-byte header. Megatron ``.bin`` files take their dtype from
the ``.idx``.

I/O: Parquet reads only the row groups holding requested rows (from the footer metadata); memmaps
read only the requested byte ranges (coalesced); Megatron reads the ``.idx`` arrays as memmaps.
JSONL cannot be random-accessed: the file is streamed once per call (decompressing ``.gz``/``.zst``)
and only requested lines are parsed. Paths that are URLs (``gs://``, ``s3://``, ...) go through
``fsspec`` (the matching extra must be installed); local paths are opened directly.

:func:`read_slices` returns one ``pa.RecordBatch`` with :data:`SLICES_SCHEMA`: ``tokens`` is always
``list<int64>`` (null for shards that only have text), whatever the on-disk dtype, so batches from
different shards concatenate.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import posixpath
import struct
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipelines.errors import UserError

log = logging.getLogger(__name__)

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

MODDED_MAGIC = 20240520
MODDED_HEADER_BYTES = 256 * 4
# llm.c's data_common.HEADERS_INFO: (magic, version) -> token dtype. modded-nanogpt uses the first.
_HEADER_DTYPES = {(20240520, 1): np.dtype(np.uint16), (20240801, 7): np.dtype(np.uint32)}
_HEADER_MAGICS = {m for m, _ in _HEADER_DTYPES}

MEGATRON_MAGIC = b"MMIDIDX\x00\x00"
# Megatron-LM's DType codes in the .idx header.
MEGATRON_DTYPES = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}

_NPY_MAGIC = b"\x93NUMPY"
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_COMPRESSIONS = ("", ".gz", ".zst", ".zstd")
_JSONL_CHUNK = 16 << 20


# ----------------------------------------------------------------------------- paths


def is_url(path: str) -> bool:
    return "://" in str(path)


def resolve(shard_root: str | None, shard: str) -> str:
    """Join ``shard`` to ``shard_root`` unless ``shard`` is absolute or a URL."""
    shard = str(shard)
    if shard_root is None or is_url(shard) or os.path.isabs(shard):
        return shard
    root = str(shard_root)
    if is_url(root):
        return posixpath.join(root.rstrip("/"), shard)
    return os.path.join(root, shard)


def _exists(path: str) -> bool:
    if is_url(path):
        import fsspec

        fs, p = fsspec.core.url_to_fs(path)
        return fs.exists(p)
    return os.path.exists(path)


def _isdir(path: str) -> bool:
    if is_url(path):
        import fsspec

        fs, p = fsspec.core.url_to_fs(path)
        return fs.isdir(p)
    return os.path.isdir(path)


def _size(path: str) -> int:
    if is_url(path):
        import fsspec

        fs, p = fsspec.core.url_to_fs(path)
        return int(fs.size(p))
    return os.path.getsize(path)


def _open(path: str):
    """Binary file object for a local path or a URL (fsspec)."""
    if is_url(path):
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path, "rb")


def shard_format(path: str) -> str:
    """``parquet`` | ``jsonl`` | ``hf`` | ``npy`` | ``bin`` | ``megatron`` from the shard's name."""
    p = str(path).rstrip("/")
    low = p.lower()
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
        return "megatron" if _exists(p[:-4] + ".idx") else "bin"
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


# ----------------------------------------------------------------------------- vector helpers


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


# ----------------------------------------------------------------------------- flat token files


@dataclass
class TokenFile:
    """A flat array of tokens at byte ``offset`` of ``path`` (raw memmap, .npy body, Megatron .bin)."""

    path: str
    offset: int
    dtype: np.dtype
    n_tokens: int

    def gather(self, slices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of each ``[start, end)`` slice as (values, offsets), reading only those ranges."""
        lengths = slices[:, 1] - slices[:, 0]
        offsets = np.zeros(len(slices) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if offsets[-1] == 0:
            return np.zeros(0, self.dtype), offsets
        if not is_url(self.path):
            mm = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=(self.n_tokens,))
            values = np.asarray(mm[expand_rows(slices)])
            del mm
            return values, offsets
        # Remote: one ranged read per coalesced range, then a vectorised gather from the buffer.
        ranges = coalesce(slices)
        size = self.dtype.itemsize
        parts = []
        with _open(self.path) as f:
            for a, b in ranges:
                f.seek(self.offset + int(a) * size)
                parts.append(np.frombuffer(f.read(int(b - a) * size), dtype=self.dtype))
        buf = np.concatenate(parts)
        range_len = ranges[:, 1] - ranges[:, 0]
        buf_start = np.concatenate([[0], np.cumsum(range_len)[:-1]])
        which = np.searchsorted(ranges[:, 0], slices[:, 0], side="right") - 1
        local = slices.copy()
        local[:, 0] = slices[:, 0] - ranges[which, 0] + buf_start[which]
        local[:, 1] = local[:, 0] + lengths
        return buf[expand_rows(local)], offsets


def _read_modded_header(path: str) -> tuple[int, int, int] | None:
    """(magic, version, ntok) if ``path`` starts with a modded-nanogpt / llm.c header, else None."""
    with _open(path) as f:
        head = f.read(MODDED_HEADER_BYTES)
    if len(head) < MODDED_HEADER_BYTES:
        return None
    header = np.frombuffer(head, dtype="<i4")
    if int(header[0]) not in _HEADER_MAGICS:
        return None
    return int(header[0]), int(header[1]), int(header[2])


def open_token_file(path: str, dtype=None) -> TokenFile:
    """A raw token memmap, skipping a modded-nanogpt / llm.c header when present."""
    size = _size(path)
    hdr = _read_modded_header(path)
    if hdr is not None:
        magic, version, ntok = hdr
        dt = np.dtype(dtype) if dtype is not None else _HEADER_DTYPES.get((magic, version))
        if dt is None:
            raise UserError(f"{path}: token header magic {magic} version {version} is not known (expected "
                            f"20240520/1 = uint16 or 20240801/7 = uint32); pass a dtype")
        expected = MODDED_HEADER_BYTES + ntok * dt.itemsize
        if size != expected:
            raise UserError(f"{path}: header says {ntok} tokens ({expected} bytes with the header), "
                            f"file has {size} bytes")
        return TokenFile(path, MODDED_HEADER_BYTES, dt, ntok)
    dt = np.dtype(dtype) if dtype is not None else np.dtype(np.uint16)
    if size % dt.itemsize:
        log.warning("%s: %d bytes is not a multiple of %s; ignoring the trailing bytes", path, size, dt)
    return TokenFile(path, 0, dt, size // dt.itemsize)


def _read_npy_header(path: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    with _open(path) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dt = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dt = np.lib.format.read_array_header_2_0(f)
        return shape, fortran, dt, f.tell()


@dataclass
class MegatronIndex:
    """The arrays of a Megatron ``.idx`` file (``MMIDIDX`` format, version 1)."""

    dtype: np.dtype
    sequence_lengths: np.ndarray  # int32 per sequence
    sequence_pointers: np.ndarray  # int64 byte offset per sequence into the .bin
    document_indices: np.ndarray  # int64, sequence-index boundaries of documents


def read_megatron_index(idx_path: str) -> MegatronIndex:
    with _open(idx_path) as f:
        head = f.read(9 + 8 + 1 + 8 + 8)
    if head[:9] != MEGATRON_MAGIC:
        raise UserError(f"{idx_path}: not a Megatron index (expected header {MEGATRON_MAGIC!r}, got {head[:9]!r})")
    (version,) = struct.unpack("<Q", head[9:17])
    (code,) = struct.unpack("<B", head[17:18])
    seq_count, doc_count = struct.unpack("<QQ", head[18:34])
    if version != 1:
        raise UserError(f"{idx_path}: Megatron index version {version} is not supported (expected 1)")
    if code not in MEGATRON_DTYPES:
        raise UserError(f"{idx_path}: unknown Megatron dtype code {code} (expected 1-8)")
    off = 34
    if is_url(idx_path):
        with _open(idx_path) as f:
            f.seek(off)
            body = f.read(seq_count * 12 + doc_count * 8)
        lengths = np.frombuffer(body, "<i4", seq_count, 0)
        pointers = np.frombuffer(body, "<i8", seq_count, seq_count * 4)
        docs = np.frombuffer(body, "<i8", doc_count, seq_count * 12)
    else:
        lengths = np.memmap(idx_path, "<i4", "r", off, (seq_count,)) if seq_count else np.zeros(0, "<i4")
        pointers = (np.memmap(idx_path, "<i8", "r", off + seq_count * 4, (seq_count,)) if seq_count
                    else np.zeros(0, "<i8"))
        docs = (np.memmap(idx_path, "<i8", "r", off + seq_count * 12, (doc_count,)) if doc_count
                else np.zeros(0, "<i8"))
    return MegatronIndex(MEGATRON_DTYPES[code], lengths, pointers, docs)


def megatron_paths(path: str) -> tuple[str, str]:
    """(bin, idx) from either file of the pair or their common prefix."""
    p = str(path)
    if p.endswith(".bin") or p.endswith(".idx"):
        p = p[:-4]
    return p + ".bin", p + ".idx"


# ----------------------------------------------------------------------------- readers


class ShardReader:
    """Opened shard: cheap metadata now, rows on :meth:`read`. Not thread-safe; not kept across calls."""

    fmt = ""
    units: tuple[str, ...] = ("row",)

    def __init__(self, path: str, name: str):
        self.path = path
        self.name = name

    def length(self, unit: str = "row") -> int:
        raise NotImplementedError

    def _unit_check(self, unit: str) -> None:
        if unit not in UNITS:
            raise UserError(f"{self.name}: unknown unit {unit!r} (expected 'row' or 'token')")
        if unit not in self.units:
            other = "flat token file: address it with unit='token'" if unit == "row" else (
                "row-oriented shard: address it with unit='row'")
            raise UserError(f"{self.name}: unit {unit!r} does not apply to this {self.fmt} shard ({other})")

    def read(self, slices, unit: str = "row") -> pa.RecordBatch:
        self._unit_check(unit)
        slices = as_slices(slices)
        n = self.length(unit)
        _check_bounds(self.name, slices, n, "rows" if unit == "row" else "tokens")
        if unit == "token":
            return self._read_tokens(slices)
        rows = expand_rows(slices)
        tokens, text = self._read_rows(rows)
        return _batch(tokens, text, self.name, rows, rows + 1, "row")

    def _read_rows(self, rows: np.ndarray) -> tuple[pa.Array | None, pa.Array | None]:
        raise NotImplementedError

    def _read_tokens(self, slices: np.ndarray) -> pa.RecordBatch:
        raise NotImplementedError


class _TableRowsMixin:
    tokens_col: str
    text_col: str
    name: str

    def _columns(self, names) -> list[str]:
        cols = [c for c in (self.tokens_col, self.text_col) if c in names]
        if not cols:
            raise UserError(f"{self.name}: has neither a {self.tokens_col!r} nor a {self.text_col!r} column "
                            f"(columns: {', '.join(names)})")
        return cols

    def _split(self, table: pa.Table) -> tuple[pa.Array | None, pa.Array | None]:
        tokens = text = None
        if self.tokens_col in table.column_names:
            tokens = _to_int64_lists(table.column(self.tokens_col), self.name, self.tokens_col)
        if self.text_col in table.column_names:
            text = _to_string(table.column(self.text_col), self.name, self.text_col)
        return tokens, text


class ParquetReader(_TableRowsMixin, ShardReader):
    fmt = "parquet"

    def __init__(self, path, name, tokens_col="tokens", text_col="text"):
        super().__init__(path, name)
        import pyarrow.parquet as pq

        self.tokens_col, self.text_col = tokens_col, text_col
        self._file = _open(path) if is_url(path) else None
        try:
            self.pf = pq.ParquetFile(self._file if self._file is not None else path)
        except (pa.ArrowInvalid, OSError) as err:
            raise UserError(f"{name}: not a readable Parquet file ({err})") from None
        md = self.pf.metadata
        counts = np.array([md.row_group(i).num_rows for i in range(md.num_row_groups)], np.int64)
        self.rg_start = np.concatenate([[0], np.cumsum(counts)])

    def length(self, unit="row"):
        return int(self.rg_start[-1])

    def _read_rows(self, rows):
        cols = self._columns(self.pf.schema_arrow.names)
        if len(rows) == 0:
            return self._split(self.pf.schema_arrow.empty_table().select(cols))
        rg = np.searchsorted(self.rg_start, rows, side="right") - 1
        # One row group at a time (the I/O unit): read it, keep only the requested rows. Reading
        # groups one by one bounds memory to one group and is faster than read_row_groups + take.
        order = np.argsort(rg, kind="stable")
        rg_sorted = rg[order]
        cuts = np.flatnonzero(np.diff(rg_sorted)) + 1
        pieces = []
        for lo, hi in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(order)]])):
            g = int(rg_sorted[lo])
            group = self.pf.read_row_group(g, columns=cols)
            pieces.append(group.take(pa.array(rows[order[lo:hi]] - self.rg_start[g])))
        table = pa.concat_tables(pieces).combine_chunks()
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return self._split(table.take(pa.array(inverse)))

    def close(self):
        if self._file is not None:
            self._file.close()


class HFReader(_TableRowsMixin, ShardReader):
    fmt = "hf"

    def __init__(self, path, name, tokens_col="tokens", text_col="text"):
        super().__init__(path, name)
        import datasets

        self.tokens_col, self.text_col = tokens_col, text_col
        try:
            if str(path).rstrip("/").lower().endswith(".arrow"):
                ds = datasets.Dataset.from_file(path)
            else:
                ds = datasets.load_from_disk(path)
        except FileNotFoundError as err:
            raise UserError(f"{name}: not a datasets directory or .arrow file ({err})") from None
        if isinstance(ds, datasets.DatasetDict):
            raise UserError(f"{name}: is a DatasetDict with splits {sorted(ds)}; point the shard at one split "
                            f"directory, e.g. '{name.rstrip('/')}/{sorted(ds)[0]}'")
        self.ds = ds.with_format("arrow")

    def length(self, unit="row"):
        return len(self.ds)

    def _read_rows(self, rows):
        cols = self._columns(self.ds.column_names)
        ds = self.ds.select_columns(cols)
        if len(rows) == 0:
            return self._split(ds[:0])
        return self._split(ds[rows.tolist()])


class _ClosingGzip(gzip.GzipFile):
    """GzipFile that also closes the underlying file object."""

    def __init__(self, raw):
        super().__init__(fileobj=raw, mode="rb")
        self._raw = raw

    def close(self):
        try:
            super().close()
        finally:
            self._raw.close()


class JsonlReader(ShardReader):
    """JSONL: row N is line N+1. Streamed once per read; blank requested lines are an error."""

    fmt = "jsonl"

    def __init__(self, path, name, tokens_col="tokens", text_col="text"):
        super().__init__(path, name)
        self.tokens_col, self.text_col = tokens_col, text_col
        self._n = None

    def _stream(self):
        raw = _open(self.path)
        low = self.path.lower()
        if low.endswith(".gz"):
            return _ClosingGzip(raw)
        if low.endswith((".zst", ".zstd")):
            import zstandard

            return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
        return raw

    def _scan(self, wanted: np.ndarray | None):
        """One pass: count lines; collect the bytes of the ``wanted`` (sorted unique) lines."""
        found: list[bytes] = []
        line_no = 0  # lines completed before the current chunk
        carry = b""
        with self._stream() as f:
            while True:
                chunk = f.read(_JSONL_CHUNK)
                if not chunk:
                    break
                data = carry + chunk
                nl = np.flatnonzero(np.frombuffer(data, np.uint8) == 10)
                if len(nl):
                    if wanted is not None and len(wanted):
                        lo = np.searchsorted(wanted, line_no)
                        hi = np.searchsorted(wanted, line_no + len(nl))
                        starts = np.concatenate([[0], nl[:-1] + 1])
                        for k in wanted[lo:hi] - line_no:  # only requested lines, not every line
                            found.append(data[starts[k]:nl[k]])
                    line_no += len(nl)
                    carry = data[nl[-1] + 1:]
                else:
                    carry = data
        if carry:
            if wanted is not None and len(wanted) and np.searchsorted(wanted, line_no) < len(wanted) and (
                    wanted[np.searchsorted(wanted, line_no)] == line_no):
                found.append(carry)
            line_no += 1
        self._n = line_no
        return found

    def length(self, unit="row"):
        if self._n is None:
            self._scan(None)
        return self._n

    def _read_rows(self, rows):
        if len(rows) == 0:
            return None, None
        uniq, inverse = np.unique(rows, return_inverse=True)
        lines = self._scan(uniq)
        stripped = [ln.rstrip(b"\r") for ln in lines]
        blank = np.flatnonzero(np.array([len(ln.strip()) == 0 for ln in stripped]))
        if len(blank):
            raise UserError(f"{self.name}:{int(uniq[blank[0]]) + 1}: expected a JSON object, got an empty line")
        table = self._parse(stripped, uniq)
        tokens = text = None
        if self.tokens_col in table.column_names:
            tokens = _to_int64_lists(table.column(self.tokens_col), self.name, self.tokens_col).take(inverse)
        if self.text_col in table.column_names:
            text = _to_string(table.column(self.text_col), self.name, self.text_col).take(inverse)
        if tokens is None and text is None:
            raise UserError(f"{self.name}:{int(uniq[0]) + 1}: expected a JSON object with a {self.tokens_col!r} "
                            f"or {self.text_col!r} field")
        return tokens, text

    def _parse(self, lines: list[bytes], line_ids: np.ndarray) -> pa.Table:
        import pyarrow.json as pj

        want = [self.tokens_col, self.text_col]
        try:
            table = pj.read_json(io.BytesIO(b"\n".join(lines) + b"\n"),
                                 read_options=pj.ReadOptions(block_size=max(1 << 20, sum(map(len, lines)) + 1)))
            if table.num_rows == len(lines):
                return table.select([c for c in want if c in table.column_names])
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
        # Fallback (mixed types across lines, or an error to locate): parse line by line.
        recs = []
        for ln, no in zip(lines, line_ids):
            try:
                obj = json.loads(ln)
            except json.JSONDecodeError as err:
                raise UserError(f"{self.name}:{int(no) + 1}: expected a JSON object, got invalid JSON ({err.msg})")
            if not isinstance(obj, dict):
                raise UserError(f"{self.name}:{int(no) + 1}: expected a JSON object, got {type(obj).__name__}")
            recs.append({k: obj.get(k) for k in want})
        cols = {}
        if any(r[self.tokens_col] is not None for r in recs):
            cols[self.tokens_col] = pa.array([r[self.tokens_col] for r in recs], pa.list_(pa.int64()))
        if any(r[self.text_col] is not None for r in recs):
            cols[self.text_col] = pa.array([r[self.text_col] for r in recs], pa.string())
        return pa.table(cols) if cols else pa.table({"_": pa.nulls(len(recs))})


class FlatReader(ShardReader):
    """Flat token files: raw/modded .bin, header-less .npy memmaps, .npy (1-D or 2-D)."""

    def __init__(self, path, name, token_file: TokenFile, row_width: int | None = None, fmt="bin"):
        super().__init__(path, name)
        self.tf = token_file
        self.row_width = row_width  # 2-D .npy: tokens per row
        self.fmt = fmt
        self.units = ("row", "token") if row_width else ("token",)

    def length(self, unit="row"):
        self._unit_check(unit)
        if unit == "token":
            return self.tf.n_tokens
        return self.tf.n_tokens // self.row_width

    def _row_slices(self, rows):
        return np.stack([rows * self.row_width, (rows + 1) * self.row_width], axis=1)

    def _read_rows(self, rows):
        values, offsets = self.tf.gather(self._row_slices(rows))
        return _list_array(values, offsets), None

    def _read_tokens(self, slices):
        values, offsets = self.tf.gather(slices)
        return _batch(_list_array(values, offsets), None, self.name, slices[:, 0], slices[:, 1], "token")


class MegatronReader(FlatReader):
    """Megatron ``.bin``/``.idx``: ``row`` = sequence index, ``token`` = token offset in the ``.bin``."""

    def __init__(self, path, name):
        bin_path, idx_path = megatron_paths(path)
        if not _exists(idx_path):
            raise UserError(f"{name}: Megatron index {idx_path} not found next to the .bin")
        if not _exists(bin_path):
            raise UserError(f"{name}: Megatron data file {bin_path} not found next to the .idx")
        self.index = read_megatron_index(idx_path)
        dt = self.index.dtype
        tf = TokenFile(bin_path, 0, dt, _size(bin_path) // dt.itemsize)
        super().__init__(bin_path, name, tf, None, fmt="megatron")
        self.units = ("row", "token")

    def length(self, unit="row"):
        self._unit_check(unit)
        return self.tf.n_tokens if unit == "token" else len(self.index.sequence_lengths)

    def _row_slices(self, rows):
        start = np.asarray(self.index.sequence_pointers)[rows] // self.tf.dtype.itemsize
        return np.stack([start, start + np.asarray(self.index.sequence_lengths)[rows]], axis=1).astype(np.int64)


def open_shard(shard_root: str | None, shard: str, *, tokens_col: str = "tokens", text_col: str = "text",
               dtype=None) -> ShardReader:
    """Open ``shard`` (relative to ``shard_root``) with the reader for its format. Raises
    :class:`UserError` naming the shard if it is missing or unreadable."""
    path = resolve(shard_root, shard)
    if not _exists(path):
        where = f" under {shard_root}" if shard_root and not os.path.isabs(str(shard)) and not is_url(shard) else ""
        raise UserError(f"shard '{shard}' not found{where} ({path})")
    fmt = shard_format(path)
    if fmt == "parquet":
        return ParquetReader(path, shard, tokens_col, text_col)
    if fmt == "jsonl":
        return JsonlReader(path, shard, tokens_col, text_col)
    if fmt == "hf":
        return HFReader(path, shard, tokens_col, text_col)
    if fmt == "megatron":
        return MegatronReader(path, shard)
    if fmt == "npy":
        shape, fortran, dt, offset = _read_npy_header(path)
        if fortran and len(shape) > 1:
            raise UserError(f"{shard}: Fortran-ordered .npy arrays are not supported (save with C order)")
        if not np.issubdtype(dt, np.integer):
            raise UserError(f"{shard}: .npy holds {dt}, expected integer token ids")
        if len(shape) not in (1, 2):
            raise UserError(f"{shard}: .npy has shape {shape}, expected 1-D tokens or 2-D (rows, tokens)")
        n = int(np.prod(shape))
        return FlatReader(path, shard, TokenFile(path, offset, dt, n), shape[1] if len(shape) == 2 else None,
                          fmt="npy")
    return FlatReader(path, shard, open_token_file(path, dtype), None, fmt="bin")


def _close(reader: ShardReader) -> None:
    close = getattr(reader, "close", None)
    if close:
        close()


def read_slices(shard_root: str | None, shard: str, slices, *, unit: str = "row", tokens_col: str = "tokens",
                text_col: str = "text", dtype=None) -> pa.RecordBatch:
    """Read exactly ``slices`` (an ``(n, 2)`` int64 array of ``[start, end)``) of one shard.

    Returns ONE batch with :data:`SLICES_SCHEMA`: one row per sequence in the order of ``slices``
    (each slice expanded row by row for ``unit='row'``; one sequence per slice for ``unit='token'``).
    ``tokens`` is ``list<int64>`` (null where the shard has only text), ``text`` is null where the
    shard has no text, ``row`` is the row index (or token start), ``row_end`` the exclusive end
    (``row + 1`` for rows). ``dtype`` applies to raw token files only (default uint16).
    """
    reader = open_shard(shard_root, shard, tokens_col=tokens_col, text_col=text_col, dtype=dtype)
    try:
        return reader.read(slices, unit or "row")
    finally:
        _close(reader)


def shard_length(shard_root: str | None, shard: str, unit: str = "row", *, dtype=None) -> int:
    """Rows (``unit='row'``) or tokens (``unit='token'``) in the shard, from metadata where it exists
    (JSONL is counted by one streaming pass)."""
    reader = open_shard(shard_root, shard, dtype=dtype)
    try:
        return reader.length(unit or "row")
    finally:
        _close(reader)
