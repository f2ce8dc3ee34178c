"""Data contracts of spike-audit: one versioned pyarrow schema per table the tool reads or writes.

This package is the single source of truth. Readers validate against it (:func:`validate`), writers
build tables from it (:meth:`TableSpec.empty`, :meth:`TableSpec.from_pylist`), and
``docs/schemas.md`` is generated from it (``python -m spike_audit.schemas``).

Every table carries its name and version in the Arrow schema metadata (``spike_audit.table``,
``spike_audit.version``) and every field carries its documentation (``doc``), so a Parquet file
written by the tool explains itself.

May import: pyarrow and the standard library only; nothing else of spike-audit.
"""

from __future__ import annotations

from spike_audit.schemas.core import FieldSpec, SchemaError, TableSpec, validate
from spike_audit.schemas.tables import (
    ALIGNED_SPIKES,
    BASELINE_REFERENCE,
    BASELINE_SHARD_SIGNALS,
    BASELINE_UNIGRAM,
    BATCH_SCORES,
    DUPLICATES,
    LOSS_ROWS,
    LOSS_SERIES,
    ROW_FLAGS,
    ROW_LOSSES,
    SHARD_SCORES,
    SPIKES,
    STEP_MANIFEST,
    TABLES,
    VERDICTS,
)

__all__ = [
    "ALIGNED_SPIKES",
    "BASELINE_REFERENCE",
    "BASELINE_SHARD_SIGNALS",
    "BASELINE_UNIGRAM",
    "BATCH_SCORES",
    "DUPLICATES",
    "LOSS_ROWS",
    "FieldSpec",
    "LOSS_SERIES",
    "ROW_FLAGS",
    "ROW_LOSSES",
    "SHARD_SCORES",
    "SPIKES",
    "STEP_MANIFEST",
    "SchemaError",
    "TABLES",
    "TableSpec",
    "VERDICTS",
    "validate",
]
