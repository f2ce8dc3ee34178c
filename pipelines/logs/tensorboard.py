"""TensorBoard event files: a minimal TFRecord framing and protobuf decoder for scalar summaries (no
TensorFlow), over one file or a directory of ``*tfevents*`` files."""

from __future__ import annotations

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


def _tb_records(f):
    """Yield (record_number, event_bytes) from a TFRecord stream; a truncated or impossible record yields
    (n, None) and ends the file (its framing cannot be trusted past that point)."""
    i = 0
    while True:
        head = _read_exact(f, 12)
        if not head:
            return
        i += 1
        if len(head) < 12:
            yield i, None
            return
        (length,) = struct.unpack_from("<Q", head, 0)
        if length > MAX_RECORD_BYTES:
            yield i, None
            return
        body = _read_exact(f, length + 4)
        if len(body) < length + 4:
            yield i, None
            return
        yield i, body[:length]


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
            for _i, rec in _tb_records(fh):
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
