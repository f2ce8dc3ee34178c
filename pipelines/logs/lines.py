"""What every log reader shares: the format names, the parse records (``LogReport``, per-metric series), reading a
log's bytes (``.gz``/``.zst`` decompressed) into an Arrow array of lines, and the vectorised regex helpers the text
formats parse with."""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


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

    def summary(self) -> str:
        bad = ""
        if self.n_malformed:
            first = ", ".join(map(str, self.malformed_lines[:5]))
            bad = f", {self.n_malformed} malformed (lines {first}{', ...' if self.n_malformed > 5 else ''})"
        return (f"{self.path} [{self.format}]: {self.n_lines} lines, {self.n_values} values "
                f"({', '.join(self.metrics)}){bad}, {self.n_ignored} unrelated lines ignored, "
                f"{self.n_replaced} replaced by resume")

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


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:4] == b"\x28\xb5\x2f\xfd":
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def _split_lines(data: bytes | str) -> pa.Array:
    """All lines of a text as one Arrow string array, without a Python object per line."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    else:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            data = data.decode("utf-8", errors="replace").encode("utf-8")
    if data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        return pa.array([], pa.large_string())
    whole = pa.LargeStringArray.from_buffers(
        1, pa.py_buffer(np.array([0, len(data)], dtype=np.int64)), pa.py_buffer(data))
    lines = pc.split_pattern(whole, "\n").flatten()
    if b"\r" in data:
        lines = pc.utf8_rtrim(lines, "\r")
    return lines


def _np(arr) -> np.ndarray:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return arr.to_numpy(zero_copy_only=False)


def _match(lines: pa.Array, regex: str) -> np.ndarray:
    return _np(pc.match_substring_regex(lines, regex)).astype(bool, copy=False)


def _floats(strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Parse number strings; returns (values with NaN where invalid, ok mask). Nulls are not ok."""
    ok = _np(pc.fill_null(pc.match_substring_regex(strings, _NUMBER), False)).astype(bool, copy=False)
    clean = pc.if_else(pa.array(ok), strings, pa.scalar(None, strings.type))
    vals = _np(pc.cast(clean, pa.float64())).astype(np.float64)
    return vals, ok


def _ints(strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    ok = _np(pc.fill_null(pc.match_substring_regex(strings, r"^\d{1,18}$"), False)).astype(bool, copy=False)
    clean = pc.if_else(pa.array(ok), strings, pa.scalar("0", strings.type))
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


def _parse_kind_lines(lines, marker, pattern, kinds, expected, extra=None):
    """Generic line parser: ``pattern`` has groups ``step``, optional ``total``, ``kind`` (mapped to
    a metric by ``kinds``) and ``value``; ``extra`` maps metric -> regex with group ``v`` for optional
    further values on the same line (a present but unparsable one makes the line malformed)."""
    sub, nums, n_ignored = _subset(lines, marker)
    m = pc.extract_regex(sub, pattern)
    matched = _np(pc.is_valid(m)).astype(bool)
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
        present = _np(pc.is_valid(e)).astype(bool)
        ev, eok = _floats(pc.fill_null(_group(e, "v"), ""))
        good &= ~present | eok
        extras[metric] = (present, ev)
    for k, metric in kinds.items():
        sel = good & _np(pc.equal(kind, k)).astype(bool) if kind is not None else good
        series.append(_mk(metric, steps, vals, nums, totals, sel))
    for metric, (present, ev) in extras.items():
        series.append(_mk(metric, steps, ev, nums, totals, good & present))
    return _Parsed(series, nums[~good], expected, n_ignored, len(lines), lines)


def _mk(metric, steps, vals, nums, totals, sel) -> _Series:
    return _Series(metric, steps[sel], vals[sel], nums[sel], None if totals is None else totals[sel])


def _const(value: str, n: int) -> pa.Array:
    return pa.DictionaryArray.from_arrays(np.zeros(n, np.int32), pa.array([value], pa.string())).cast(pa.string())
