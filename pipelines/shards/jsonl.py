"""JSONL shards (``.jsonl``/``.ndjson``/``.json``, optionally ``.gz``/``.zst``): streamed once per call, and only
the requested lines are parsed (a line is a row, 0-based)."""

from __future__ import annotations

import io
import json
import numpy as np
import pyarrow as pa

from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.shards.base import ShardReader
from spike_audit.pipelines.shards.paths import _open
from spike_audit.pipelines.shards.slices import _to_int64_lists, _to_string


_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


_COMPRESSIONS = ("", ".gz", ".zst", ".zstd")


_JSONL_CHUNK = 16 << 20


MAX_LINE_BYTES = 256 << 20  # one JSON row longer than this is not a training row


def _expected_types(table: pa.Table, tokens_col: str, text_col: str) -> bool:
    """Arrow inferred list<int> tokens and string text (else the line-by-line path names the offending row)."""
    if tokens_col in table.column_names:
        t = table.schema.field(tokens_col).type
        if not (pa.types.is_null(t) or (pa.types.is_list(t) and (pa.types.is_integer(t.value_type)
                                                                 or pa.types.is_null(t.value_type)))):
            return False
    if text_col in table.column_names:
        t = table.schema.field(text_col).type
        if not (pa.types.is_null(t) or pa.types.is_string(t)):
            return False
        if pa.types.is_string(t):
            try:  # Arrow's JSON reader does not check UTF-8: invalid bytes are invalid JSON, named by row
                table.column(text_col).combine_chunks().validate(full=True)
            except pa.ArrowInvalid:
                return False
    return True


class JsonlReader(ShardReader):
    """JSONL: row N is line N+1. Streamed once per read; blank requested lines are an error."""

    fmt = "jsonl"

    def __init__(self, path, name, tokens_col="tokens", text_col="text"):
        super().__init__(path, name)
        self.tokens_col, self.text_col = tokens_col, text_col
        self._n = None

    def where(self, row: int) -> str:
        return f"{self.name}:{int(row) + 1}"  # row N is line N+1

    def _stream(self):
        """The decompressed bytes (gzip / zstd detected from the content; every member and frame; a truncated or
        corrupt stream is a one-line error)."""
        from spike_audit.pipelines.files import decompressed

        raw = _open(self.path)
        try:
            return decompressed(raw, self.name)
        except BaseException:
            raw.close()
            raise

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
                if line_no == 0 and not carry and data.startswith(b"\xef\xbb\xbf"):
                    data = data[3:]  # a UTF-8 BOM is not part of row 0
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
                if len(carry) > MAX_LINE_BYTES:
                    raise UserError(f"{self.name}:{line_no + 1}: a line longer than {MAX_LINE_BYTES >> 20} MiB; "
                                    f"expected one JSON object per line")
        if carry:
            if wanted is not None and len(wanted) and np.searchsorted(wanted, line_no) < len(wanted) and (
                    wanted[np.searchsorted(wanted, line_no)] == line_no):
                found.append(carry)
            line_no += 1
        self._n = line_no
        return found

    def token_id_columns(self) -> list[str]:
        """Fields of the first line holding a non-empty list of integers, when that line has no ``tokens_col``:
        where a text-only reading of this file should look for its token ids (a hint: one line is read)."""
        head = b""
        with self._stream() as f:
            while b"\n" not in head and len(head) < (4 << 20):
                more = f.read(1 << 16)
                if not more:
                    break
                head += more
        try:
            obj = json.loads(head.split(b"\n", 1)[0].removeprefix(b"\xef\xbb\xbf"))
        except (ValueError, RecursionError):
            return []
        if not isinstance(obj, dict) or self.tokens_col in obj:
            return []
        return [k for k, v in obj.items() if isinstance(v, list) and v
                and all(type(x) is int for x in v)]  # one line's values; bool is not a token id

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
            tokens = _to_int64_lists(table.column(self.tokens_col), self.name, self.tokens_col,
                                     lambda i: self.where(int(uniq[i]))).take(inverse)
        if self.text_col in table.column_names:
            text = _to_string(table.column(self.text_col), self.name, self.text_col).take(inverse)
        if tokens is None and text is None:
            raise UserError(f"{self.name}:{int(uniq[0]) + 1}: expected a JSON object with a {self.tokens_col!r} "
                            f"or {self.text_col!r} field")
        return tokens, text

    def _parse(self, lines: list[bytes], line_ids: np.ndarray) -> pa.Table:
        import pyarrow.json as pj

        from spike_audit.pipelines.files import first_non_object_line

        want = [self.tokens_col, self.text_col]
        blob = b"\n".join(lines) + b"\n"
        try:  # Arrow is handed only lines that open an object: a line `null` crashes its reader (files.py)
            if first_non_object_line(io.BytesIO(blob)) is None:
                table = pj.read_json(io.BytesIO(blob), read_options=pj.ReadOptions(block_size=max(1 << 20, len(blob) + 1)))
                if table.num_rows == len(lines) and _expected_types(table, self.tokens_col, self.text_col):
                    out = pa.table({c: table.column(c).combine_chunks() for c in want if c in table.column_names})
                    out.validate(full=True)  # Arrow's JSON reader can build invalid arrays ([null, null] lists)
                    return out
        except (pa.ArrowException, UnicodeDecodeError):  # Arrow's own inconsistencies on odd input ([null, 0] lists);
            pass  # a key that is not UTF-8 (Arrow reads it, its name then fails to decode): the fallback names the line
        # Fallback (mixed types across lines, or an error to locate): parse line by line.
        recs = []
        for ln, no in zip(lines, line_ids):
            try:
                obj = json.loads(ln)
            except (ValueError, RecursionError) as err:  # invalid JSON, invalid UTF-8, nesting too deep
                msg = getattr(err, "msg", None) or type(err).__name__
                raise UserError(f"{self.name}:{int(no) + 1}: expected a JSON object, got invalid JSON ({msg})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{self.name}:{int(no) + 1}: expected a JSON object, got {type(obj).__name__}")
            recs.append({k: obj.get(k) for k in want})
        cols = {}
        if any(r[self.tokens_col] is not None for r in recs):
            cols[self.tokens_col] = self._column(recs, line_ids, self.tokens_col, pa.list_(pa.int64()),
                                                 "a list of integer token ids")
        if any(r[self.text_col] is not None for r in recs):
            cols[self.text_col] = self._column(recs, line_ids, self.text_col, pa.string(), "a string")
        return pa.table(cols) if cols else pa.table({"_": pa.nulls(len(recs))})

    def _column(self, recs: list[dict], line_ids: np.ndarray, key: str, typ: pa.DataType, what: str) -> pa.Array:
        ints = pa.types.is_list(typ) and pa.types.is_integer(typ.value_type)
        vals = [r[key] for r in recs]
        try:
            out = pa.array(vals, typ)
            # Arrow converts a float to an integer type by truncation (455.5 -> 455): where Arrow's own inference
            # (in C, no Python loop per token) sees a float, the rows are checked one by one below
            if not ints or not _has_floats(pa.array(vals)):
                return out
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError, ValueError):
            pass
        for r, no in zip(recs, line_ids):  # error path only: find the row
            try:
                pa.array([r[key]], typ)
                if ints and _has_floats(pa.array([r[key]])):
                    raise ValueError("a float token id")
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError, ValueError):
                got = json.dumps(r[key])[:80]
                if isinstance(r[key], str) and pa.types.is_string(typ):  # a string Arrow refused: a lone surrogate (JSON "\ud800") is no text
                    raise UserError(f"{self.name}:{int(no) + 1}: {key!r} is not valid Unicode text (a lone surrogate "
                                    f"such as \\ud800 escaped in the JSON), got {got}") from None
                raise UserError(f"{self.name}:{int(no) + 1}: expected {key!r} to be {what}, got {got}") from None
        raise UserError(f"{self.name}: column {key!r}: expected {what}")


def _has_floats(arr: pa.Array) -> bool:
    """True where an inferred list column holds floating-point values (a JSON ``455.5`` or ``455.0``)."""
    t = arr.type
    while pa.types.is_list(t) or pa.types.is_large_list(t):
        t = t.value_type
    return pa.types.is_floating(t)
