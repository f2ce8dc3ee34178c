"""Seeded 64-bit mixing: murmur3's ``fmix64`` finaliser, seed keys, and per-token mixes (looked up in a table for
small token ids).

Every hash here is pure uint64 arithmetic (wrapping multiply/add/xor/shift), so it is identical on
every platform and numpy version; nothing depends on Python's ``hash`` or on byte order."""

from __future__ import annotations

from functools import lru_cache
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


M64 = (1 << 64) - 1


_C1 = np.uint64(0xFF51AFD7ED558CCD)  # murmur3 fmix64 constants


_C2 = np.uint64(0xC4CEB9FE1A85EC53)


_S33 = np.uint64(33)


GOLDEN = 0x9E3779B97F4A7C15


#: Largest token id for which per-token mixes are looked up in a table instead of computed.
_TABLE_MAX = 1 << 22


def fmix64(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """murmur3's 64-bit finaliser, vectorised (a bijection on uint64). Works in place on ``out``."""
    if out is None:
        out = np.array(x, dtype=np.uint64, copy=True)
    elif out is not x:
        np.copyto(out, x, casting="unsafe")
    out ^= out >> _S33
    out *= _C1
    out ^= out >> _S33
    out *= _C2
    out ^= out >> _S33
    return out


def fmix64_int(x: int) -> int:
    """Scalar fmix64 on a Python int (for deriving constants from seeds)."""
    x &= M64
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & M64
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & M64
    x ^= x >> 33
    return x


def seed_key(seed: int, salt: int) -> int:
    """A 64-bit key derived from a user seed and a per-use salt."""
    return fmix64_int(fmix64_int((seed & M64) ^ (salt * GOLDEN & M64)) + salt)


@lru_cache(maxsize=4)
def _mix_table(key: int, size: int) -> np.ndarray:
    """``fmix64(t ^ key)`` for ``t < size`` (read-only; cached per key and size)."""
    table = np.arange(size, dtype=np.uint64)
    table ^= np.uint64(key)
    fmix64(table, out=table)
    table.flags.writeable = False
    return table


@lru_cache(maxsize=4)
def _mix_table_hi32(key: int, size: int) -> np.ndarray:
    table = (_mix_table(key, size) >> np.uint64(32)).astype(np.uint32)
    table.flags.writeable = False
    return table


def take(table: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``table[idx]`` for a 1-D numeric ``table`` and integer indices (the result may be read-only).

    Large gathers go through Arrow's ``take`` kernel (bounds-checked), several times faster than
    numpy's fancy indexing on small-integer indices; the values are the same.
    """
    if len(idx) < 4096 or idx.dtype.kind not in "iu" or table.dtype.kind not in "iuf":
        return table[idx]
    idx = np.ascontiguousarray(idx)
    return pc.take(pa.array(table), pa.array(idx)).to_numpy(zero_copy_only=True)


def _table_size(values: np.ndarray) -> int:
    """Size of the lookup table for ``values`` (a power of two >= 65536), or 0 to compute directly."""
    if len(values) == 0:
        return 0
    vmax = int(values.max())
    if values.dtype.kind == "i" and int(values.min()) < 0:
        raise ValueError("token ids must be non-negative")
    if vmax < _TABLE_MAX and vmax < 4 * len(values) + 65536:
        return max(65536, 1 << vmax.bit_length())
    return 0


def token_mix(values: np.ndarray, key: int, hi32: bool = False) -> np.ndarray:
    """``fmix64(token ^ key)`` for every token (uint64). Uses a vocab-sized table when ids are small.

    With ``hi32`` the result is the high 32 bits of the same value (uint32).
    """
    if len(values) == 0:
        return np.zeros(0, dtype=np.uint32 if hi32 else np.uint64)
    size = _table_size(values)
    if size:
        return take((_mix_table_hi32 if hi32 else _mix_table)(key, size), values)
    x = values.astype(np.uint64)
    x ^= np.uint64(key)
    fmix64(x, out=x)
    return (x >> np.uint64(32)).astype(np.uint32) if hi32 else x


@lru_cache(maxsize=16)
def _pos_table(key: int, size: int) -> np.ndarray:
    """``Q[j] = fmix64(j ^ key) | 1`` for ``j < size`` (read-only; cached)."""
    q = np.arange(size, dtype=np.uint64)
    q ^= np.uint64(key)
    fmix64(q, out=q)
    q |= np.uint64(1)
    q.flags.writeable = False
    return q


def _pos_weights(key: int, length: int) -> np.ndarray:
    return _pos_table(key, max(4096, 1 << max(length - 1, 0).bit_length()))


def maybe_repeated(key: np.ndarray) -> np.ndarray:
    """Indices of keys that may occur more than once: a superset of the repeated keys (uint64
    keys with well-mixed high bits). Two bucket-count filters on disjoint bit ranges, with at least
    4 buckets per key each; the exact decision is left to the caller. The indices are ascending, so
    a stable sort of ``key[idx]`` orders the repeated keys as a stable sort of ``key`` does."""
    idx = None
    for shift in (0, 21):
        m = len(key) if idx is None else len(idx)
        if m < 2:
            return np.zeros(0, dtype=np.int64)
        bits = min(max(10, int(m - 1).bit_length() + 2), 21)
        k = key if idx is None else key[idx]
        bucket = ((k << np.uint64(shift)) >> np.uint64(64 - bits)).astype(np.intp)
        sel = np.flatnonzero(np.bincount(bucket, minlength=1 << bits)[bucket] >= 2)
        idx = sel if idx is None else idx[sel]
    return idx
