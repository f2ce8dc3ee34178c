"""The single runner-agnostic sink, and the driver's assembly of its parts into tables.

Why one sink: on Beam's DaskRunner only one leaf of a pipeline is materialised (a pipeline with two
or three independent sinks writes just one of them, measured here on Beam 2.77). Every pipeline in
this package therefore ends in exactly one sink: all output records are tagged with their table
name, flattened, grouped into a bounded number of parts per table, and written as part files of data
(:mod:`spike_audit.pipelines.records`: Parquet, never pickles) into a staging directory through Beam's FileSystems (so it may be ``gs://`` or ``s3://``). The driver
then assembles each table from its parts, conforms it to its schema, sorts it, and publishes it
atomically (:func:`collect_tables`). Output tables are small by construction (per step, per shard,
per flagged row); nothing data-sized is held on the driver."""

from __future__ import annotations

import hashlib
from typing import Iterable
import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from spike_audit.pipelines import records as rec_io
from spike_audit.schemas import TableSpec


def part_of(key: str, parts: int) -> int:
    """Stable partition of a string key (not Python's salted hash)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") % parts


def part_path(root: str, table: str, part: int) -> str:
    return FileSystems.join(root, table, f"part-{part:05d}{rec_io.SUFFIX}")


class _WritePart(beam.DoFn):
    def __init__(self, staging: str, roots: dict[str, str]):
        self.staging = staging
        self.roots = roots

    def process(self, element):
        (table, part), records = element
        records = list(records)
        if not records:
            return
        path = part_path(self.roots.get(table, self.staging), table, part)
        # Records are plain data (dicts, lists, numbers, numpy arrays): stored as data with exact types, and
        # the driver conforms them to the table's schema when it assembles the table.
        with FileSystems.create(path) as f:
            f.write(rec_io.to_bytes(records, table))
        yield table, part, len(records)


class WriteTables(beam.PTransform):
    """The one sink: ``(table_name, record_dict)`` elements -> part files under ``staging`` (or, for a table
    named in ``roots``, under that root: state parts go straight to the state directory's staging)."""

    def __init__(self, staging: str, parts: dict[str, int] | None = None, roots: dict[str, str] | None = None):
        super().__init__()
        self.staging = staging
        self.parts = parts or {}
        self.roots = roots or {}

    def expand(self, records):
        parts = self.parts

        def keyed(kv):
            table, record = kv
            n = parts.get(table, 1)
            key = repr(sorted(record.items()))[:256] if n > 1 else ""
            return (table, part_of(key, n) if n > 1 else 0), record

        return (
            records
            | "KeyByPart" >> beam.Map(keyed)
            | "GroupParts" >> beam.GroupByKey()
            | "WriteParts" >> beam.ParDo(_WritePart(self.staging, self.roots))
        )


def collect_tables(staging: str, specs: Iterable[TableSpec]) -> dict[str, pa.Table]:
    """Assemble each table from its part files (empty table if it has none), conformed and sorted."""
    out = {}
    for spec in specs:
        pattern = FileSystems.join(staging, spec.name, f"part-*{rec_io.SUFFIX}")
        matches = sorted(m.path for r in FileSystems.match([pattern]) for m in r.metadata_list)
        rows: list[dict] = []
        for path in matches:
            with FileSystems.open(path) as f:
                rows.extend(rec_io.from_bytes(f.read(), path, spec.name))
        out[spec.name] = spec.from_pylist(rows) if rows else spec.empty()
    return out
