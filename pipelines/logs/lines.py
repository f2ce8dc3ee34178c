"""What every log reader shares: the format names, the parse records (``LogReport``, per-metric series), reading a
log's bytes (``.gz``/``.zst`` decompressed) into an Arrow array of lines, and the vectorised regex helpers the text
formats parse with."""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from pathlib import Path
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spike_audit.pipelines.errors import UserError


FORMATS: tuple[str, ...] = (
    "jsonl",
    "csv",
    "megatron",
    "megatron-golden",
    "modded-nanogpt",
    "llmc",
    "nanogpt",
    "torchtitan",
    "olmo",
    "hf-trainer-state",
    "tensorboard",
    "pattern",
)


MAX_MALFORMED_REPORTED = 10


# A number as trainers print it, including nan / -nan / inf / infinity (case-insensitive).
_NUMBER = r"(?i)^[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?|nan|inf(?:inity)?)$"


_ANSI = r"\x1b\[[0-9;]*[A-Za-z]"


@dataclass
class LogReport:
    path: str
    format: str
    run: str
    n_lines: int
    n_values: int
    n_malformed: int
    malformed_lines: list[int]
    n_ignored: int
    n_replaced: int
    metrics: list[str]
    runs: list[str] = field(default_factory=list)  # several when one file holds several runs (see module doc)
    trainer: str | None = None  # whose step numbering the format uses (spike_audit.schemas.steps), if it says
    n_out_of_order: int = 0  # values logged out of order (late or stray lines, not a resume: .restarts)

    def summary(self) -> str:
        bad = ""
        if self.n_malformed:
            first = ", ".join(map(str, self.malformed_lines[:5]))
            bad = f", {self.n_malformed} malformed (lines {first}{', ...' if self.n_malformed > 5 else ''})"
        return (f"{self.path} [{self.format}]: {self.n_lines} lines, {self.n_values} values "
                f"({', '.join(self.metrics)}){bad}, {self.n_ignored} unrelated lines ignored, "
                f"{self.n_replaced} replaced by resume"
                + (f", {self.n_out_of_order} out of order" if self.n_out_of_order else ""))

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class _Series:
    metric: str
    steps: np.ndarray  # int64, file order
    values: np.ndarray  # float64
    lines: np.ndarray | None = None  # int64 1-based source lines, or None (binary / JSON documents)
    totals: np.ndarray | None = None  # int64 planned total per value (-1 unknown), or None


@dataclass
class _Parsed:
    series: list[_Series]
    malformed: np.ndarray  # 1-based line numbers (or record numbers)
    expected: str
    n_ignored: int = 0
    n_lines: int = 0
    text_lines: pa.Array | None = None  # for error messages


CHUNK_BYTES = 4 << 20  # text parsed per chunk: memory is bounded by a few chunks, whatever the log's size


MAX_LINE_BYTES = 64 << 20  # a longer "line" is not a training log (or is /dev/zero-like garbage)


MAX_DOCUMENT_BYTES = 512 << 20  # JSON documents (golden values, trainer_state.json) are parsed whole


_UTF8_BOM = b"\xef\xbb\xbf"


def _text_decoder(head: bytes):
    """(bytes to skip, an incremental decoder to UTF-8 or None) from a stream's first bytes (its BOM, if any).
    UTF-16 / UTF-32 logs (e.g. PowerShell's ``>``) are transcoded; a UTF-8 BOM is dropped."""
    if head.startswith(_UTF8_BOM):
        return 3, None
    if head.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        return 0, codecs.getincrementaldecoder("utf-32")("replace")
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return 0, codecs.getincrementaldecoder("utf-16")("replace")
    return 0, None


def _utf8(data: bytes) -> bytes:
    """``data`` if it is valid UTF-8, else with each invalid sequence replaced by U+FFFD (never a failure)."""
    try:
        _whole(data).validate(full=True)
        return data
    except pa.ArrowInvalid:
        return data.decode("utf-8", errors="replace").encode("utf-8")


def _whole(data: bytes) -> pa.Array:
    return pa.LargeStringArray.from_buffers(1, pa.py_buffer(np.array([0, len(data)], dtype=np.int64)),
                                            pa.py_buffer(data))


def _newlines(data: bytes) -> bytes:
    """Universal newlines: ``\\r\\n`` and a lone ``\\r`` become ``\\n``."""
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return data


def decode_text(data: bytes) -> bytes:
    """A whole document's bytes as UTF-8 text: BOM dropped (UTF-16/32 transcoded), invalid bytes replaced."""
    skip, dec = _text_decoder(data[:4])
    if dec is not None:
        return dec.decode(data, final=True).encode("utf-8")
    return _utf8(data[skip:])


@dataclass
class TextChunk:
    """Whole lines of a log: ``lines`` (Arrow large_string), their text ``data`` (UTF-8, joined by ``\\n``,
    no trailing newline) and the 1-based number of the first one."""

    lines: pa.Array
    data: bytes
    first_line: int


class TextStream:
    """A log's lines in chunks of about ``chunk_bytes``, in bounded memory: decompressed (every .gz member
    and .zst frame; truncated or corrupt streams are errors), BOM dropped (UTF-16/32 transcoded), universal
    newlines (``\\n``, ``\\r\\n``, ``\\r``), invalid UTF-8 replaced by U+FFFD, lines longer than
    ``MAX_LINE_BYTES`` refused. After iterating: ``n_lines``, ``terminated`` (the last line ended with a
    newline) and ``last_line`` (its text)."""

    def __init__(self, path, chunk_bytes: int | None = None):
        self.path = path
        self.chunk_bytes = chunk_bytes or CHUNK_BYTES
        self.n_lines = 0
        self.terminated = True
        self.last_line = ""

    def _blocks(self, f):
        head = f.read(self.chunk_bytes)
        skip, dec = _text_decoder(head)
        block = head[skip:]
        while block:
            yield dec.decode(block).encode("utf-8") if dec is not None else block
            block = f.read(self.chunk_bytes)
        if dec is not None:
            tail = dec.decode(b"", final=True).encode("utf-8")
            if tail:
                yield tail

    def _chunk(self, text: bytes) -> TextChunk:
        text = _utf8(text)
        lines = pc.split_pattern(_whole(text), "\n").flatten()
        chunk = TextChunk(lines, text, self.n_lines + 1)
        self.n_lines += len(lines)
        return chunk

    def __iter__(self):
        from spike_audit.pipelines.files import open_decompressed

        carry = b""
        with open_decompressed(self.path, "log") as f:
            for block in self._blocks(f):
                buf = carry + block if carry else block
                tail = b""
                if buf.endswith(b"\r"):  # may be the first half of a \r\n split across blocks
                    buf, tail = buf[:-1], b"\r"
                buf = _newlines(buf)
                nl = buf.rfind(b"\n")
                if nl < 0:
                    carry = buf + tail
                    if len(carry) > MAX_LINE_BYTES:
                        raise UserError(f"{self.path}:{self.n_lines + 1}: a line longer than "
                                        f"{MAX_LINE_BYTES >> 20} MiB; expected a text log")
                    continue
                carry = buf[nl + 1:] + tail
                chunk = self._chunk(buf[:nl])
                self.last_line = chunk.lines[-1].as_py()
                yield chunk
        if carry:
            self.terminated = carry.endswith(b"\r")
            chunk = self._chunk(carry[:-1] if self.terminated else carry)
            self.last_line = chunk.lines[-1].as_py()
            yield chunk


def read_document(path, what: str = "JSON document") -> bytes:
    """A whole (small) document's text, decompressed and decoded (see :func:`decode_text`), at most
    ``MAX_DOCUMENT_BYTES``."""
    from spike_audit.pipelines.files import open_decompressed

    with open_decompressed(path, what) as f:
        data = f.read(MAX_DOCUMENT_BYTES + 1)
    if len(data) > MAX_DOCUMENT_BYTES:
        raise UserError(f"{path}: larger than {MAX_DOCUMENT_BYTES >> 20} MiB; expected a {what}")
    return decode_text(data)


def read_head(path, n: int = 1 << 22) -> bytes:
    """The first ``n`` decompressed bytes of a file (format sniffing)."""
    from spike_audit.pipelines.files import open_decompressed

    with open_decompressed(path, "log") as f:
        return f.read(n)


def _split_lines(data: bytes | str) -> pa.Array:
    """All lines of a (small) text as one Arrow string array, without a Python object per line."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    data = _newlines(_utf8(data))
    if data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        return pa.array([], pa.large_string())
    return pc.split_pattern(_whole(data), "\n").flatten()


def _bools(arr) -> np.ndarray:
    """A boolean Arrow array as a numpy bool array (nulls are False), without pyarrow's pandas-backed path."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if arr.null_count:
        arr = pc.fill_null(arr, False)
    if len(arr) == 0:
        return np.zeros(0, bool)
    bits = np.frombuffer(arr.buffers()[1], np.uint8)
    return np.unpackbits(bits, bitorder="little")[arr.offset:arr.offset + len(arr)].astype(bool)


def _np(arr) -> np.ndarray:
    """A numeric Arrow array as numpy: a zero-copy (read-only) view when possible."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if arr.null_count == 0 and (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)):
        return arr.to_numpy(zero_copy_only=True)
    if pa.types.is_boolean(arr.type):
        return _bools(arr)
    return arr.to_numpy(zero_copy_only=False)


def _match(lines: pa.Array, regex: str) -> np.ndarray:
    return _bools(pc.match_substring_regex(lines, regex))


def _floats(strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Parse number strings; returns (values with NaN where invalid, ok mask). Nulls are not ok."""
    ok_arr = pc.fill_null(pc.match_substring_regex(strings, _NUMBER), False)
    ok = _bools(ok_arr)
    clean = pc.if_else(ok_arr, strings, pa.scalar(None, strings.type))
    vals = _np(pc.cast(clean, pa.float64())).astype(np.float64)
    return vals, ok


def _ints(strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    ok_arr = pc.fill_null(pc.match_substring_regex(strings, r"^\d{1,18}$"), False)  # < 2^63: never wraps
    ok = _bools(ok_arr)
    clean = pc.if_else(ok_arr, strings, pa.scalar("0", strings.type))
    return _np(pc.cast(clean, pa.int64())).astype(np.int64), ok


def _subset(lines: pa.Array, marker: str) -> tuple[pa.Array, np.ndarray, int]:
    """Lines carrying ``marker``, their 1-based numbers, and how many non-blank lines lack it."""
    has = _match(lines, marker)
    idx = np.flatnonzero(has)
    n_ignored = int((~has & ~_blank(lines)).sum())
    return lines.take(pa.array(idx)), idx + 1, n_ignored


def _blank(lines: pa.Array) -> np.ndarray:
    return _match(lines, r"^\s*$")


def _group(struct_arr: pa.Array, name: str) -> pa.Array:
    return pc.struct_field(struct_arr, name)


def _no_nul(sub: pa.Array) -> np.ndarray:
    """True where a line holds no NUL byte. A run of NULs is what a crash leaves where a log's tail was being
    written (a file's pre-allocated or lost blocks read back as zeros), and the text around it can join the head of
    one record to the tail of another: such a line is malformed, never a step with another step's values."""
    if len(sub) == 0:
        return np.ones(0, bool)
    data = sub.buffers()[-1]  # the strings' bytes (of the whole buffer a slice points into: a superset)
    if data is None or data.size == 0 or data.to_pybytes().find(b"\x00") < 0:
        return np.ones(len(sub), bool)
    return ~_bools(pc.match_substring(sub, "\x00"))


def _single_record(sub: pa.Array, record: str | None) -> np.ndarray:
    """True where a line holds at most one record (``record`` matches at most once): two records on one line (two
    ranks writing without a newline between them, a killed writer's half line followed by the restart's) are
    malformed, never read as one step with another step's values."""
    if record is None or len(sub) == 0:
        return np.ones(len(sub), bool)
    return _np(pc.count_substring_regex(sub, record)) <= 1


def _parse_kind_lines(lines, marker, pattern, kinds, expected, extra=None, record=None):
    """Generic line parser: ``pattern`` has groups ``step``, optional ``total``, ``kind`` (mapped to
    a metric by ``kinds``) and ``value``; ``extra`` maps metric -> regex with group ``v`` for optional
    further values on the same line (a present but unparsable one makes the line malformed); a line on which
    ``record`` matches twice is malformed (:func:`_single_record`)."""
    sub, nums, n_ignored = _subset(lines, marker)
    m = pc.extract_regex(sub, pattern)
    matched = _bools(pc.is_valid(m)) & _single_record(sub, record) & _no_nul(sub)
    steps, ok_s = _ints(pc.fill_null(_group(m, "step"), ""))
    vals, ok_v = _floats(pc.fill_null(_group(m, "value"), ""))
    good = matched & ok_s & ok_v
    totals = None
    if "(?P<total>" in pattern:
        totals, ok_t = _ints(pc.fill_null(_group(m, "total"), ""))
        totals = np.where(ok_t, totals, -1)
    kind = pc.fill_null(_group(m, "kind"), "") if "(?P<kind>" in pattern else None
    series = []
    extras = {}
    for metric, regex in (extra or {}).items():
        e = pc.extract_regex(sub, regex)
        present = _bools(pc.is_valid(e))
        ev, eok = _floats(pc.fill_null(_group(e, "v"), ""))
        good &= ~present | eok
        extras[metric] = (present, ev)
    for k, metric in kinds.items():
        sel = good & _bools(pc.equal(kind, k)) if kind is not None else good
        series.append(_mk(metric, steps, vals, nums, totals, sel))
    for metric, (present, ev) in extras.items():
        series.append(_mk(metric, steps, ev, nums, totals, good & present))
    return _Parsed(series, nums[~good], expected, n_ignored, len(lines), lines)


def _mk(metric, steps, vals, nums, totals, sel) -> _Series:
    return _Series(metric, steps[sel], vals[sel], nums[sel], None if totals is None else totals[sel])


def _const(value: str, n: int) -> pa.Array:
    """``n`` copies of one string as a plain string array, built from buffers (no Python object per row)."""
    b = value.encode("utf-8")
    if n * len(b) >= 2 ** 31:
        return pa.DictionaryArray.from_arrays(np.zeros(n, np.int32), pa.array([value], pa.large_string())).cast(
            pa.large_string())
    offsets = np.arange(n + 1, dtype=np.int32) * len(b)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(b * n))
