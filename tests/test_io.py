import pyarrow as pa
import pytest

from spike_audit.pipelines.io import write_table, write_text
from spike_audit.schemas import STEP_MANIFEST


class Boom(Exception):
    pass


def test_write_table_conforms_sorts_and_leaves_no_temp_files(tmp_path):
    t = pa.table({"step": [2, 1], "shard": ["b", "a"], "row_start": [0, 0], "row_end": [1, 1]})
    p = write_table(t, tmp_path / "m.parquet", STEP_MANIFEST)
    import pyarrow.parquet as pq

    back = pq.read_table(p)
    assert back.column("step").to_pylist() == [1, 2]
    assert back.schema.metadata[b"spike_audit.table"] == b"step_manifest"
    assert [x.name for x in tmp_path.iterdir()] == ["m.parquet"]
    assert write_table(t, tmp_path / "m2.parquet", STEP_MANIFEST).read_bytes() == p.read_bytes()


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    dest = tmp_path / "out.txt"
    write_text("old", dest)
    import pathlib

    def fail(self, *a, **k):
        raise Boom()

    monkeypatch.setattr(pathlib.Path, "write_text", fail)
    with pytest.raises(Boom):
        write_text("new", dest)
    monkeypatch.undo()
    assert dest.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["out.txt"]
