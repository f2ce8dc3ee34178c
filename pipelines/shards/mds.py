"""mosaicml-streaming MDS datasets (``index.json`` + ``shard.NNNNN.mds[.zstd|.gz|.bz2]``), read without
``streaming`` and without ever unpickling.

The format, as streaming 0.13 writes it (``MDSWriter``), read here from the files alone:

- ``index.json``: ``{"version": 2, "shards": [...]}``; each shard entry has ``format`` (``mds``),
  ``column_names`` (sorted), ``column_encodings``, ``column_sizes`` (bytes, or null when variable),
  ``samples``, ``raw_data.basename`` and, when compressed, ``compression`` (``zstd``, ``zstd:7``,
  ``gz``, ``bz2``...) and ``zip_data.basename``. Sample ids of the dataset are the shards' samples in
  index order (shard ``k`` holds ids ``cum[k] .. cum[k+1]-1``).
- a shard file: ``uint32 n``, then ``n + 1`` ``uint32`` absolute byte offsets of the samples, then
  the JSON config, then the samples. A sample is one ``uint32`` size per variable-size column (in
  column order), then every column's bytes in column order.
- encodings used for tokens: ``ndarray[:dtype[:shape]]`` (a dtype byte when the dtype is not in
  the encoding; a ``ndim << 2 | shape-dtype`` byte and the shape when the shape is not), ``bytes``
  (raw token ids: the dtype must be given, e.g. int64 for older llm-foundry conversions) and
  ``json`` (a list of ints); for text ``str`` (UTF-8). ``pkl`` columns are refused, never decoded.

Units: ``row`` = sample id of the dataset (the directory / ``index.json``) or of one shard file
(a ``.mds`` path; the directory's ``index.json`` describes it).
"""

from __future__ import annotations

import bz2
import io
import json
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.shards.base import ShardReader
from spike_audit.pipelines.shards.paths import _exists, _isdir, _memmap, _open, _size
from spike_audit.pipelines.shards.slices import _list_array, expand_rows

# streaming's NDArray value-dtype and shape-dtype codes.
_VALUE_DTYPES = {8: "uint8", 9: "int8", 16: "uint16", 17: "int16", 18: "float16", 32: "uint32", 33: "int32",
                 34: "float32", 64: "uint64", 65: "int64", 66: "float64"}
_SHAPE_DTYPES = {0: "<u1", 1: "<u2", 2: "<u4", 3: "<u8"}
_INT_DTYPES = {"uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64"}
_TOKEN_ENCODINGS = "ndarray[:INTDTYPE[:SHAPE]], bytes (with a dtype) or json (a list of ints)"
_MDS_SUFFIXES = (".mds", ".mds.zstd", ".mds.zst", ".mds.gz", ".mds.bz2")


def is_mds(path: str) -> bool:
    p = str(path).rstrip("/")
    low = p.lower()
    if low.endswith(_MDS_SUFFIXES) or os.path.basename(low) == "index.json":
        return True
    return _isdir(p) and _exists(os.path.join(p, "index.json"))


@dataclass
class MDSShard:
    raw: str  # absolute path of the uncompressed shard
    zip: str | None  # absolute path of the compressed shard, when there is one
    compression: str | None
    samples: int
    names: list[str]
    encodings: list[str]
    sizes: list[int | None]


def _index_path(path: str) -> tuple[str, str | None]:
    """(index.json, basename of one shard file or None) for a directory, an index.json or a shard file."""
    p = str(path).rstrip("/")
    if os.path.basename(p).lower() == "index.json":
        return p, None
    if p.lower().endswith(_MDS_SUFFIXES):
        return os.path.join(os.path.dirname(p), "index.json"), os.path.basename(p)
    return os.path.join(p, "index.json"), None


def read_mds_index(path: str, name: str | None = None) -> list[MDSShard]:
    """The shards of an MDS dataset (directory or ``index.json``), or the one shard file ``path``."""
    name = name or str(path)
    idx, only = _index_path(path)
    if not _exists(idx):
        raise UserError(f"{name}: no index.json at {idx} (an MDS dataset directory holds one)")
    try:
        with _open(idx) as f:
            obj = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{idx}: not a valid JSON index ({err})") from None
    if isinstance(obj, dict) and isinstance(obj.get("chunks"), list) and "config" in obj:
        raise UserError(f"{idx}: a litdata (litgpt) optimized dataset: its chunk format and sample order are not "
                        f"supported (only mosaicml-streaming MDS datasets have an index.json here)")
    if not isinstance(obj, dict) or not isinstance(obj.get("shards"), list):
        raise UserError(f"{idx}: expected an object with a 'shards' list (mosaicml-streaming index.json)")
    if obj.get("version") != 2:
        raise UserError(f"{idx}: index version {obj.get('version')!r} is not supported (expected 2)")
    base = os.path.dirname(idx)
    shards = []
    for k, s in enumerate(obj["shards"]):
        where = f"{idx}: shard {k}"
        if not isinstance(s, dict):
            raise UserError(f"{where}: expected an object")
        if s.get("format") != "mds":
            raise UserError(f"{where}: format {s.get('format')!r} is not supported (expected 'mds')")
        try:
            raw = s["raw_data"]["basename"]
            zip_ = (s.get("zip_data") or {}).get("basename")
            names, encs, sizes = list(s["column_names"]), list(s["column_encodings"]), list(s["column_sizes"])
            samples = s["samples"]
        except (KeyError, TypeError, ValueError, AttributeError) as err:  # e.g. "zip_data": "x"
            raise UserError(f"{where}: missing or malformed field {err}") from None
        if type(samples) is not int:  # 1.7 or "1" were taken as int(): a count is an integer
            raise UserError(f"{where}: samples {samples!r}, expected an integer count"[:300])
        comp = s.get("compression")
        if comp is not None and not isinstance(comp, str):
            raise UserError(f"{where}: compression {comp!r}, expected a name (zstd, gz, bz2) or null")
        if not all(isinstance(x, str) for x in names + encs):
            raise UserError(f"{where}: column_names and column_encodings must be strings")
        if not all(x is None or (isinstance(x, int) and not isinstance(x, bool) and x >= 0) for x in sizes):
            raise UserError(f"{where}: column_sizes must be non-negative integers or null, got {sizes!r}"[:300])
        if samples < 0:
            raise UserError(f"{where}: samples {samples}, expected a non-negative count")
        for b in (raw, zip_):
            if b is not None and (not isinstance(b, str) or os.path.basename(b) != b or b in ("", ".", "..")):
                raise UserError(f"{where}: shard file name {b!r} is not a plain file name in the dataset directory")
        if not (len(names) == len(encs) == len(sizes)):
            raise UserError(f"{where}: column_names, column_encodings and column_sizes differ in length")
        shards.append(MDSShard(os.path.join(base, raw), os.path.join(base, zip_) if zip_ else None,
                               s.get("compression"), samples, names, encs, sizes))
    if only is not None:
        hit = [s for s in shards if only in (os.path.basename(s.raw), os.path.basename(s.zip or ""))]
        if not hit:
            raise UserError(f"{name}: not listed in {idx}")
        shards = hit
    return shards


def _shard_bytes(s: MDSShard, name: str) -> np.ndarray:
    """The uncompressed shard as a uint8 array (a memmap when the raw file is local)."""
    if _exists(s.raw):
        if "://" in s.raw:
            with _open(s.raw) as f:
                return np.frombuffer(f.read(), np.uint8)
        return _memmap(s.raw, np.uint8) if _size(s.raw) else np.zeros(0, np.uint8)
    if not s.zip or not _exists(s.zip):
        raise UserError(f"{name}: shard file {s.raw} not found" + (f" (nor {s.zip})" if s.zip else ""))
    algo = (s.compression or "").split(":")[0]
    with _open(s.zip) as f:
        data = f.read()
    if not data:  # a writer killed before the first frame: not "a shard without its sample count"
        raise UserError(f"{s.zip}: the compressed shard file is empty (0 bytes; truncated or never written)")
    if algo in ("zstd", "zst", "gz"):
        from spike_audit.pipelines.files import decompressed

        # every frame / member; a truncated or corrupt stream is a one-line error naming the file
        with decompressed(io.BytesIO(data), s.zip) as d:
            out = d.read()
    elif algo == "bz2":
        try:
            out = bz2.decompress(data)
        except (OSError, ValueError, EOFError) as err:
            raise UserError(f"{s.zip}: corrupt or truncated bz2 stream ({err})") from None
    else:
        raise UserError(f"{name}: MDS compression {s.compression!r} is not supported (zstd, gz, bz2 are)")
    return np.frombuffer(out, np.uint8)


def _u32(buf: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Little-endian uint32 at each byte position (vectorised)."""
    idx = np.asarray(pos, np.int64)[..., None] + np.arange(4)
    return np.ascontiguousarray(buf[idx]).view("<u4")[..., 0].astype(np.int64)


def _gather(buf: np.ndarray, start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated bytes of each [start, end) and the offsets into them."""
    lengths = end - start
    offsets = np.zeros(len(start) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return np.asarray(buf[expand_rows(np.stack([start, end], axis=1))]), offsets


class MDSReader(ShardReader):
    fmt = "mds"

    def __init__(self, path, name, tokens_col="tokens", text_col="text", dtype=None):
        super().__init__(path, name)
        self.tokens_col, self.text_col, self.dtype = tokens_col, text_col, dtype
        self.shards = read_mds_index(path, name)
        self.cum = np.concatenate([[0], np.cumsum([s.samples for s in self.shards])]).astype(np.int64)

    def length(self, unit="row"):
        self._unit_check(unit)
        return int(self.cum[-1])

    def _col(self, s: MDSShard, col: str, role: str):
        if col not in s.names:
            return None
        k = s.names.index(col)
        enc = s.encodings[k]
        if enc == "pkl":
            raise UserError(f"{self.name}: column {col!r} is pickled (encoding 'pkl'); spike-audit never unpickles "
                            f"data: re-encode it as {_TOKEN_ENCODINGS if role == 'tokens' else 'str'}")
        return k, enc

    def _read_rows(self, rows):
        n = len(rows)
        shard_of = np.searchsorted(self.cum, rows, side="right") - 1
        tok_parts, txt_parts, order_parts = [], [], []
        any_tok = any_txt = False
        for k in np.unique(shard_of):
            s = self.shards[int(k)]
            sel = np.flatnonzero(shard_of == k)
            local = rows[sel] - self.cum[k]
            tok, txt = self._read_shard(s, local)
            any_tok |= tok is not None
            any_txt |= txt is not None
            tok_parts.append(tok)
            txt_parts.append(txt)
            order_parts.append(sel)
        if not any_tok and not any_txt:
            raise UserError(f"{self.name}: has neither a {self.tokens_col!r} nor a {self.text_col!r} column "
                            f"(columns: {', '.join(self.shards[0].names) if self.shards else 'none'})")
        if not order_parts:
            return (pa.array([], pa.list_(pa.int64())) if any_tok else None), None
        order = np.concatenate(order_parts)
        inverse = np.empty(n, np.int64)
        inverse[order] = np.arange(n)
        take = pa.array(inverse)

        def join(parts, typ):
            arrs = [p if p is not None else pa.nulls(len(o), typ) for p, o in zip(parts, order_parts)]
            return pa.concat_arrays(arrs).take(take)

        return (join(tok_parts, pa.list_(pa.int64())) if any_tok else None,
                join(txt_parts, pa.string()) if any_txt else None)

    def _read_shard(self, s: MDSShard, local: np.ndarray):
        tok_c = self._col(s, self.tokens_col, "tokens")
        txt_c = self._col(s, self.text_col, "text")
        if tok_c is None and txt_c is None:
            return None, None
        buf = _shard_bytes(s, self.name)
        if len(buf) < 4 or _u32(buf, np.array([0]))[0] != s.samples:
            raise UserError(f"{self.name}: {os.path.basename(s.raw)} does not start with its sample count "
                            f"{s.samples} (not an MDS shard, or index.json is stale)")
        if len(buf) < 8 + 4 * s.samples:  # the count and its samples + 1 offsets
            raise UserError(f"{self.name}: {os.path.basename(s.raw)}: {len(buf)} bytes cannot hold the offsets of "
                            f"its {s.samples} samples (truncated?)")
        begin = _u32(buf, 4 + 4 * local)
        end = _u32(buf, 8 + 4 * local)
        var = [i for i, z in enumerate(s.sizes) if not z]
        if (end < begin + 4 * len(var)).any() or (end > len(buf)).any():
            raise UserError(f"{self.name}: {os.path.basename(s.raw)}: sample offsets are corrupt")
        sizes = np.zeros((len(local), len(s.names)), np.int64)
        for i, z in enumerate(s.sizes):
            if z:
                sizes[:, i] = int(z)
        for j, i in enumerate(var):
            sizes[:, i] = _u32(buf, begin + 4 * j)
        starts = begin[:, None] + 4 * len(var) + np.concatenate(
            [np.zeros((len(local), 1), np.int64), np.cumsum(sizes, axis=1)[:, :-1]], axis=1)
        if (starts[:, -1] + sizes[:, -1] > end).any():
            raise UserError(f"{self.name}: {os.path.basename(s.raw)}: column sizes run past their sample")
        tok = txt = None
        if tok_c is not None:
            k, enc = tok_c
            tok = self._tokens(buf, starts[:, k], starts[:, k] + sizes[:, k], enc, s)
            from spike_audit.pipelines.shards.slices import check_token_ids

            offs = np.asarray(tok.offsets, dtype=np.int64)
            check_token_ids(tok.values.slice(int(offs[0]), int(offs[-1] - offs[0])), offs - offs[0],
                            lambda i: f"{self.name}: {os.path.basename(s.raw)}: sample {int(local[i])}")
        if txt_c is not None:
            k, enc = txt_c
            if enc != "str":
                raise UserError(f"{self.name}: text column {self.text_col!r} has encoding {enc!r}, expected 'str'")
            data, offs = _gather(buf, starts[:, k], starts[:, k] + sizes[:, k])
            txt = pa.StringArray.from_buffers(len(local), pa.py_buffer(offs.astype(np.int32)), pa.py_buffer(data))
            try:
                txt.validate(full=True)
            except pa.ArrowInvalid:
                raise UserError(f"{self.name}: text column {self.text_col!r} is not valid UTF-8") from None
        return tok, txt

    def _tokens(self, buf, start, end, enc: str, s: MDSShard) -> pa.Array:
        col = self.tokens_col
        head, _, rest = enc.partition(":")
        if head == "ndarray":
            dt_name, _, shape = rest.partition(":")
            if dt_name and dt_name not in _INT_DTYPES:
                raise UserError(f"{self.name}: token column {col!r} holds {dt_name}, expected integer ids")
            pos = start.copy()
            if dt_name:
                codes = None
            else:
                codes = np.asarray(buf[pos]).astype(np.int64)
                pos = pos + 1
            if not shape:
                hdr = np.asarray(buf[pos]).astype(np.int64)
                pos = pos + 1 + (hdr >> 2) * (1 << (hdr & 3))
            if codes is None:
                return self._values(buf, pos, end, np.dtype(dt_name))
            bad = ~np.isin(codes, [c for c, d in _VALUE_DTYPES.items() if d in _INT_DTYPES])
            if bad.any():
                c = int(codes[np.flatnonzero(bad)[0]])
                raise UserError(f"{self.name}: token column {col!r} holds {_VALUE_DTYPES.get(c, f'dtype code {c}')} "
                                f"values, expected integer ids")
            parts, idx = [], []
            for c in np.unique(codes):
                sel = np.flatnonzero(codes == c)
                parts.append(self._values(buf, pos[sel], end[sel], np.dtype(_VALUE_DTYPES[int(c)])))
                idx.append(sel)
            order = np.concatenate(idx)
            inv = np.empty(len(order), np.int64)
            inv[order] = np.arange(len(order))
            return pa.concat_arrays(parts).take(pa.array(inv))
        if enc == "bytes":
            if self.dtype is None:
                raise UserError(f"{self.name}: token column {col!r} is encoded 'bytes': pass the token dtype "
                                f"(--dtype; llm-foundry's older conversions wrote int64)")
            return self._values(buf, start, end, np.dtype(self.dtype))
        if enc == "json":
            import pyarrow.json as pj

            data, offs = _gather(buf, start, end)
            prefix, suffix = np.frombuffer(b'{"t":', np.uint8), np.frombuffer(b"}\n", np.uint8)
            lens = np.diff(offs)
            total = int(lens.sum()) + len(lens) * (len(prefix) + len(suffix))
            out = np.empty(total, np.uint8)
            row0 = np.concatenate([[0], np.cumsum(lens + len(prefix) + len(suffix))[:-1]]).astype(np.int64)
            out[(row0[:, None] + np.arange(len(prefix))).ravel()] = np.tile(prefix, len(lens))
            body_dst = np.repeat(row0 + len(prefix) - offs[:-1], lens) + np.arange(int(lens.sum()))
            out[body_dst] = data
            tail = row0 + len(prefix) + lens
            out[(tail[:, None] + np.arange(len(suffix))).ravel()] = np.tile(suffix, len(lens))
            try:
                t = pj.read_json(pa.BufferReader(out.tobytes()),
                                 read_options=pj.ReadOptions(block_size=max(1 << 20, total + 1)))
                return t.column("t").combine_chunks().cast(pa.list_(pa.int64()))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, KeyError) as err:
                raise UserError(f"{self.name}: token column {col!r} (json) is not a list of integers "
                                f"({str(err).splitlines()[0]})") from None
        raise UserError(f"{self.name}: token column {col!r} has encoding {enc!r}; supported: {_TOKEN_ENCODINGS}")

    def _values(self, buf, start, end, dt: np.dtype) -> pa.Array:
        lens = end - start
        if (lens % dt.itemsize).any():
            i = int(np.flatnonzero(lens % dt.itemsize)[0])
            raise UserError(f"{self.name}: token column {self.tokens_col!r}: {int(lens[i])} bytes is not a whole "
                            f"number of {dt.name} ids")
        data, offs = _gather(buf, start, end)
        values = np.ascontiguousarray(data).view(dt.newbyteorder("<")).astype(np.int64)
        return _list_array(values, offs // dt.itemsize)
