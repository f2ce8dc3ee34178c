"""ReadSlices on the DirectRunner: each key gets exactly its rows, each shard is opened once."""

from __future__ import annotations

import pickle

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.util import assert_that

from spike_audit.pipelines.shards import read as shards_mod
from spike_audit.pipelines.beam.read import ReadSlices, _ReadShardFn, split_back
from spike_audit.pipelines.shards.read import read_slices
from spike_audit.pipelines.shards.slices import coalesce

RNG = np.random.default_rng(2)
DOCS = [RNG.integers(0, 1000, int(RNG.integers(1, 6))).tolist() for _ in range(60)]


@pytest.fixture
def root(tmp_path):
    pq.write_table(pa.table({"tokens": pa.array(DOCS, pa.list_(pa.uint32())), "text": [str(i) for i in range(60)]}),
                   tmp_path / "a.parquet", row_group_size=8)
    np.arange(2000, dtype=np.uint16).tofile(tmp_path / "t.bin")
    return tmp_path


ELEMENTS = [
    ("step1", ("a.parquet", 10, 14, "row", 1)),
    ("step1", ("a.parquet", 2, 4, "row", 0)),   # order 0: comes first although it starts later in the list
    ("step2", ("a.parquet", 12, 16, "row")),   # overlaps step1's slice
    ("step2", ("t.bin", 100, 117, "token")),
    ("step2", ("t.bin", 116, 133, "token")),   # shares one token with the previous one
    ("step3", ("t.bin", 1990, 2000, "token")),
    ("step3", ("a.parquet", 59, 60, None)),    # unit None = row
]


def _expected(root):
    """Per (key, shard): tokens and rows in order, read slice by slice without Beam."""
    want: dict = {}
    for key, v in sorted(ELEMENTS, key=lambda e: (e[0], e[1][4] if len(e[1]) > 4 else -1, e[1][1])):
        shard, a, b, unit = v[:4]
        batch = read_slices(str(root), shard, [[a, b]], unit=unit or "row")
        entry = want.setdefault((key, shard), {"tokens": [], "row": []})
        entry["tokens"] += batch.column("tokens").to_pylist()
        entry["row"] += batch.column("row").to_pylist()
    return want


def test_read_slices_transform_direct_runner(root):
    want = _expected(root)

    def check(outputs):
        got = {}
        for key, batch in outputs:
            assert isinstance(batch, pa.RecordBatch)
            shard = set(batch.column("shard").to_pylist())
            assert len(shard) == 1
            got[(key, shard.pop())] = {"tokens": batch.column("tokens").to_pylist(),
                                       "row": batch.column("row").to_pylist()}
        assert got == want, (got, want)

    with beam.Pipeline("DirectRunner") as p:
        out = p | beam.Create(ELEMENTS) | ReadSlices(str(root))
        assert_that(out, check)


def test_each_shard_read_once_with_coalesced_ranges(root, monkeypatch):
    calls = []
    real = shards_mod.read_slices

    def spy(shard_root, shard, slices, **kw):
        calls.append((shard, np.asarray(slices).tolist(), kw.get("unit")))
        return real(shard_root, shard, slices, **kw)

    monkeypatch.setattr("spike_audit.pipelines.beam.read.read_slices", spy)
    fn = pickle.loads(pickle.dumps(_ReadShardFn(str(root), {})))  # picklable, no module state
    items = [(k, *v[1:4], v[4] if len(v) > 4 else None) for k, v in ELEMENTS if v[0] == "t.bin"]
    out = list(fn.process(("t.bin", items)))
    assert calls == [("t.bin", [[100, 133], [1990, 2000]], "token")]
    assert [k for k, _ in out] == ["step2", "step3"]
    assert out[0][1].column("tokens").to_pylist() == [list(range(100, 117)), list(range(116, 133))]


def test_split_back_rows_matches_direct_reads(root):
    slices = np.array([[5, 9], [7, 12], [30, 31], [5, 6]])
    merged = coalesce(slices)
    batch = read_slices(str(root), "a.parquet", merged)
    out = split_back(batch, merged, slices, "row", "a.parquet")
    assert out.column("tokens").to_pylist() == read_slices(str(root), "a.parquet", slices).column("tokens").to_pylist()
