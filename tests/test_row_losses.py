"""Per-row losses in (Parquet, JSONL, .npy), checked against the manifest, joined to batch rows;
the replay pack written from the same rows."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.manifest import manifest_from_arrays
from spike_audit.pipelines.run.replay_pack import read_step_units, write_replay_pack
from spike_audit.pipelines.run.row_losses import BatchIndex, flag_units, join_losses, losses_table, read_row_losses


def _with_positions(man: pa.Table, batch_pos, seq_piece=None) -> pa.Table:
    man = man.set_column(man.schema.get_field_index("batch_pos"), "batch_pos", pa.array(batch_pos, pa.int64()))
    if seq_piece is not None:
        man = man.set_column(man.schema.get_field_index("seq_piece"), "seq_piece", pa.array(seq_piece, pa.int32()))
    return man


@pytest.fixture
def rowman():
    """Steps 1-2, 4 rows each, over two Parquet shards; positions recorded."""
    man = manifest_from_arrays(step=[1, 1, 2], shard=["a.parquet", "b.parquet", "a.parquet"],
                               row_start=[0, 5, 10], row_end=[2, 7, 14])
    return _with_positions(man, [0, 2, 0])


def _write_jsonl(path, recs):
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return path


def test_batch_index_orders_rows_by_position_and_joins_every_format(rowman, tmp_path):
    idx = BatchIndex.from_manifest(rowman)
    assert idx.step.tolist() == [1, 1, 1, 1, 2, 2, 2, 2]
    assert idx.position.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert idx.batch_size() == {1: 4, 2: 4}
    # the same losses given three ways
    want = np.array([1.0, 2.0, 3.0, np.nan, 5.0, 6.0, 7.0, 8.0])
    npy = tmp_path / "l.npy"
    np.save(npy, want.reshape(2, 4))
    pqf = tmp_path / "l.parquet"
    pq.write_table(pa.table({"step": [1, 1, 1, 2, 2, 2, 2], "shard": ["a.parquet", "a.parquet", "b.parquet"] +
                             ["a.parquet"] * 4, "row": [0, 1, 5, 10, 11, 12, 13],
                             "loss": [1.0, 2.0, 3.0, 5.0, 6.0, 7.0, 8.0]}), pqf)
    jl = _write_jsonl(tmp_path / "l.jsonl", [{"step": 1, "position": p, "loss": v} for p, v in
                                             enumerate([1.0, 2.0, 3.0, float("nan")])] +
                      [{"step": 2, "position": p, "loss": 5.0 + p} for p in range(4)])
    for f in (npy, pqf, jl):
        j = join_losses(idx, read_row_losses(str(f), steps={1, 2}))
        np.testing.assert_array_equal(j.loss, want)
    assert join_losses(idx, read_row_losses(str(npy))).n_nonfinite == 1
    assert join_losses(idx, read_row_losses(str(pqf))).missing_rows == {1: 1}  # b.parquet row 6: no loss


def test_only_the_steps_asked_for_are_kept(rowman, tmp_path):
    f = tmp_path / "l.npy"
    np.save(f, np.arange(40, dtype=float).reshape(10, 4))
    lf = read_row_losses(str(f), steps={2, 7}, first_step=1)
    assert lf.steps == {2, 7}
    assert lf.table.num_rows == 8


@pytest.mark.parametrize("recs,msg", [
    ([{"step": 1, "position": 4, "loss": 1.0}], "l.jsonl:1: position 4 is past the batch of step 1 (4 sequences"),
    ([{"step": 1, "position": 0, "loss": 1.0}, {"step": 9, "position": 0, "loss": 1.0}],
     "l.jsonl:2: step 9 has no rows in the manifest"),
    ([{"step": 1, "shard": "a.parquet", "row": 3, "loss": 1.0}],
     "l.jsonl:1: step 1 did not consume row 3 of shard 'a.parquet'"),
    ([{"step": 1, "position": 2, "loss": 1.0}, {}, {"step": 1, "shard": "b.parquet", "row": 5, "loss": 2.0}],
     "a second loss for step 1 position 2"),
    ([{"step": 1, "loss": 1.0}], "l.jsonl:1: no position and no shard + row"),
])
def test_losses_that_do_not_fit_the_manifest_are_one_line_errors(rowman, tmp_path, recs, msg):
    path = tmp_path / "l.jsonl"
    path.write_text("\n".join(json.dumps(r) if r else "" for r in recs) + "\n")
    with pytest.raises(UserError) as e:
        join_losses(BatchIndex.from_manifest(rowman), read_row_losses(str(path)))
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_malformed_files_name_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"step": 1, "position": 0, "loss": 1.5}\n{"step": 1, "position": 1, "loss": "high"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: 'loss' is 'high', expected a number"):
        read_row_losses(str(p))
    p.write_text('{"step": 1, "position": 0, "loss": 1.5}\n{"step": 1, "position": 1, "loss": 1\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        read_row_losses(str(p))
    # a line `null` crashed Arrow's streaming JSON reader (a segmentation fault) at the start of a block
    p.write_text('{"step": 1, "position": 0, "loss": 1.5}\nnull\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: expected a JSON object, got NoneType"):
        read_row_losses(str(p))
    q = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"step": [1], "value": [1.0]}), q)
    with pytest.raises(UserError, match="missing column 'loss'"):
        read_row_losses(str(q))
    n = tmp_path / "bad.npy"
    np.save(n, np.zeros(5))
    with pytest.raises(UserError, match=r"expected a 2-D \[steps, batch\] array"):
        read_row_losses(str(n))
    with pytest.raises(UserError, match="per-row losses not found"):
        read_row_losses(str(tmp_path / "missing.parquet"))


def test_positions_need_a_manifest_that_records_them(tmp_path):
    man = manifest_from_arrays(step=[1], shard=["a.parquet"], row_start=[0], row_end=[4])
    idx = BatchIndex.from_manifest(man)
    assert not idx.known_positions
    f = _write_jsonl(tmp_path / "l.jsonl", [{"step": 1, "position": 0, "loss": 1.0}])
    with pytest.raises(UserError, match="records no batch positions"):
        join_losses(idx, read_row_losses(str(f)))
    g = _write_jsonl(tmp_path / "k.jsonl", [{"step": 1, "shard": "a.parquet", "row": 2, "loss": 1.0}])
    j = join_losses(idx, read_row_losses(str(g)))
    assert np.isnan(j.loss).tolist() == [True, True, False, True]


def test_pieces_of_one_sample_are_one_sequence_in_piece_order():
    """Megatron: a sample crossing documents is several token slices at one position."""
    man = manifest_from_arrays(step=[3, 3, 3], shard=["d.bin"] * 3, row_start=[500, 100, 900],
                               row_end=[510, 104, 905], unit="token")
    man = _with_positions(man, [0, 0, 1], seq_piece=[1, 0, 0])
    idx = BatchIndex.from_manifest(man)
    assert idx.n_units == 2
    flags = pa.table({"step": [3], "shard": ["d.bin"], "row": [500], "spike_id": ["s"]})
    assert flag_units(idx, flags).tolist() == [True, False]
    t = losses_table(idx, np.array([2.0, 3.0]))
    assert t.column("row").to_pylist() == [100, 900]  # a sequence is named by its first piece


def test_replay_pack_holds_the_batches_in_order(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    rows = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10], [11, 12]]
    pq.write_table(pa.table({"tokens": pa.array(rows, pa.list_(pa.int32()))}), shards / "a.parquet")
    np.save(shards / "d.npy", np.arange(1000, 1100, dtype=np.uint16))
    man = manifest_from_arrays(step=[1, 1, 1, 2, 2], shard=["a.parquet", "d.npy", "d.npy", "a.parquet", "a.parquet"],
                               row_start=[3, 10, 50, 0, 4], row_end=[5, 14, 52, 2, 5],
                               unit=["row", "token", "token", "row", "row"])
    man = _with_positions(man, [1, 0, 0, 1, 0], seq_piece=[0, 1, 0, 0, 0])
    idx = BatchIndex.from_manifest(man)
    units, tok, _ = read_step_units(idx, 1, str(shards))
    # position 0: d.npy [50, 52) then [10, 14); positions 1, 2: rows 3, 4 of a.parquet
    assert tok.to_pylist() == [[1050, 1051, 1010, 1011, 1012, 1013], [7, 8, 9, 10], [11, 12]]
    info = write_replay_pack(str(tmp_path / "pack"), idx, str(shards), {"run/train_loss/2": [2]}, [1])
    t = pq.read_table(tmp_path / "pack" / "rows.parquet")
    flat = np.load(tmp_path / "pack" / "tokens.npy")
    assert info["sequences"] == 6 and flat.dtype == np.uint16
    assert t.column("role").to_pylist() == ["control"] * 3 + ["window"] * 3
    assert t.column("position").to_pylist() == [0, 1, 2, 0, 1, 2]
    for r in t.to_pylist():
        assert flat[r["token_start"]:r["token_end"]].tolist() == r["tokens"]
    assert t.column("tokens").to_pylist()[3:] == [[11, 12], [1, 2, 3], [4, 5]]
    assert t.column("n_pieces").to_pylist() == [2, 1, 1, 1, 1, 1]
    assert "--row-losses" in (tmp_path / "pack" / "README.md").read_text()


def test_two_sequences_at_one_position_are_an_error():
    man = manifest_from_arrays(step=[1, 1], shard=["a.parquet", "b.parquet"], row_start=[0, 0], row_end=[2, 1])
    with pytest.raises(UserError, match="rows 0 and 1 both hold position 1 of step 1"):
        BatchIndex.from_manifest(_with_positions(man, [0, 1]))
    tok = manifest_from_arrays(step=[1, 1], shard=["d.bin"] * 2, row_start=[0, 50], row_end=[10, 60], unit="token")
    with pytest.raises(UserError, match="both hold position 0"):
        BatchIndex.from_manifest(_with_positions(tok, [0, 0]))  # no seq_piece: two sequences, not two pieces


def test_replay_out_without_a_table_suffix_is_one_line_before_the_model_loads(demo, tmp_path, capsys):
    """`replay --out X` with no .parquet/.jsonl suffix wrote a Parquet file that `run --row-losses` then refused
    (it tells formats apart by the suffix): now refused up front, one line, exit 2, nothing written, and before
    torch or the model are needed (the model path here is not a model)."""
    from spike_audit.pipelines.cli.main import main

    root, _ = demo
    run = root / "run"
    out = tmp_path / "losses"
    rc = main(["replay", "--model", str(tmp_path), "--manifest", str(run / "manifest.parquet"), "--shards",
               str(run / "shards"), "--log", str(run / "train.log"), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not out.exists()
    assert len(err) == 1 and "--out" in err[0] and ".parquet or .jsonl" in err[0], err
