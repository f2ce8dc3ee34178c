"""Arrow-level pieces of the text signals: a string array's bytes and offsets as numpy, segment counts, first
occurrences, flattened lists, a 64-bit mix, and ``binary_view`` arrays pointing into existing bytes (no copy)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_M64 = (1 << 64) - 1
_BIG = np.iinfo(np.int64).max


def _byte_view(arr: pa.LargeStringArray) -> tuple[np.ndarray, np.ndarray]:
    """(UTF-8 bytes of all documents, byte offsets of each document into them, from 0)."""
    off = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset: arr.offset + len(arr) + 1]
    buf = arr.buffers()[2]
    data = np.frombuffer(buf, dtype=np.uint8) if buf is not None else np.zeros(0, np.uint8)
    return data[off[0]: off[-1]], off - off[0]


def _seg_count(mask: np.ndarray, off: np.ndarray) -> np.ndarray:
    """Number of True in ``mask[off[i]:off[i+1]]`` for every segment ``i``."""
    return np.diff(np.searchsorted(np.flatnonzero(mask), off))


def _first_mask(ids: np.ndarray) -> np.ndarray:
    """True where an id (numbered in order of first appearance) appears for the first time."""
    if not len(ids):
        return np.zeros(0, dtype=bool)
    prev_max = np.empty_like(ids)
    prev_max[0] = -1
    np.maximum.accumulate(ids[:-1], out=prev_max[1:])
    return ids > prev_max


def _flat(lists: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """(flattened values, index of the document of every value) of a list array."""
    return pc.list_flatten(lists), pc.list_parent_indices(lists).to_numpy().astype(np.int64)


_R = np.uint64(0x9E3779B97F4A7C15)  # odd multipliers of the 64-bit polynomial hashes (mod 2^64)


_C = np.uint64(0xBF58476D1CE4E5B9)


_D = np.uint64(0x94D049BB133111EB)


_S = (np.uint64(30), np.uint64(27), np.uint64(31))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (a bijection of uint64), vectorised."""
    x = x ^ (x >> _S[0])
    x *= _C
    x ^= x >> _S[1]
    x *= _D
    return x ^ (x >> _S[2])


_VIEW = np.dtype([("length", "<i4"), ("head", "<u8"), ("tail", "<u4")])  # Arrow's 16-byte binary view


def _views(buf: pa.Buffer, data: np.ndarray, start: np.ndarray, length: np.ndarray) -> pa.Array:
    """A ``binary_view`` array of the byte ranges ``[start, start + length)`` of ``buf``, without
    copying them (``data``: the bytes of ``buf`` as uint8, followed by at least 12 padding bytes).

    A view is the length, then either the bytes inline (up to 12, zero-padded) or a 4-byte prefix,
    buffer index 0 and the offset."""
    m = len(start)
    if m and int(start.max()) + int(length.max()) >= 2**31:
        raise ValueError("text: a document of 2 GiB or more (Arrow binary views address 32-bit offsets)")
    u8 = np.ndarray((len(data) - 7,), dtype="<u8", buffer=data, strides=(1,))  # unaligned 8-byte reads
    u4 = np.ndarray((len(data) - 3,), dtype="<u4", buffer=data, strides=(1,))
    head, tail = u8[start], u4[start + 8]
    short = length <= 12
    bits = np.minimum(length, 12).astype(np.uint64) * np.uint64(8)  # inline bytes, in bits
    lo_mask = np.where(bits >= 64, np.uint64(_M64), (np.uint64(1) << np.minimum(bits, 63)) - np.uint64(1))
    hi_bits = np.where(bits > 64, bits - np.uint64(64), np.uint64(0))
    hi_mask = (np.uint64(1) << hi_bits) - np.uint64(1)
    v = np.empty(m, dtype=_VIEW)
    v["length"] = length
    v["head"] = np.where(short, head & lo_mask, head & np.uint64(0xFFFFFFFF))  # long: prefix, buffer 0
    v["tail"] = np.where(short, tail & hi_mask.astype(np.uint32), start.astype(np.uint32))  # long: offset
    return pa.Array.from_buffers(pa.binary_view(), m, [None, pa.py_buffer(v), buf])
