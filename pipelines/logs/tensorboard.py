"""TensorBoard event files: a minimal TFRecord framing and protobuf decoder for scalar summaries (no
TensorFlow), over one file or a directory of ``*tfevents*`` files."""

from __future__ import annotations

import functools
import re
import struct
from array import array
from pathlib import Path
import numpy as np

from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.logs.lines import _Parsed, _Series
from spike_audit.pipelines.logs.structured import GRAD_KEYS, LOSS_KEYS, VAL_KEYS, _pick


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 64 bits")


def _fields(buf: bytes):
    """Yield (field_number, wire_type, value) of a protobuf message (value: int or bytes)."""
    pos, n = 0, len(buf)
    while pos < n:
        key, pos = _varint(buf, pos)
        fno, wt = key >> 3, key & 7
        if wt == 0:
            v, pos = _varint(buf, pos)
        elif wt == 1:
            v, pos = buf[pos:pos + 8], pos + 8
        elif wt == 2:
            ln, pos = _varint(buf, pos)
            v, pos = buf[pos:pos + ln], pos + ln
        elif wt == 5:
            v, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wt}")
        if pos > n:
            raise ValueError("truncated message")
        yield fno, wt, v


# TensorProto dtype -> struct format of tensor_content
_TF_DTYPES = {1: "<f", 2: "<d", 19: "<e", 3: "<i", 9: "<q"}


def _tensor_scalar(buf: bytes) -> float | None:
    dtype, content, vals = 1, None, []
    for fno, wt, v in _fields(buf):
        if fno == 1:
            dtype = v
        elif fno == 4:
            content = v
        elif fno == 5:  # float_val
            vals += list(struct.unpack(f"<{len(v) // 4}f", v)) if wt == 2 else [struct.unpack("<f", v)[0]]
        elif fno == 6:  # double_val
            vals += list(struct.unpack(f"<{len(v) // 8}d", v)) if wt == 2 else [struct.unpack("<d", v)[0]]
        elif fno == 13 and wt == 0:  # half_val (single)
            vals.append(struct.unpack("<e", struct.pack("<H", v & 0xFFFF))[0])
    if content is not None:
        if dtype == 14:  # bfloat16
            if len(content) == 2:
                return struct.unpack("<f", b"\x00\x00" + content)[0]
            return None
        fmt = _TF_DTYPES.get(dtype)
        if fmt is None or len(content) != struct.calcsize(fmt):
            return None
        return float(struct.unpack(fmt, content)[0])
    return float(vals[0]) if len(vals) == 1 else None


MAX_RECORD_BYTES = 256 << 20  # a longer TFRecord is a corrupt length field, not an event


def _read_exact(f, n: int) -> bytes:
    """``n`` bytes (fewer only at the end of the stream), read in bounded pieces."""
    parts, got = [], 0
    while got < n:
        b = f.read(min(n - got, 16 << 20))
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


@functools.lru_cache(maxsize=1)
def _crc_table() -> np.ndarray:
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) lookup table, the checksum of TFRecord framing."""
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> np.uint32(1)) ^ np.uint32(0x82F63B78), t >> np.uint32(1)).astype(np.uint32)
    return t


@functools.lru_cache(maxsize=1)
def _crc_list() -> tuple[int, ...]:
    return tuple(_crc_table().tolist())


def crc32c(data: bytes) -> int:
    """CRC-32C of one byte string (a plain loop: for the 8-byte length fields and the rare long record)."""
    table = _crc_list()
    c = 0xFFFFFFFF
    for x in data:
        c = table[(c ^ x) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


#: Records up to this length have their checksums computed together, one byte position of all of them per numpy
#: step; longer ones (images, graphs; rare in a scalar log) one by one.
_LOCKSTEP_BYTES = 4096


def crc32c_many(bodies: list[bytes]) -> np.ndarray:
    """CRC-32C of each byte string (uint32), vectorised over the strings: byte position j of every string at
    least j + 1 long is folded in at once (sorted by length, the active strings are a prefix)."""
    n = len(bodies)
    out = np.zeros(n, dtype=np.uint32)
    lengths = np.fromiter((len(b) for b in bodies), dtype=np.int64, count=n)
    short = np.flatnonzero(lengths <= _LOCKSTEP_BYTES)
    for i in np.flatnonzero(lengths > _LOCKSTEP_BYTES).tolist():
        out[i] = crc32c(bodies[i])
    if not len(short):
        return out
    order = short[np.argsort(-lengths[short], kind="stable")]
    ln = lengths[order]
    data = np.frombuffer(b"".join(bodies[i] for i in order.tolist()), dtype=np.uint8)
    starts = np.zeros(len(order), dtype=np.int64)
    np.cumsum(ln[:-1], out=starts[1:])
    active = np.searchsorted(-ln, -np.arange(int(ln[0]) if len(ln) else 0), side="left")  # strings longer than j
    table = _crc_table()
    c = np.full(len(order), 0xFFFFFFFF, dtype=np.uint32)
    for j, a in enumerate(active.tolist()):
        cj = c[:a]
        c[:a] = table[(cj ^ data[starts[:a] + j]) & np.uint32(0xFF)] ^ (cj >> np.uint32(8))
    out[order] = c ^ np.uint32(0xFFFFFFFF)
    return out


def _masked(crc):
    """TFRecord's masked CRC: rotate right by 15 and add a constant (mod 2^32); scalar or uint32 array."""
    if isinstance(crc, np.ndarray):
        return (((crc >> np.uint32(15)) | (crc << np.uint32(17))) + np.uint32(0xA282EAD8)).astype(np.uint32)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _zeros_to_end(f) -> bool:
    """Whether the rest of the stream holds only zero bytes (a crash's zero-filled tail), read in bounded pieces."""
    while True:
        b = f.read(1 << 20)
        if not b:
            return True
        if b.count(0) != len(b):
            return False


_BATCH_RECORDS = 4096  # records whose data checksums are verified together
_BATCH_BYTES = 16 << 20


def _tb_records(f, path=None):
    """Yield (record_number, event_bytes) from a TFRecord stream, every record's framing and data checked
    against its CRC-32C. A record whose data fails its checksum yields (n, None) and reading goes on (its
    length was checked, so the next record is found); a truncated record at the end, or a damaged header followed
    only by zero bytes (a crash's zero-filled tail), yields (n, None) and ends the file; a damaged header with
    data after it is a :class:`UserError` (the framing past it cannot be trusted, and the rest would be lost)."""
    pending: list[tuple[int, bytes, int]] = []
    size = 0
    len_crcs: dict[int, int] = {}

    def flush():
        if not pending:
            return
        crcs = _masked(crc32c_many([b for _, b, _ in pending])).tolist()
        for (i, body, stored), got in zip(pending, crcs):
            yield i, (body if got == stored else None)
        pending.clear()

    i = offset = 0
    while True:
        head = _read_exact(f, 12)
        if not head:
            break
        i += 1
        if len(head) < 12:
            yield from flush()
            yield i, None
            return
        length, stored_len_crc = struct.unpack_from("<QI", head, 0)
        want = len_crcs.get(length)  # a scalar log's records come in a few lengths: each checksum computed once
        if want is None:
            if len(len_crcs) >= 4096:
                len_crcs.clear()
            want = len_crcs[length] = _masked(crc32c(head[:8]))
        if want != stored_len_crc or length > MAX_RECORD_BYTES:
            yield from flush()
            if _zeros_to_end(f):  # a tail a crash left zero-filled (or half written): the end of the log
                yield i, None
                return
            what = "its length field fails its checksum" if length <= MAX_RECORD_BYTES else f"a length of {length} bytes"
            raise UserError(f"{path or 'TensorBoard event file'}: record {i} at byte {offset}: damaged TFRecord "
                            f"framing ({what}), and data follows it: the records after it cannot be found; the "
                            f"{i - 1} records before it were read (a copy truncated at byte {offset} holds just them)")
        body = _read_exact(f, length + 4)
        if len(body) < length + 4:
            yield from flush()
            yield i, None
            return
        pending.append((i, body[:length], struct.unpack_from("<I", body, length)[0]))
        size += length
        offset += 12 + length + 4
        if len(pending) >= _BATCH_RECORDS or size >= _BATCH_BYTES:
            yield from flush()
            size = 0
    yield from flush()


def _tb_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and "tfevents" in p.name)  # regular files only
        if not files:
            raise UserError(f"{path}: no TensorBoard event files (*tfevents*) in this directory")
        return files
    return [path]


def _event_scalars(rec: bytes):
    """(step, [(tag, value)]) of one Event, or (None, None) when it has no summary. ValueError if malformed."""
    step, summary = 0, None
    for fno, wt, v in _fields(rec):
        if fno == 2:
            if wt != 0:
                raise ValueError("step is not a varint")
            if v >= 1 << 63:
                raise ValueError("negative step")
            step = v
        elif fno == 5:
            if wt != 2:
                raise ValueError("summary is not a message")
            summary = v
    if summary is None:
        return None, None
    out = []
    for fno, wt, v in _fields(summary):
        if fno != 1 or wt != 2:
            continue
        t, val = None, None
        for vf, vwt, vv in _fields(v):
            if vf == 1 and vwt == 2:
                t = vv.decode("utf-8", "replace")
            elif vf == 2 and vwt == 5:
                val = struct.unpack("<f", vv)[0]
            elif vf == 8 and vwt == 2:
                val = _tensor_scalar(vv)
        if t is not None and val is not None:
            out.append((t, val))
    return step, out


def _parse_tensorboard(path: Path, tag=None, metric=None, **_):
    from spike_audit.pipelines.files import open_decompressed

    scalars: dict[str, tuple[array, array]] = {}  # compact per-tag columns, no Python object per value
    bad, n_records, ignored = [], 0, 0
    for f in _tb_files(path):
        with open_decompressed(f, "TensorBoard event file") as fh:
            for _i, rec in _tb_records(fh, f):
                n_records += 1
                if rec is None:
                    bad.append(n_records)
                    continue
                try:
                    step, pairs = _event_scalars(rec)
                except (ValueError, IndexError, TypeError, struct.error):
                    bad.append(n_records)
                    continue
                if pairs is None:
                    ignored += 1
                    continue
                for t, val in pairs:
                    s, vals = scalars.setdefault(t, (array("q"), array("d")))
                    s.append(step)
                    vals.append(val)
    tags = sorted(scalars)
    chosen = {}
    if tag:
        if tag not in scalars:
            raise UserError(f"{path}: no scalar tag {tag!r} (tags: {', '.join(tags[:30]) or 'none'})")
        chosen[metric or "train_loss"] = tag
    else:
        main = _pick(tags, None, LOSS_KEYS, "tag", path)
        if main is None:
            lossy = [t for t in tags if "loss" in t.lower() and not re.search(r"val|eval|test", t.lower())]
            main = lossy[0] if lossy else None
        if main is not None:
            chosen[metric or "train_loss"] = main
        for name, cands in (("grad_norm", GRAD_KEYS), ("val_loss", VAL_KEYS)):
            c = _pick(tags, None, cands, name, path)
            if c is not None and c not in chosen.values():
                chosen[name] = c
        if not chosen:
            raise UserError(f"{path}: no scalar tag containing 'loss' (tags: {', '.join(tags[:30]) or 'none'}); "
                            f"use --tag")
    series = [_Series(m, np.frombuffer(scalars[t][0], np.int64).copy(), np.frombuffer(scalars[t][1], np.float64).copy())
              for m, t in chosen.items()]
    return _Parsed(series, np.array(bad, np.int64), "a complete TFRecord event", ignored, n_records)
