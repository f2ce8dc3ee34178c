"""The reader interface (:class:`ShardReader`) and the row-selection logic shared by the table formats."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.shards.rows import HOW
from spike_audit.pipelines.shards.slices import (UNITS, _batch, _check_bounds, _to_int64_lists, _to_string,
                                                 as_slices, check_rows, expand_rows)


class ShardReader:
    """Opened shard: cheap metadata now, rows on :meth:`read`. Not thread-safe; not kept across calls."""

    fmt = ""
    units: tuple[str, ...] = ("row",)

    def __init__(self, path: str, name: str):
        self.path = path
        self.name = name

    def length(self, unit: str = "row") -> int:
        raise NotImplementedError

    def where(self, row: int) -> str:
        """How an error names one row of this shard."""
        return f"{self.name}: row {row}"

    def _unit_check(self, unit: str) -> None:
        if unit not in UNITS:
            raise UserError(f"{self.name}: unknown unit {unit!r} (expected 'row' or 'token')")
        if unit not in self.units:
            other = (f"a flat token file: its rows need a definition, {HOW}; or address it with unit='token'"
                     if unit == "row" else "row-oriented shard: address it with unit='row'")
            raise UserError(f"{self.name}: unit {unit!r} does not apply to this {self.fmt} shard ({other})")

    def read(self, slices, unit: str = "row") -> pa.RecordBatch:
        self._unit_check(unit)
        slices = as_slices(slices)
        n = self._limit(unit, slices)
        _check_bounds(self.name, slices, n, "rows" if unit == "row" else "tokens")
        if unit == "token":
            return self._read_tokens(slices)
        rows = expand_rows(slices)
        tokens, text = self._read_rows(rows)
        tokens, text = check_rows(tokens, text, lambda i: self.where(int(rows[i])),
                                  getattr(self, "tokens_col", "tokens"), getattr(self, "text_col", "text"))
        return _batch(tokens, text, self.name, rows, rows + 1, "row")

    def _limit(self, unit: str, slices: np.ndarray) -> int:
        """The length the bounds of ``slices`` are checked against (a reader that counts its rows by a scan
        may count only as far as the slices reach)."""
        return self.length(unit)

    def _read_rows(self, rows: np.ndarray) -> tuple[pa.Array | None, pa.Array | None]:
        raise NotImplementedError

    def _read_tokens(self, slices: np.ndarray) -> pa.RecordBatch:
        raise NotImplementedError


def _is_int_list(t: pa.DataType) -> bool:
    return ((pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))
            and pa.types.is_integer(t.value_type))


class _TableRowsMixin:
    tokens_col: str
    text_col: str
    name: str

    def _columns(self, names) -> list[str]:
        for col, flag, default in ((self.tokens_col, "--tokens-column", "tokens"), (self.text_col, "--text-column", "text")):
            if col != default and col not in names:  # a column asked for by name is never silently absent
                raise UserError(f"{self.name}: has no column {col!r} ({flag}); columns: {', '.join(names)}")
        cols = [c for c in (self.tokens_col, self.text_col) if c in names]
        if not cols:
            raise UserError(f"{self.name}: has neither a {self.tokens_col!r} nor a {self.text_col!r} column "
                            f"(columns: {', '.join(names)})")
        return cols

    def _schema(self) -> pa.Schema | None:
        return None

    def token_id_columns(self) -> list[str]:
        """Columns of the shard that hold lists of integers, when the token column read is not one of them:
        what a text-only reading of a shard whose token ids live under another name should point at."""
        schema = self._schema()
        if schema is None or self.tokens_col in schema.names:
            return []
        return [f.name for f in schema if _is_int_list(f.type)]

    def _split(self, table: pa.Table, rows=None) -> tuple[pa.Array | None, pa.Array | None]:
        tokens = text = None
        if self.tokens_col in table.column_names:
            where = (lambda i: self.where(int(rows[i]))) if rows is not None else None
            tokens = _to_int64_lists(table.column(self.tokens_col), self.name, self.tokens_col, where)
        if self.text_col in table.column_names:
            text = _to_string(table.column(self.text_col), self.name, self.text_col)
        return tokens, text
