import pyarrow as pa
import pytest

import spike_audit.schemas as schemas
from spike_audit.schemas import LOSS_SERIES, STEP_MANIFEST, SchemaError, TABLES, validate


def test_every_table_is_versioned_and_documented():
    names = [t.name for t in TABLES]
    assert len(names) == len(set(names))
    for spec in TABLES:
        md = spec.schema.metadata
        assert md[b"spike_audit.table"] == spec.name.encode()
        assert int(md[b"spike_audit.version"]) >= 1
        for f in spec.schema:
            assert f.metadata[b"doc"].strip(), f"{spec.name}.{f.name} has no doc"


def test_docs_are_generated_from_the_schemas():
    from pathlib import Path

    from spike_audit.schemas.core import markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "schemas.md"
    assert doc.read_text() == markdown(TABLES), "docs/schemas.md is stale: run `python -m spike_audit.schemas > docs/schemas.md`"


def test_validate_names_source_and_missing_column():
    t = pa.table({"run": ["r"], "metric": ["loss"], "step": [1]})
    with pytest.raises(SchemaError, match=r"log\.parquet: .*missing column 'value'"):
        validate(t, LOSS_SERIES, "log.parquet")


def test_validate_rejects_null_in_required_column_with_row_number():
    t = pa.table({"step": [1, None], "shard": ["a", "b"], "row_start": [0, 0], "row_end": [1, 1]})
    with pytest.raises(SchemaError, match=r"m\.parquet: row 1: column 'step' is null"):
        validate(t, STEP_MANIFEST, "m.parquet")


def test_conform_casts_compatible_types_and_fills_optional_columns():
    t = pa.table({"step": pa.array([2, 1], pa.int32()), "shard": ["a", "b"], "row_start": [0, 5],
                  "row_end": [4, 9]})
    out = STEP_MANIFEST.sorted(STEP_MANIFEST.conform(t))
    assert out.schema == STEP_MANIFEST.schema
    assert out.column("step").to_pylist() == [1, 2]
    assert out.column("unit").null_count == 2


def test_wrong_type_is_rejected():
    t = pa.table({"step": ["x"], "shard": ["a"], "row_start": [0], "row_end": [1]})
    with pytest.raises(SchemaError, match="column 'step' has type string"):
        validate(t, STEP_MANIFEST, "m")


def test_newer_version_is_refused():
    t = STEP_MANIFEST.empty().replace_schema_metadata({b"spike_audit.version": b"99"})
    with pytest.raises(SchemaError, match="newer spike-audit"):
        validate(t, STEP_MANIFEST, "m")


def test_package_exports():
    assert schemas.SPIKES.sort_keys
