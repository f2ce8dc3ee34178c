"""Machinery for versioned, documented Arrow table specs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc

META_TABLE = b"spike_audit.table"
META_VERSION = b"spike_audit.version"


class SchemaError(ValueError):
    """A table does not match its contract. The message is one line meant for a user."""


@dataclass(frozen=True)
class FieldSpec:
    name: str
    type: pa.DataType
    doc: str
    nullable: bool = False

    def to_arrow(self) -> pa.Field:
        return pa.field(self.name, self.type, nullable=self.nullable, metadata={b"doc": self.doc.encode()})


@dataclass(frozen=True)
class TableSpec:
    """A named, versioned table contract."""

    name: str
    version: int
    doc: str
    fields: tuple[FieldSpec, ...]
    sort_keys: tuple[str, ...] = ()
    optional: frozenset[str] = field(default_factory=frozenset)

    @property
    def schema(self) -> pa.Schema:
        return pa.schema(
            [f.to_arrow() for f in self.fields],
            metadata={META_TABLE: self.name.encode(), META_VERSION: str(self.version).encode()},
        )

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    def empty(self) -> pa.Table:
        return self.schema.empty_table()

    def from_pylist(self, rows: Sequence[Mapping], sort: bool = True) -> pa.Table:
        """Build a table from row dicts; missing optional columns become nulls."""
        cols = {}
        for f in self.fields:
            cols[f.name] = pa.array([r.get(f.name) for r in rows], type=f.type)
        table = pa.Table.from_pydict(cols, schema=self.schema)
        return self.sorted(table) if sort else table

    def from_arrays(self, columns: Mapping[str, object], sort: bool = True) -> pa.Table:
        """Build a table from column arrays (numpy or Arrow); absent nullable columns are nulls."""
        n = None
        for v in columns.values():
            n = len(v)
            break
        arrays = []
        for f in self.fields:
            if f.name in columns:
                arrays.append(pa.array(columns[f.name], type=f.type))
            elif f.nullable:
                arrays.append(pa.nulls(n or 0, type=f.type))
            else:
                raise SchemaError(f"table {self.name}: column {f.name!r} is required")
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        return self.sorted(table) if sort else table

    def sorted(self, table: pa.Table) -> pa.Table:
        """Deterministic row order (the spec's sort keys), so identical inputs give identical files."""
        if not self.sort_keys or table.num_rows == 0:
            return table
        return table.sort_by([(k, "ascending") for k in self.sort_keys])

    def conform(self, table: pa.Table, source: str = "<table>") -> pa.Table:
        """Validate, then cast to the exact contract schema (column order, types, metadata)."""
        validate(table, self, source)
        arrays = []
        for f in self.fields:
            if f.name in table.column_names:
                col = table.column(f.name)
                if col.type != f.type:
                    col = _cast(col, f, self, source)
                arrays.append(col)
            else:
                arrays.append(pa.nulls(table.num_rows, type=f.type))
        return pa.Table.from_arrays(arrays, schema=self.schema)

    def markdown(self) -> str:
        lines = [f"## `{self.name}` (version {self.version})", "", self.doc, ""]
        lines += ["| column | type | nullable | meaning |", "|---|---|---|---|"]
        for f in self.fields:
            lines.append(f"| `{f.name}` | `{f.type}` | {'yes' if f.nullable else 'no'} | {f.doc} |")
        if self.sort_keys:
            lines += ["", f"Rows are written sorted by {', '.join(f'`{k}`' for k in self.sort_keys)}."]
        return "\n".join(lines) + "\n"


def _cast(col: pa.ChunkedArray, f: FieldSpec, spec: TableSpec, source: str) -> pa.ChunkedArray:
    """``col`` cast to ``f``'s type; a value that does not fit (a uint64 step beyond int64, a rank beyond int32)
    is a one-line error naming the first such row, never a wrapped value or a traceback."""
    try:
        return col.cast(f.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        first = None
        if pa.types.is_integer(f.type) and pa.types.is_integer(col.type):
            bits = f.type.bit_width
            lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if pa.types.is_signed_integer(f.type) else (0, 2 ** bits - 1)
            wide = pa.uint64() if pa.types.is_unsigned_integer(col.type) else pa.int64()
            out = pc.greater(col, pa.scalar(min(hi, 2 ** 64 - 1 if wide == pa.uint64() else 2 ** 63 - 1), wide))
            if pa.types.is_signed_integer(col.type):
                out = pc.or_(out, pc.less(col, pa.scalar(max(lo, -(2 ** 63)), pa.int64())))
            hits = pc.indices_nonzero(pc.fill_null(out, False))
            first = hits[0].as_py() if len(hits) else None
        if first is not None:
            raise SchemaError(f"{source}: row {first}: column {f.name!r} value {col[first].as_py()!r} does not fit "
                              f"{f.type} ({spec.name} v{spec.version})") from None
        raise SchemaError(f"{source}: column {f.name!r} cannot be read as {f.type} "
                          f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None


def _castable(actual: pa.DataType, expected: pa.DataType) -> bool:
    if actual == expected or pa.types.is_null(actual):
        return True
    checks = [
        (pa.types.is_integer, pa.types.is_integer),
        (pa.types.is_floating, pa.types.is_floating),
        (pa.types.is_integer, pa.types.is_floating),
        (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t),
         lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)),
    ]
    for is_actual, is_expected in checks:
        if is_actual(actual) and is_expected(expected):
            return True
    if (pa.types.is_list(actual) or pa.types.is_large_list(actual)) and (
        pa.types.is_list(expected) or pa.types.is_large_list(expected)
    ):
        return _castable(actual.value_type, expected.value_type)
    return False


def validate(table: pa.Table | pa.Schema, spec: TableSpec, source: str = "<table>") -> None:
    """Raise :class:`SchemaError` (one line, naming ``source``) if ``table`` breaks ``spec``.

    Columns may come in any order and in compatible types (any integer width for an integer field,
    etc.); required columns must be present and, for a table, hold no nulls.
    """
    schema = table if isinstance(table, pa.Schema) else table.schema
    present = set(schema.names)
    for f in spec.fields:
        if f.name not in present:
            if f.nullable:
                continue
            raise SchemaError(
                f"{source}: not a valid {spec.name} table: missing column {f.name!r} "
                f"(expected columns: {', '.join(spec.names)})"
            )
        actual = schema.field(f.name).type
        if not _castable(actual, f.type):
            raise SchemaError(
                f"{source}: column {f.name!r} has type {actual}, expected {f.type} ({spec.name} v{spec.version})"
            )
        if isinstance(table, pa.Table) and not f.nullable and table.column(f.name).null_count:
            col = table.column(f.name)
            first = next(i for i, v in enumerate(col.is_null().to_pylist()) if v)
            raise SchemaError(f"{source}: row {first}: column {f.name!r} is null, expected a value")
    kind = (schema.metadata or {}).get(META_TABLE)
    if kind is not None and kind != spec.name.encode():  # another of our tables: its version is not this one's
        raise SchemaError(f"{source}: is a spike-audit {kind.decode('utf-8', 'replace')[:60]!r} table, expected a "
                          f"{spec.name} table")
    version = (schema.metadata or {}).get(META_VERSION)
    if version is not None and not version.strip().isdigit():
        raise SchemaError(f"{source}: table version {version.decode('utf-8', 'replace')!r} in its metadata, expected "
                          f"an integer ({spec.name} v{spec.version}; a damaged file?)")
    if version is not None and int(version) > spec.version:
        raise SchemaError(
            f"{source}: written by a newer spike-audit ({spec.name} v{int(version)}); "
            f"this version reads up to v{spec.version}"
        )


def markdown(specs: Iterable[TableSpec]) -> str:
    parts = [
        "# spike-audit table schemas",
        "",
        "Generated from `schemas/` by `python -m spike_audit.schemas > docs/schemas.md`; do not edit by hand.",
        "",
    ]
    for spec in specs:
        parts.append(spec.markdown())
    return "\n".join(parts)
