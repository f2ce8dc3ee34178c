"""Flat token files as rows: fixed windows, EOS-delimited documents, Megatron .idx sequences, in the readers,
`batch`, `run` and `shards` (checked against the plain definitions and against the same data as Parquet rows)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st

from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.shards.read import open_shard, read_slices, shard_length
from spike_audit.pipelines.shards.rows import RowDef, row_def
from spike_audit.pipelines.shards import tokens as T


def _docs_of(a: np.ndarray, eos: int) -> list[list[int]]:
    """The plain definition: each document runs up to and including its EOS; a tail without one is a document."""
    docs, cur = [], []
    for v in a.tolist():
        cur.append(v)
        if v == eos:
            docs.append(cur)
            cur = []
    if cur:
        docs.append(cur)
    return docs


@given(st.lists(st.integers(0, 3), max_size=60), st.sampled_from([1, 2, 3, 7, 1 << 20]), st.integers(1, 5))
@settings(max_examples=150, deadline=None)
def test_documents_equal_the_plain_definition(tmp_path_factory, values, block, per_chunk):
    d = tmp_path_factory.mktemp("docs")
    a = np.asarray(values, np.uint16)
    a.tofile(d / "x.bin")
    docs = _docs_of(a, 0)
    old = T.DOC_SCAN_BLOCK
    T.DOC_SCAN_BLOCK = block  # scans cross block boundaries
    try:
        rows = RowDef("documents", eos_id=0)
        assert shard_length(str(d), "x.bin", rows=rows) == len(docs)
        if docs:
            rb = read_slices(str(d), "x.bin", [[0, len(docs)]], rows=rows)
            assert rb.column("tokens").to_pylist() == docs
            assert rb.column("row").to_pylist() == list(range(len(docs)))
            k = len(docs) - 1  # a fresh reader asked for one row scans only as far as it needs
            assert read_slices(str(d), "x.bin", [[k, k + 1]], rows=rows).column("tokens").to_pylist() == [docs[k]]
        with pytest.raises(UserError, match="past its end"):
            read_slices(str(d), "x.bin", [[0, len(docs) + 1]], rows=rows)
        # the shard audit's chunks: whole documents, in order, each chunk's count exact, the last one marked
        chunks = list(T.document_chunks(T.open_token_file(str(d / "x.bin")), 0, per_chunk))
        got = []
        for ra, rb_, ta, tb, last in chunks:
            off = T.split_documents(a[ta:tb], 0)
            assert len(off) - 1 == rb_ - ra <= per_chunk
            got += [a[ta:tb][off[i]:off[i + 1]].tolist() for i in range(len(off) - 1)]
        assert got == docs
        assert [c[4] for c in chunks] == [False] * (len(chunks) - 1) + [True] * bool(chunks)
    finally:
        T.DOC_SCAN_BLOCK = old


@given(st.integers(0, 100), st.integers(1, 12))
@settings(max_examples=60, deadline=None)
def test_windows_equal_the_plain_definition(tmp_path_factory, n, L):
    d = tmp_path_factory.mktemp("win")
    a = np.arange(n, dtype=np.uint32)
    np.save(d / "x.npy", a)  # a 1-D .npy with its header
    rows = RowDef("windows", seq_len=L)
    assert shard_length(str(d), "x.npy", rows=rows) == n // L  # the trailing n % L tokens are no row
    if n // L:
        rb = read_slices(str(d), "x.npy", [[0, n // L]], rows=rows)
        assert rb.column("tokens").to_pylist() == [a[i * L:(i + 1) * L].tolist() for i in range(n // L)]


def test_row_definitions_refused_where_they_do_not_apply(tmp_path):
    np.arange(20, dtype=np.uint16).tofile(tmp_path / "x.bin")
    np.save(tmp_path / "m.npy", np.zeros((4, 8), np.int32))
    with pytest.raises(UserError, match="rows need a definition, --seq-len"):
        read_slices(str(tmp_path), "x.bin", [[0, 1]])
    with pytest.raises(UserError, match=r"no .*x\.idx next to it"):
        open_shard(str(tmp_path), "x.bin", rows=RowDef("idx"))
    with pytest.raises(UserError, match="rows of 8 tokens, but rows are asked as windows of 4"):
        open_shard(str(tmp_path), "m.npy", rows=RowDef("windows", seq_len=4))
    assert shard_length(str(tmp_path), "m.npy", rows=RowDef("windows", seq_len=8)) == 4
    with pytest.raises(UserError, match="need a positive --seq-len"):
        row_def("windows", None, None)
    with pytest.raises(UserError, match="need the EOS token id"):
        row_def("documents", None, None)
    assert row_def(None, None, 5) is None  # an EOS id alone is a signal setting, not a row definition
    assert row_def(None, 16, None) == RowDef("windows", 16)


def _megatron(path, docs, dtype=np.int32):
    """A Megatron MMIDIDX pair written from its format (one sequence per document)."""
    lengths = np.array([len(x) for x in docs], np.int32)
    flat = np.concatenate([np.asarray(x, dtype) for x in docs])
    flat.tofile(f"{path}.bin")
    pointers = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) * np.dtype(dtype).itemsize
    with open(f"{path}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 4)
                + struct.pack("<QQ", len(docs), len(docs) + 1))
        f.write(lengths.tobytes() + pointers.tobytes() + np.arange(len(docs) + 1, dtype=np.int64).tobytes())


def test_megatron_idx_rows_and_explicit_definitions_over_its_bin(tmp_path):
    docs = [[5, 6, 0], [7, 7, 7, 7, 0], [9, 0]]
    _megatron(tmp_path / "d", docs)
    for rows in (None, RowDef("idx")):
        assert read_slices(str(tmp_path), "d.bin", [[0, 3]], rows=rows).column("tokens").to_pylist() == docs
    assert read_slices(str(tmp_path), "d.bin", [[0, 2]], rows=RowDef("windows", seq_len=4)).column(
        "tokens").to_pylist() == [[5, 6, 0, 7], [7, 7, 7, 0]]


def _manifest(path, steps, starts, ends, shard="x.bin", flat_rows=None):
    from spike_audit.pipelines.manifest import manifest_from_arrays, write_manifest

    t = manifest_from_arrays(steps, shard, starts, ends, "row")
    write_manifest(t, path)
    if flat_rows is not None:  # a manifest that records its row definition
        t = pq.read_table(path)
        meta = dict(t.schema.metadata or {})
        meta[b"spike_audit.manifest"] = json.dumps({"flat_rows": flat_rows}).encode()
        pq.write_table(t.replace_schema_metadata(meta), path)


def test_batch_reads_flat_rows_and_checks_the_manifest_record(tmp_path, capsys):
    from spike_audit.pipelines.cli.main import main

    a = np.arange(1, 101, dtype=np.uint16)
    a[[9, 29, 59]] = 0
    a.tofile(tmp_path / "x.bin")
    _manifest(tmp_path / "m.parquet", [0, 0, 1], [0, 2, 1], [1, 3, 2])
    base = ["batch", "--manifest", str(tmp_path / "m.parquet"), "--shards", str(tmp_path), "--step", "0", "--json"]
    assert main(base) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "row 0" in err[0] and "rows need a definition" in err[0]
    assert main(base + ["--seq-len", "10"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["flat_rows"] == {"kind": "windows", "seq_len": 10} and rep["n_tokens"] == 20
    assert [q["row"] for s in rep["slices"] for q in s["sequences"]] == [0, 2]
    assert main(base + ["--rows", "documents", "--eos-id", "0"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert [s["n_tokens"] for s in rep["slices"]] == [10, 30]  # documents 0 and 2: [0, 10) and [30, 60)

    _manifest(tmp_path / "r.parquet", [0], [1], [2], flat_rows={"kind": "windows", "seq_len": 25})
    rec = ["batch", "--manifest", str(tmp_path / "r.parquet"), "--shards", str(tmp_path), "--step", "0", "--json"]
    assert main(rec) == 0  # the manifest's own record is used
    assert json.loads(capsys.readouterr().out)["n_tokens"] == 25
    assert main(rec + ["--seq-len", "10"]) == 2  # and a different one asked for is refused
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "windows of 25 tokens" in err[0] and "windows of 10" in err[0]


def _corpus(root, n_shards=6, docs_per_shard=150, seed=1):
    rng = np.random.default_rng(seed)
    (root / "bin").mkdir()
    (root / "pq").mkdir()
    for k in range(n_shards):
        docs = [rng.integers(1, 500, int(rng.integers(5, 60))).tolist() + [0] for _ in range(docs_per_shard)]
        if k == n_shards - 1:
            docs = [docs[0]] * docs_per_shard  # one broken shard: a single document repeated
        np.concatenate([np.asarray(d, np.uint16) for d in docs]).tofile(root / "bin" / f"s{k}.bin")
        pq.write_table(pa.table({"tokens": pa.array(docs, pa.list_(pa.int64()))}), root / "pq" / f"s{k}.parquet")


def _signals(path):
    return [(r["shard"].rsplit(".", 1)[0], r["n_rows"], r["n_tokens"], [(s["name"], s["value"]) for s in r["signals"]])
            for r in pq.read_table(path).to_pylist()]


@pytest.mark.slow
def test_shards_audits_flat_files_as_documents_exactly_like_parquet_rows(tmp_path, capsys):
    """The same documents as a flat .bin (--rows documents) and as Parquet rows: identical shard scores, and
    the row definition is recorded in summary.json; without a definition every flat file is refused."""
    from spike_audit.pipelines.cli.main import main

    _corpus(tmp_path)
    assert main(["-q", "shards", str(tmp_path / "bin"), "--out", str(tmp_path / "none")]) == 2
    assert "rows need a definition" in capsys.readouterr().err
    assert main(["-q", "shards", str(tmp_path / "bin"), "--out", str(tmp_path / "docs"), "--rows", "documents",
                 "--eos-id", "0", "--batch-rows", "64"]) == 0
    assert main(["-q", "shards", str(tmp_path / "pq"), "--out", str(tmp_path / "pq_out"), "--eos-id", "0",
                 "--batch-rows", "64"]) == 0
    assert _signals(tmp_path / "docs" / "shard_scores.parquet") == _signals(tmp_path / "pq_out" / "shard_scores.parquet")
    top = pq.read_table(tmp_path / "docs" / "shard_scores.parquet").to_pylist()[0]
    assert top["shard"] == "s5.bin"
    summary = json.loads((tmp_path / "docs" / "summary.json").read_text())
    assert summary["tokens"]["flat_rows"] == {"kind": "documents", "eos_id": 0}
    assert main(["-q", "shards", str(tmp_path / "bin"), "--out", str(tmp_path / "win"), "--seq-len", "32"]) == 0
    win = pq.read_table(tmp_path / "win" / "shard_scores.parquet").to_pylist()
    sizes = {p.name: p.stat().st_size // 2 for p in (tmp_path / "bin").iterdir()}
    assert {r["shard"]: r["n_rows"] for r in win} == {k: v // 32 for k, v in sizes.items()}


def _megatron_raw(path, lengths, pointers, code, data: bytes):
    with open(f"{path}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
                + struct.pack("<QQ", len(lengths), len(lengths) + 1))
        f.write(np.asarray(lengths, np.int32).tobytes() + np.asarray(pointers, np.int64).tobytes()
                + np.arange(len(lengths) + 1, dtype=np.int64).tobytes())
    with open(f"{path}.bin", "wb") as f:
        f.write(data)


def test_megatron_index_damage_that_would_shift_or_misread_tokens_is_refused(tmp_path):
    """Pointers that are not whole tokens were floored (other tokens read, no error), a .bin with a trailing partial
    token was read without it, and a float dtype code gave an IndexError message."""
    data = np.arange(12, dtype=np.int32).tobytes()
    _megatron_raw(tmp_path / "odd", [4, 4], [1, 17], 4, data)  # byte 1: inside token 0
    with pytest.raises(UserError, match=r"odd\.bin: row 0: the index puts this sequence at byte 1, not a multiple"):
        read_slices(str(tmp_path), "odd.bin", [[0, 2]])
    _megatron_raw(tmp_path / "extra", [4, 4], [0, 16], 4, data + b"\x07")
    with pytest.raises(UserError, match=r"49 bytes is not a whole number of int32 tokens"):
        read_slices(str(tmp_path), "extra.bin", [[0, 2]])
    _megatron_raw(tmp_path / "flt", [4], [0], 6, np.zeros(4, np.float64).tobytes())
    with pytest.raises(UserError, match=r"dtype code 6 is float64, expected integer token ids"):
        read_slices(str(tmp_path), "flt.bin", [[0, 1]])
    _megatron_raw(tmp_path / "good", [4, 4], [0, 16], 4, data)
    assert read_slices(str(tmp_path), "good.bin", [[0, 2]]).column("tokens").to_pylist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
