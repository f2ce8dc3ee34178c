"""Step manifests: contract validation and the checks against the shards, with one-line errors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.manifest import (check_ranges, load_manifest_table, manifest_from_arrays, read_manifest,
                                            read_meta, with_meta, write_manifest)
from spike_audit.schemas import STEP_MANIFEST, SchemaError


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "shards"
    (r / "a").mkdir(parents=True)
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(1000)]}), r / "a" / "b.parquet", row_group_size=100)
    np.arange(5000, dtype=np.uint16).tofile(r / "tok.bin")
    return r


def _write_raw(path, rows):
    """Write a manifest without sorting, so row numbers in errors are the test's own."""
    pq.write_table(STEP_MANIFEST.from_pylist(rows, sort=False), path)
    return path


def test_round_trip_and_unit_default(tmp_path, root):
    t = manifest_from_arrays([2, 1, 1], ["a/b.parquet", "a/b.parquet", "tok.bin"], [10, 0, 100], [20, 10, 200],
                             ["row", "row", "token"], rank=[0, 1, 0])
    write_manifest(t, tmp_path / "m.parquet")
    got = read_manifest(tmp_path / "m.parquet", str(root))
    assert got.column("step").to_pylist() == [1, 1, 2]  # written sorted by (step, rank, ...)
    assert got.column("rank").to_pylist() == [0, 1, 0]
    assert got.column("micro_batch").null_count == 3
    rows = [{"step": 1, "shard": "a/b.parquet", "row_start": 0, "row_end": 5}]  # unit null
    got = read_manifest(_write_raw(tmp_path / "n.parquet", rows), str(root))
    assert got.column("unit").to_pylist() == ["row"]


def test_past_end_names_manifest_row_and_shard(tmp_path, root):
    rows = [{"step": s, "shard": "a/b.parquet", "row_start": 10 * s, "row_end": 10 * s + 10} for s in range(17)]
    rows.append({"step": 17, "shard": "a/b.parquet", "row_start": 1000, "row_end": 1024})
    m = _write_raw(tmp_path / "manifest.parquet", rows)
    with pytest.raises(UserError) as err:
        read_manifest(m, str(root))
    assert str(err.value) == f"{m}: row 17: slice [1000, 1024) of shard 'a/b.parquet' is past its end (1000 rows)"
    rows[-1] = {"step": 17, "shard": "tok.bin", "row_start": 4990, "row_end": 5001, "unit": "token"}
    m = _write_raw(tmp_path / "manifest.parquet", rows)
    with pytest.raises(UserError, match=r"^\S*/manifest.parquet: row 17: slice \[4990, 5001\) of shard 'tok.bin' is past "
                                        r"its end \(5000 tokens\)$"):
        read_manifest(m, str(root))


def test_missing_shard_names_manifest_row_and_shard(tmp_path, root):
    rows = [{"step": 1, "shard": "a/b.parquet", "row_start": 0, "row_end": 1},
            {"step": 1, "shard": "a/missing.parquet", "row_start": 0, "row_end": 1}]
    m = _write_raw(tmp_path / "m.parquet", rows)
    with pytest.raises(UserError, match=r"^\S*/m.parquet: row 1: shard 'a/missing.parquet' not found under "):
        read_manifest(m, str(root))
    assert read_manifest(m, str(root), check_shards=False).num_rows == 2


def test_empty_slice_and_bad_unit(tmp_path, root):
    m = _write_raw(tmp_path / "m.parquet", [{"step": 1, "shard": "a/b.parquet", "row_start": 5, "row_end": 5}])
    with pytest.raises(UserError, match=r"m.parquet: row 0: slice \[5, 5\) of shard 'a/b.parquet' is empty"):
        read_manifest(m, str(root))
    m = _write_raw(tmp_path / "m.parquet", [{"step": 1, "shard": "a/b.parquet", "row_start": 0, "row_end": 5,
                                             "unit": "bytes"}])
    with pytest.raises(UserError, match=r"m.parquet: row 0: unit 'bytes', expected 'row' or 'token'"):
        read_manifest(m, str(root))


def test_overlap_within_step_rejected_across_steps_allowed(tmp_path, root):
    base = {"shard": "a/b.parquet"}
    ok = [dict(base, step=1, row_start=0, row_end=10), dict(base, step=2, row_start=5, row_end=15),
          dict(base, step=1, row_start=10, row_end=20)]
    assert read_manifest(_write_raw(tmp_path / "ok.parquet", ok), str(root)).num_rows == 3
    bad = ok + [dict(base, step=1, row_start=2, row_end=3)]  # contained in row 0
    with pytest.raises(UserError, match=r"bad.parquet: row 3: slice \[2, 3\) of shard 'a/b.parquet' overlaps another "
                                        r"slice of the same shard in step 1 \(row 0: \[0, 10\)\)"):
        read_manifest(_write_raw(tmp_path / "bad.parquet", bad), str(root))
    # A long slice followed by short ones: overlap with a non-adjacent earlier slice is found.
    bad = [dict(base, step=3, row_start=0, row_end=100), dict(base, step=3, row_start=10, row_end=11),
           dict(base, step=3, row_start=50, row_end=60)]
    with pytest.raises(UserError, match="row 1: .* overlaps"):
        read_manifest(_write_raw(tmp_path / "bad2.parquet", bad), str(root))


def test_token_slices_may_share_one_boundary_token(tmp_path, root):
    tok = {"shard": "tok.bin", "unit": "token", "step": 1}
    ok = [dict(tok, row_start=0, row_end=11), dict(tok, row_start=10, row_end=21)]
    assert read_manifest(_write_raw(tmp_path / "ok.parquet", ok), str(root)).num_rows == 2
    bad = [dict(tok, row_start=0, row_end=11), dict(tok, row_start=9, row_end=21)]
    with pytest.raises(UserError, match="row 1: slice \\[9, 21\\) of shard 'tok.bin' overlaps"):
        read_manifest(_write_raw(tmp_path / "bad.parquet", bad), str(root))


def test_contract_violations(tmp_path, root):
    pq.write_table(pa.table({"step": [1], "shard": ["a/b.parquet"], "row_start": [0]}), tmp_path / "m.parquet")
    with pytest.raises(SchemaError, match="missing column 'row_end'"):
        read_manifest(tmp_path / "m.parquet", str(root))
    with pytest.raises(UserError, match="nope.parquet: manifest not found"):
        read_manifest(tmp_path / "nope.parquet", str(root))


def test_batch_positions_are_optional_and_never_negative(tmp_path):
    """A version-1 manifest (no batch_pos) reads with null positions; a negative one is an error."""
    import pyarrow.parquet as pq

    v1 = pa.table({"step": [1, 1], "shard": ["a.parquet", "a.parquet"], "row_start": [0, 4], "row_end": [4, 8]})
    pq.write_table(v1, tmp_path / "v1.parquet")
    t = load_manifest_table(tmp_path / "v1.parquet")
    assert t.column("batch_pos").null_count == 2
    bad = manifest_from_arrays([1], "a.parquet", [0], [4], batch_pos=[-1])
    with pytest.raises(UserError, match="row 0: batch_pos -1 is negative"):
        check_ranges(bad, "m.parquet")
def test_epochs_separate_repeats_from_overlaps(tmp_path, root):
    # the same tokens twice in one step: two passes over the data (epochs) are fine, one pass twice is not
    t = manifest_from_arrays([0, 0], "tok.bin", [0, 0], [8, 8], "token", epoch=[0, 1])
    write_manifest(t, tmp_path / "m.parquet")
    assert read_manifest(tmp_path / "m.parquet", str(root)).num_rows == 2
    t = manifest_from_arrays([0, 0], "tok.bin", [0, 0], [8, 8], "token", epoch=[1, 1])
    write_manifest(t, tmp_path / "m.parquet")
    with pytest.raises(UserError, match="overlaps another slice"):
        read_manifest(tmp_path / "m.parquet", str(root))


def test_run_description_round_trips_and_stamps_the_convention(tmp_path):
    t = with_meta(manifest_from_arrays([0, 1], "tok.bin", [0, 8], [8, 16], "token"), trainer="megatron",
                  token_dtype="int32", seq_len=8, samples_per_step=1)
    write_manifest(t, tmp_path / "m.parquet", first_step=0)
    meta = read_meta(tmp_path / "m.parquet")
    assert meta["step_convention"] == "batch_index" and meta["trainer"] == "megatron"
    assert meta["token_dtype"] == "int32" and meta["seq_len"] == 8 and meta["first_step"] == 0
    assert meta["tokens_per_step"] is None  # unknown facts are null, not guessed
    # a manifest written by another tool has no description
    pq.write_table(pa.table({"step": [0], "shard": ["tok.bin"], "row_start": [0], "row_end": [8]}),
                   tmp_path / "bare.parquet")
    assert read_meta(tmp_path / "bare.parquet") == {}
    with pytest.raises(ValueError, match="unknown manifest metadata"):
        with_meta(t, token_type="int32")


def test_a_shard_name_that_is_not_utf8_is_a_one_line_error(tmp_path):
    """Found by the fuzz test: Parquet stores strings unchecked, so a damaged manifest can name a shard with bytes
    that are not UTF-8; refused naming the row instead of a UnicodeDecodeError later."""
    import pyarrow.parquet as pq

    from spike_audit.pipelines.errors import UserError
    from spike_audit.pipelines.manifest import load_manifest_table

    p = tmp_path / "m.parquet"
    pq.write_table(pa.table({"step": [0, 1], "shard": ["a.parquet", "bXXXX.parquet"], "row_start": [0, 0],
                             "row_end": [1, 1]}), p, compression="none")
    data = p.read_bytes()
    p.write_bytes(data.replace(b"bXXXX", b"b\xff\xfe\x80X"))
    with pytest.raises(UserError, match=r"m\.parquet: row 1: shard is not valid UTF-8"):
        load_manifest_table(p)
