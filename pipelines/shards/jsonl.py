"""JSONL shards (``.jsonl``/``.ndjson``/``.json``, optionally ``.gz``/``.zst``): streamed once per call, and only
the requested lines are parsed (a line is a row, 0-based)."""

from __future__ import annotations

import gzip
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
