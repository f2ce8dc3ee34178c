"""Shard readers: write with an independent writer, read back exactly the rows / token ranges asked for."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spike_audit.pipelines.shards import jsonl as shards_jsonl
from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.shards.read import read_slices, shard_length
from spike_audit.pipelines.shards.slices import SLICES_SCHEMA, coalesce

RNG = np.random.default_rng(7)
DOCS = [RNG.integers(0, 60000, size=int(RNG.integers(1, 12))).tolist() for _ in range(200)]
TEXTS = [f"document number {i} ✓" for i in range(200)]


def _expected_rows(slices):
    return [i for a, b in slices for i in range(a, b)]


def _tokens(batch):
    return batch.column("tokens").to_pylist()


@pytest.fixture
def parquet_shard(tmp_path):
    table = pa.table({"tokens": pa.array(DOCS, pa.list_(pa.uint32())), "text": TEXTS})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=16)
    return tmp_path


def test_parquet_rows_in_slice_order_with_repeats(parquet_shard):
    slices = np.array([[190, 200], [3, 4], [3, 6], [150, 151]])
    batch = read_slices(str(parquet_shard), "p.parquet", slices)
    rows = _expected_rows(slices)
    assert batch.schema.equals(SLICES_SCHEMA)
    assert _tokens(batch) == [DOCS[i] for i in rows]
    assert batch.column("text").to_pylist() == [TEXTS[i] for i in rows]
    assert batch.column("row").to_pylist() == rows
    assert batch.column("row_end").to_pylist() == [r + 1 for r in rows]
    assert set(batch.column("unit").to_pylist()) == {"row"}
    assert set(batch.column("shard").to_pylist()) == {"p.parquet"}


def test_parquet_reads_only_row_groups_holding_the_rows(parquet_shard, monkeypatch):
    seen = []
    orig_one, orig_many = pq.ParquetFile.read_row_group, pq.ParquetFile.read_row_groups

    def spy_one(self, i, *a, **kw):
        seen.append(i)
        return orig_one(self, i, *a, **kw)

    def spy_many(self, groups, *a, **kw):
        seen.extend(groups)
        return orig_many(self, groups, *a, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy_one)
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", spy_many)
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("whole-file read"))
    read_slices(str(parquet_shard), "p.parquet", [[190, 191], [17, 18], [20, 21]])  # groups 11 and 1 of 13
    assert sorted(seen) == [1, 11]


def test_parquet_text_only_and_custom_columns(tmp_path):
    pq.write_table(pa.table({"body": ["a", "b", "c"], "ids": pa.array([[1], [2, 2], [3]], pa.list_(pa.int32()))}),
                   tmp_path / "c.parquet")
    b = read_slices(str(tmp_path), "c.parquet", [[1, 3]], tokens_col="ids", text_col="body")
    assert _tokens(b) == [[2, 2], [3]] and b.column("text").to_pylist() == ["b", "c"]
    b = read_slices(str(tmp_path), "c.parquet", [[0, 1]], text_col="body")  # no 'tokens' column: text only
    assert _tokens(b) == [None] and b.column("text").to_pylist() == ["a"]
    with pytest.raises(UserError, match=r"c.parquet: has no column 'nope' \(--tokens-column\); columns: body, ids"):
        read_slices(str(tmp_path), "c.parquet", [[0, 1]], tokens_col="nope", text_col="body")  # asked for by name
    with pytest.raises(UserError, match=r"c.parquet: has neither a 'tokens' nor a 'text' column"):
        read_slices(str(tmp_path), "c.parquet", [[0, 1]])


def test_parquet_token_unit_is_rejected(parquet_shard):
    with pytest.raises(UserError, match="unit 'token' does not apply"):
        read_slices(str(parquet_shard), "p.parquet", [[0, 4]], unit="token")


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_variants(tmp_path, suffix):
    lines = "".join(json.dumps({"text": t, "tokens": d, "other": 1}) + "\n" for t, d in zip(TEXTS, DOCS)).encode()
    path = tmp_path / f"s{suffix}"
    if suffix.endswith(".gz"):
        path.write_bytes(gzip.compress(lines))
    elif suffix.endswith(".zst"):
        import zstandard

        path.write_bytes(zstandard.ZstdCompressor().compress(lines))
    else:
        path.write_bytes(lines)
    slices = [[199, 200], [0, 2], [100, 103], [1, 2]]
    b = read_slices(str(tmp_path), path.name, slices)
    rows = _expected_rows(slices)
    assert _tokens(b) == [DOCS[i] for i in rows]
    assert b.column("text").to_pylist() == [TEXTS[i] for i in rows]
    assert shard_length(str(tmp_path), path.name) == 200


def test_jsonl_small_chunks_and_no_trailing_newline(tmp_path, monkeypatch):
    monkeypatch.setattr(shards_jsonl, "_JSONL_CHUNK", 7)  # lines straddle chunk boundaries
    body = "\n".join(json.dumps({"text": f"line {i}"}) for i in range(30))  # no final newline
    (tmp_path / "t.jsonl").write_text(body)
    b = read_slices(str(tmp_path), "t.jsonl", [[29, 30], [0, 1], [13, 15]])
    assert b.column("text").to_pylist() == ["line 29", "line 0", "line 13", "line 14"]
    assert _tokens(b) == [None] * 4
    assert shard_length(str(tmp_path), "t.jsonl") == 30


def test_jsonl_blank_and_invalid_lines_are_located(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"text": "a"}\n\n{"text": "c"}\nnot json\n')
    assert read_slices(str(tmp_path), "b.jsonl", [[2, 3]]).column("text").to_pylist() == ["c"]
    with pytest.raises(UserError, match=r"b.jsonl:2: expected a JSON object, got an empty line"):
        read_slices(str(tmp_path), "b.jsonl", [[1, 2]])
    with pytest.raises(UserError, match=r"b.jsonl:4: expected a JSON object, got invalid JSON"):
        read_slices(str(tmp_path), "b.jsonl", [[3, 4]])


def test_hf_save_to_disk_and_arrow_file(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": TEXTS[:50], "tokens": DOCS[:50]})
    ds.save_to_disk(str(tmp_path / "hf"))
    slices = [[49, 50], [10, 13], [10, 11]]
    rows = _expected_rows(slices)
    b = read_slices(str(tmp_path), "hf", slices)
    assert _tokens(b) == [DOCS[i] for i in rows] and b.column("text").to_pylist() == [TEXTS[i] for i in rows]
    arrow = sorted(p.name for p in (tmp_path / "hf").glob("*.arrow"))[0]
    b = read_slices(str(tmp_path), f"hf/{arrow}", slices)
    assert _tokens(b) == [DOCS[i] for i in rows]
    assert shard_length(str(tmp_path), "hf") == 50


def test_hf_dataset_dict_points_to_a_split(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x"]})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(UserError, match="DatasetDict.*'dd/train'"):
        read_slices(str(tmp_path), "dd", [[0, 1]])
    assert read_slices(str(tmp_path), "dd/train", [[0, 1]]).column("text").to_pylist() == ["x"]


def test_npy_1d_tokens_and_2d_rows(tmp_path):
    flat = RNG.integers(0, 50000, 1000).astype(np.uint32)
    np.save(tmp_path / "flat.npy", flat)
    b = read_slices(str(tmp_path), "flat.npy", [[990, 1000], [0, 3]], unit="token")
    assert _tokens(b) == [flat[990:1000].tolist(), flat[0:3].tolist()]
    assert b.column("row").to_pylist() == [990, 0] and b.column("row_end").to_pylist() == [1000, 3]
    with pytest.raises(UserError, match="flat.npy: unit 'row' does not apply"):
        read_slices(str(tmp_path), "flat.npy", [[0, 1]])
    grid = RNG.integers(0, 500, (20, 8)).astype(np.int64)
    np.save(tmp_path / "grid.npy", grid)
    b = read_slices(str(tmp_path), "grid.npy", [[19, 20], [2, 4]])
    assert _tokens(b) == [grid[19].tolist(), grid[2].tolist(), grid[3].tolist()]
    assert shard_length(str(tmp_path), "grid.npy") == 20
    assert shard_length(str(tmp_path), "grid.npy", "token") == 160


def test_raw_bin_dtypes_and_headerless_npy(tmp_path):
    a16 = RNG.integers(0, 65535, 500).astype(np.uint16)
    a16.tofile(tmp_path / "t.bin")
    assert _tokens(read_slices(str(tmp_path), "t.bin", [[7, 20]], unit="token")) == [a16[7:20].tolist()]
    a32 = RNG.integers(0, 2**24, 500).astype(np.uint32)  # ids up to MAX_TOKEN_ID (vocabularies are smaller)
    np.memmap(tmp_path / "olmo.npy", dtype=np.uint32, mode="w+", shape=a32.shape)[:] = a32  # OLMo-style raw .npy
    b = read_slices(str(tmp_path), "olmo.npy", [[490, 500]], unit="token", dtype="uint32")
    assert _tokens(b) == [a32[490:500].tolist()]
    assert shard_length(str(tmp_path), "olmo.npy", "token", dtype="uint32") == 500


def _write_modded(path, tokens, version=1, ntok=None, magic=20240520):
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = magic, version, len(tokens) if ntok is None else ntok
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.tobytes())


def test_modded_nanogpt_header_is_skipped(tmp_path):
    toks = RNG.integers(0, 50257, 300).astype(np.uint16)
    _write_modded(tmp_path / "fineweb_train_000001.bin", toks)
    b = read_slices(str(tmp_path), "fineweb_train_000001.bin", [[0, 5], [295, 300]], unit="token")
    assert _tokens(b) == [toks[:5].tolist(), toks[295:].tolist()]
    assert shard_length(str(tmp_path), "fineweb_train_000001.bin", "token") == 300
    llama = RNG.integers(0, 128256, 50).astype(np.uint32)  # llm.c Llama-3 shards: uint32 tokens
    _write_modded(tmp_path / "llama.bin", llama, version=7, magic=20240801)
    assert _tokens(read_slices(str(tmp_path), "llama.bin", [[40, 50]], unit="token")) == [llama[40:].tolist()]
    _write_modded(tmp_path / "bad.bin", toks, ntok=301)
    with pytest.raises(UserError, match=r"bad.bin: header says 301 tokens"):
        read_slices(str(tmp_path), "bad.bin", [[0, 1]], unit="token")


def _write_megatron(prefix, docs, dtype=np.uint16, code=8):
    """Independent writer of the MMIDIDX format (header, version, dtype code, counts, lengths, pointers, docs)."""
    lengths = np.array([len(d) for d in docs], np.int32)
    pointers = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) * np.dtype(dtype).itemsize
    with open(f"{prefix}.bin", "wb") as f:
        for d in docs:
            f.write(np.asarray(d, dtype).tobytes())
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<Q", len(docs)))
        f.write(struct.pack("<Q", len(docs) + 1))
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(np.arange(len(docs) + 1, dtype=np.int64).tobytes(order="C"))


def test_megatron_rows_are_sequences_and_tokens_are_bin_offsets(tmp_path):
    _write_megatron(tmp_path / "corpus_text_document", DOCS[:40], np.int32, code=4)
    b = read_slices(str(tmp_path), "corpus_text_document.bin", [[39, 40], [5, 7]])
    assert _tokens(b) == [DOCS[39], DOCS[5], DOCS[6]]
    flat = np.concatenate([np.asarray(d) for d in DOCS[:40]])
    b = read_slices(str(tmp_path), "corpus_text_document.bin", [[3, 30]], unit="token")
    assert _tokens(b) == [flat[3:30].tolist()]
    assert shard_length(str(tmp_path), "corpus_text_document.bin") == 40
    assert shard_length(str(tmp_path), "corpus_text_document.bin", "token") == len(flat)


def test_megatron_bad_header(tmp_path):
    _write_megatron(tmp_path / "x", DOCS[:3])
    (tmp_path / "x.idx").write_bytes(b"NOTMEGA!!" + (tmp_path / "x.idx").read_bytes()[9:])
    with pytest.raises(UserError, match="x.idx: not a Megatron index"):
        read_slices(str(tmp_path), "x.bin", [[0, 1]])


def test_past_end_and_missing_shard_name_the_shard(parquet_shard, tmp_path):
    with pytest.raises(UserError, match=r"^p.parquet: slice \[199, 201\) is past its end \(200 rows\)$"):
        read_slices(str(parquet_shard), "p.parquet", [[0, 1], [199, 201]])
    np.arange(10, dtype=np.uint16).tofile(tmp_path / "ten.bin")
    with pytest.raises(UserError, match=r"ten.bin: slice \[5, 11\) is past its end \(10 tokens\)"):
        read_slices(str(tmp_path), "ten.bin", [[5, 11]], unit="token")
    with pytest.raises(UserError, match=r"shard 'nope/x.parquet' not found under"):
        read_slices(str(tmp_path), "nope/x.parquet", [[0, 1]])


def test_fsspec_urls_use_ranged_reads(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    toks = RNG.integers(0, 65535, 400).astype(np.uint16)
    with fs.open("/bucket/t.bin", "wb") as f:
        f.write(toks.tobytes())
    with fs.open("/bucket/p.parquet", "wb") as f:
        pq.write_table(pa.table({"tokens": pa.array(DOCS[:30], pa.list_(pa.uint32()))}), f, row_group_size=8)
    b = read_slices("memory://bucket", "t.bin", [[10, 20], [15, 25], [390, 400]], unit="token")
    assert _tokens(b) == [toks[10:20].tolist(), toks[15:25].tolist(), toks[390:].tolist()]
    b = read_slices("memory://bucket", "p.parquet", [[29, 30], [0, 2]])
    assert _tokens(b) == [DOCS[29], DOCS[0], DOCS[1]]
    assert shard_length("memory://bucket", "p.parquet") == 30


def test_coalesce_merges_adjacent_and_overlapping():
    got = coalesce(np.array([[10, 12], [0, 3], [3, 5], [11, 20], [30, 31]]))
    assert got.tolist() == [[0, 5], [10, 20], [30, 31]]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 499), st.integers(1, 40)), min_size=1, max_size=20))
def test_token_slices_property(tmp_path_factory, pairs):
    d = tmp_path_factory.mktemp("prop")
    toks = np.arange(500, dtype=np.uint32) * 7
    toks.tofile(d / "t.bin")
    slices = np.array([[a, min(500, a + n)] for a, n in pairs])
    b = read_slices(str(d), "t.bin", slices, unit="token", dtype="uint32")
    assert _tokens(b) == [toks[a:e].tolist() for a, e in slices]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 199), st.integers(1, 5)), min_size=1, max_size=15))
def test_parquet_row_slices_property(tmp_path_factory, pairs):
    d = tmp_path_factory.mktemp("propq")
    pq.write_table(pa.table({"tokens": pa.array(DOCS, pa.list_(pa.uint16()))}), d / "p.parquet", row_group_size=9)
    slices = np.array([[a, min(200, a + n)] for a, n in pairs])
    b = read_slices(str(d), "p.parquet", slices)
    assert _tokens(b) == [DOCS[i] for i in _expected_rows(slices.tolist())]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 199), st.integers(1, 20)), min_size=1, max_size=12))
def test_one_open_reader_gives_every_read_its_own_rows(tmp_path_factory, pairs):
    """A shard opened once and read chunk after chunk (as the shard audit reads a shard's row chunks) gives each
    read exactly its rows, whether it falls in the group read just before, another group, or spans several."""
    from spike_audit.pipelines.shards.read import _close, open_shard

    d = tmp_path_factory.mktemp("reader")
    pq.write_table(pa.table({"tokens": pa.array(DOCS, pa.list_(pa.uint16())), "text": TEXTS}), d / "p.parquet",
                   row_group_size=32)
    reader = open_shard(str(d), "p.parquet")
    try:
        for a, n in pairs:
            b = reader.read(np.array([[a, min(200, a + n)]], dtype=np.int64), "row")
            rows = list(range(a, min(200, a + n)))
            assert _tokens(b) == [DOCS[i] for i in rows]
            assert b.column("text").to_pylist() == [TEXTS[i] for i in rows]
    finally:
        _close(reader)


def test_consecutive_chunks_of_one_row_group_decode_it_once(parquet_shard, monkeypatch):
    from spike_audit.pipelines.shards.read import _close, open_shard

    seen = []
    orig = pq.ParquetFile.read_row_group

    def spy(self, i, *a, **kw):
        seen.append(i)
        return orig(self, i, *a, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    reader = open_shard(str(parquet_shard), "p.parquet")
    try:
        chunks = [reader.read(np.array([[a, a + 8]], dtype=np.int64), "row") for a in (32, 40, 48, 56, 32)]
    finally:
        _close(reader)
    assert seen == [2, 3, 2]  # groups of 16 rows: 32-47 (two chunks), 48-63 (two chunks), then 32-47 again
    assert [_tokens(c) for c in chunks] == [DOCS[a:a + 8] for a in (32, 40, 48, 56, 32)]
