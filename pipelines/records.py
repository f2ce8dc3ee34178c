"""Records as data on disk, never pickles: the part files the pipelines' sink writes and the shard audit's state.

A record is a tree of plain values (dict, list, tuple, str, int, float, bool, None, bytes) and numpy arrays or
scalars of numeric dtypes (bool, signed and unsigned integers, floats). A part file is one Parquet table, one row
per record:

- ``tree`` (string): the record as JSON, with each array replaced by ``{"$a": i}`` (its index in ``arrays``),
  a numpy scalar by ``{"$n": [dtype, value]}``, a tuple by ``{"$t": [...]}``, bytes by ``{"$b": i}`` and a dict
  whose keys are not all plain strings by ``{"$d": [[key, value], ...]}``;
- ``arrays`` (list of struct ``dtype`` string, ``shape`` list of int64, ``data`` binary): the raw bytes of each
  array, C order, in the byte order ``dtype`` names.

The schema metadata says what the file is (``spike_audit.records`` = format version, ``spike_audit.kind``).
Loading validates everything and builds arrays only from allow-listed numeric dtypes with the exact byte count
their shape needs: a foreign, corrupt or hostile file is a :class:`~spike_audit.pipelines.errors.UserError`
naming it, and nothing in a file is ever executed.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spike_audit.pipelines.errors import UserError

FORMAT_VERSION = 1
KEY_FORMAT = b"spike_audit.records"
KEY_KIND = b"spike_audit.kind"
SUFFIX = ".records.parquet"

_ARRAY = pa.struct([("dtype", pa.string()), ("shape", pa.list_(pa.int64())), ("data", pa.large_binary())])
SCHEMA = pa.schema([("tree", pa.large_string()), ("arrays", pa.list_(_ARRAY))])
_DTYPE = re.compile(r"^[<>|][biuf][1248]$|^\|b1$")


def _check_dtype(s: str) -> np.dtype:
    if not isinstance(s, str) or not _DTYPE.match(s):
        raise ValueError(f"dtype {s!r} is not an allowed numeric dtype")
    return np.dtype(s)


def _encode(obj, arrays: list):
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, float)) and not isinstance(obj, np.generic):
        return obj
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"array of dtype {obj.dtype} cannot be stored as data")
        arrays.append(obj if obj.flags.c_contiguous else obj.copy(order="C"))  # (ascontiguousarray makes 0-d 1-d)
        return {"$a": len(arrays) - 1}
    if isinstance(obj, np.generic):
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"numpy scalar of dtype {obj.dtype} cannot be stored as data")
        if obj.dtype.kind == "f" and obj != obj:  # a NaN's payload bits are not in obj.item()
            return {"$nb": [obj.dtype.str, obj.tobytes().hex()]}
        return {"$n": [obj.dtype.str, obj.item()]}
    if isinstance(obj, (bytes, bytearray, memoryview)):
        arrays.append(np.frombuffer(bytes(obj), np.uint8))
        return {"$b": len(arrays) - 1}
    if isinstance(obj, tuple):
        return {"$t": [_encode(v, arrays) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, arrays) for v in obj]
    if isinstance(obj, dict):
        if all(type(k) is str and not k.startswith("$") for k in obj):
            return {k: _encode(v, arrays) for k, v in obj.items()}
        return {"$d": [[_encode(k, arrays), _encode(v, arrays)] for k, v in obj.items()]}
    raise TypeError(f"{type(obj).__name__} cannot be stored as data")


def _decode(node, arrays: list):
    if isinstance(node, list):
        return [_decode(v, arrays) for v in node]
    if not isinstance(node, dict):
        return node
    if len(node) == 1:
        (k, v), = node.items()
        if k == "$a":
            return arrays[v]
        if k == "$b":
            return arrays[v].tobytes()
        if k == "$n":
            dtype, value = v
            return _check_dtype(dtype).type(value)
        if k == "$nb":
            dtype, bits = v
            dt = _check_dtype(dtype)
            raw = bytes.fromhex(bits) if isinstance(bits, str) else b""
            if dt.kind != "f" or len(raw) != dt.itemsize:
                raise ValueError(f"float bits {str(bits)[:40]!r} do not fit dtype {dt}")
            return np.frombuffer(raw, dt)[0]
        if k == "$t":
            return tuple(_decode(x, arrays) for x in v)
        if k == "$d":
            return {_hashable(_decode(a, arrays)): _decode(b, arrays) for a, b in v}
    if any(k.startswith("$") for k in node):
        raise ValueError(f"unknown marker in {sorted(node)[:3]}")
    return {k: _decode(v, arrays) for k, v in node.items()}


def _hashable(k):
    if isinstance(k, (list, dict, np.ndarray)):
        raise ValueError("a dict key must be a plain value")
    return k


def encode(records: list, kind: str) -> pa.Table:
    """Records -> the table of a part file (see the module docstring)."""
    trees, arrs = [], []
    for rec in records:
        arrays: list[np.ndarray] = []
        trees.append(json.dumps(_encode(rec, arrays), separators=(",", ":")))
        arrs.append([{"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()} for a in arrays])
    meta = {KEY_FORMAT: str(FORMAT_VERSION).encode(), KEY_KIND: kind.encode()}
    return pa.table([pa.array(trees, pa.large_string()), pa.array(arrs, pa.list_(_ARRAY))],
                    schema=SCHEMA.with_metadata(meta))


def to_bytes(records: list, kind: str) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(encode(records, kind), sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _check_schema(schema: pa.Schema, source: str, kind: str | None) -> None:
    meta = schema.metadata or {}
    if meta.get(KEY_FORMAT) is None:
        raise UserError(f"{source}: not a spike-audit records file (no {KEY_FORMAT.decode()} in its metadata)")
    if meta[KEY_FORMAT] != str(FORMAT_VERSION).encode():
        raise UserError(f"{source}: records format version {meta[KEY_FORMAT].decode(errors='replace')!r}, expected "
                        f"{FORMAT_VERSION} (written by another spike-audit version)")
    if kind is not None and meta.get(KEY_KIND) != kind.encode():
        got = meta.get(KEY_KIND, b"").decode(errors="replace")
        raise UserError(f"{source}: holds {got!r} records, expected {kind!r}")
    if not schema.remove_metadata().equals(SCHEMA):
        raise UserError(f"{source}: records file with schema {schema.remove_metadata()}, expected {SCHEMA}")


def check_file(path: str, kind: str | None = None) -> None:
    """Validate a part file's footer (format, version, kind, schema) without reading its data."""
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as err:
        raise UserError(f"{path}: not a readable spike-audit records file ({_one_line(err)})") from None
    _check_schema(schema, path, kind)


def from_bytes(data: bytes, source: str, kind: str | None = None) -> list:
    """A part file's bytes -> its records, validated (see the module docstring)."""
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (OSError, pa.ArrowException) as err:
        raise UserError(f"{source}: not a readable spike-audit records file ({_one_line(err)})") from None
    _check_schema(table.schema, source, kind)
    out = []
    trees = table.column("tree").to_pylist()
    arrays = table.column("arrays").to_pylist()
    for i, (tree, arrs) in enumerate(zip(trees, arrays)):
        try:
            built = []
            for a in arrs or []:
                dt = _check_dtype(a["dtype"])
                shape = tuple(int(x) for x in a["shape"])
                if any(x < 0 for x in shape) or int(np.prod(shape, dtype=np.int64)) * dt.itemsize != len(a["data"]):
                    raise ValueError(f"array of shape {shape} and dtype {dt} does not match its {len(a['data'])} bytes")
                built.append(np.frombuffer(a["data"], dt).reshape(shape).copy())
            out.append(_decode(json.loads(tree), built))
        except (ValueError, TypeError, KeyError, IndexError, json.JSONDecodeError) as err:
            raise UserError(f"{source}: row {i}: not a valid record ({_one_line(err)})") from None
    return out


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]
