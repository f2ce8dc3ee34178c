"""Hostile and damaged shards and manifests (issue 11): read completely and correctly, or refused with a one-line
UserError naming the shard (and row) and what was expected; shard names stay inside the shard root unless a flag
allows otherwise; nothing hangs on a FIFO."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import re
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from spike_audit.pipelines.cli.main import main
from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.manifest import check_shard_bounds, load_manifest_table, manifest_from_arrays, write_manifest
from spike_audit.pipelines.shards.paths import ShardRoot, resolve
from spike_audit.pipelines.shards.read import open_shard, read_slices, shard_length
from spike_audit.pipelines.shards.slices import MAX_TOKEN_ID


def _finishes(fn, timeout=20.0):
    box = {}

    def target():
        try:
            box["out"] = fn()
        except BaseException as err:  # noqa: BLE001
            box["err"] = err

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(timeout)
    assert not th.is_alive(), "the reader hung"
    return box.get("out"), box.get("err")


def _tokens_table(n=20, width=8):
    return pa.table({"tokens": pa.array([list(range(i, i + width)) for i in range(n)], pa.list_(pa.int64())),
                     "text": [f"row {i}" for i in range(n)]})


# --------------------------------------------------------------------------------------------- null rows


def test_null_token_rows_are_an_error_naming_shard_and_row(tmp_path):
    toks = [list(range(5)) for _ in range(10)]
    toks[6] = None
    pq.write_table(pa.table({"tokens": pa.array(toks, pa.list_(pa.int64()))}), tmp_path / "a.parquet")
    assert len(read_slices(str(tmp_path), "a.parquet", [[0, 6]])) == 6  # rows before it read fine
    with pytest.raises(UserError, match=r"^a\.parquet: row 6: 'tokens' is null; expected a list of token ids$"):
        read_slices(str(tmp_path), "a.parquet", [[2, 9]])
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"tokens": t}) for t in toks) + "\n")
    with pytest.raises(UserError, match=r"^a\.jsonl:7: 'tokens' is null"):  # row 6 is line 7
        read_slices(str(tmp_path), "a.jsonl", [[0, 10]])


def test_null_text_in_a_text_only_shard_is_an_error(tmp_path):
    pq.write_table(pa.table({"text": ["a", "b", None, "d"]}), tmp_path / "t.parquet")
    with pytest.raises(UserError, match=r"^t\.parquet: row 2: 'text' is null; expected a string$"):
        read_slices(str(tmp_path), "t.parquet", [[0, 4]])


def test_an_all_null_tokens_column_beside_text_is_a_text_shard(tmp_path):
    pq.write_table(pa.table({"tokens": pa.array([None] * 3, pa.list_(pa.int64())), "text": ["a", "b", "c"]}),
                   tmp_path / "t.parquet")
    b = read_slices(str(tmp_path), "t.parquet", [[0, 3]])
    assert b.column("text").to_pylist() == ["a", "b", "c"] and b.column("tokens").null_count == 3


# ------------------------------------------------------------------------------------------- token ids


@pytest.mark.parametrize("bad", [-1, MAX_TOKEN_ID + 1, 2 ** 40, -(2 ** 63)])
def test_out_of_range_token_ids_are_an_error_naming_the_row(tmp_path, bad):
    toks = [[1, 2, 3] for _ in range(8)]
    toks[5] = [4, bad, 6]
    pq.write_table(pa.table({"tokens": pa.array(toks, pa.list_(pa.int64()))}), tmp_path / "a.parquet")
    with pytest.raises(UserError, match=rf"^a\.parquet: row 5: token id {bad} is not a token id"):
        read_slices(str(tmp_path), "a.parquet", [[0, 8]])
    np.save(tmp_path / "a.npy", np.array(toks, np.int64))
    with pytest.raises(UserError, match=rf"^a\.npy: row 5: token id {bad} is not a token id"):
        read_slices(str(tmp_path), "a.npy", [[3, 7]])


def test_uint64_ids_beyond_int64_are_an_error_not_a_cast_failure(tmp_path):
    toks = pa.array([[1, 2], [3, 2 ** 64 - 1]], pa.list_(pa.uint64()))
    pq.write_table(pa.table({"tokens": toks}), tmp_path / "a.parquet")
    with pytest.raises(UserError, match=r"^a\.parquet: row 1: token id 18446744073709551615"):
        read_slices(str(tmp_path), "a.parquet", [[0, 2]])


@pytest.mark.parametrize("tokens,what", [([1, 2 ** 70], "a list of integer token ids"),
                                         ([1, "x"], "a list of integer token ids"), ("abc", "a list of integer"),
                                         ([1, -5], None)])
def test_jsonl_token_lists_that_are_not_ids(tmp_path, tokens, what):
    rows = [{"tokens": [1, 2, 3]}] * 4 + [{"tokens": tokens}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    match = rf"^a\.jsonl:5: expected 'tokens' to be {what}" if what else r"^a\.jsonl:5: token id -5 is not a token id"
    with pytest.raises(UserError, match=match):
        read_slices(str(tmp_path), "a.jsonl", [[0, 5]])


def test_jsonl_invalid_utf8_and_deep_nesting_are_one_line_errors(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    b = read_slices(str(tmp_path), "a.jsonl", [[0, 1]])
    assert b.column("text").to_pylist() == ["ok"]
    with pytest.raises(UserError, match=r"^a\.jsonl:2: expected a JSON object, got invalid JSON"):
        read_slices(str(tmp_path), "a.jsonl", [[1, 2]])
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n' + '{"text": ' + "[" * 100000 + "]" * 100000 + "}\n")
    with pytest.raises(UserError, match=r"^b\.jsonl:2: expected"):
        read_slices(str(tmp_path), "b.jsonl", [[0, 2]])


def test_jsonl_lists_of_nulls_are_refused_never_read_from_an_invalid_array(tmp_path):
    """Arrow's JSON reader builds an invalid list<null> array for ``[null, null]`` (offsets past its values): the
    fast path now validates what it parsed and falls back to the line-by-line reading that names the row."""
    (tmp_path / "a.jsonl").write_text('{"tokens": [1, 2]}\n{"tokens": [null, null]}\n')
    with pytest.raises(UserError, match=r"^a\.jsonl:2: a null token id"):
        read_slices(str(tmp_path), "a.jsonl", [[0, 2]])


def test_jsonl_bom_and_crlf(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "first"}\r\n{"text": "second"}\r\n')
    assert read_slices(str(tmp_path), "a.jsonl", [[0, 2]]).column("text").to_pylist() == ["first", "second"]


# --------------------------------------------------------------------------------------- corrupt files


def test_corrupt_parquet_data_page_is_an_error_naming_shard_and_row_group(tmp_path):
    pq.write_table(_tokens_table(2000, 50), tmp_path / "a.parquet", compression="zstd", write_page_checksum=True,
                   row_group_size=500)
    data = bytearray((tmp_path / "a.parquet").read_bytes())
    md = pq.ParquetFile(tmp_path / "a.parquet").metadata
    col = md.row_group(1).column(0)
    start = col.data_page_offset
    for i in range(start + 40, start + 80):  # inside the first data page of row group 1
        data[i] ^= 0xFF
    (tmp_path / "bad.parquet").write_bytes(bytes(data))
    assert len(read_slices(str(tmp_path), "bad.parquet", [[0, 10]])) == 10  # row group 0 is intact
    with pytest.raises(UserError, match=r"^bad\.parquet: row group 1 \(rows 500\.\.999\) is unreadable: corrupt "
                                        r"Parquet data"):
        read_slices(str(tmp_path), "bad.parquet", [[600, 610]])


@pytest.mark.parametrize("damage", ["footer", "truncated", "garbage"])
def test_unreadable_parquet_files(tmp_path, damage):
    pq.write_table(_tokens_table(), tmp_path / "a.parquet")
    data = (tmp_path / "a.parquet").read_bytes()
    data = {"footer": data[:-12] + b"\0" * 12, "truncated": data[: len(data) // 2], "garbage": b"PAR1" + b"x" * 50}[damage]
    (tmp_path / "a.parquet").write_bytes(data)
    with pytest.raises(UserError, match=r"^a\.parquet: not a readable Parquet file \("):
        shard_length(str(tmp_path), "a.parquet")


@pytest.mark.parametrize("kind", ["gz-truncated", "gz-corrupt", "zst-truncated", "zst-corrupt"])
def test_corrupt_compressed_jsonl_shards(tmp_path, kind):
    text = "".join(json.dumps({"text": f"row {i} " * 20}) + "\n" for i in range(400)).encode()
    comp = gzip.compress(text) if kind.startswith("gz") else zstandard.ZstdCompressor().compress(text)
    if kind.endswith("truncated"):
        comp = comp[: len(comp) * 2 // 3]
    else:
        b = bytearray(comp)
        for i in range(30, len(b) - 30, 11):
            b[i] ^= 0x5A
        comp = bytes(b)
    name = "a.jsonl.gz" if kind.startswith("gz") else "a.jsonl.zst"
    (tmp_path / name).write_bytes(comp)
    with pytest.raises(UserError, match=rf"^{name}: (truncated|corrupt) "):
        shard_length(str(tmp_path), name)
    with pytest.raises(UserError, match=rf"^{name}: (truncated|corrupt) "):
        read_slices(str(tmp_path), name, [[0, 2]])


def test_multi_frame_zstd_jsonl_shard_reads_every_frame(tmp_path):
    lines = [json.dumps({"text": f"row {i}"}) + "\n" for i in range(100)]
    comp = b"".join(zstandard.ZstdCompressor().compress("".join(lines[a:a + 30]).encode()) for a in range(0, 100, 30))
    (tmp_path / "a.jsonl.zst").write_bytes(comp)
    assert shard_length(str(tmp_path), "a.jsonl.zst") == 100
    assert read_slices(str(tmp_path), "a.jsonl.zst", [[98, 100]]).column("text").to_pylist() == ["row 98", "row 99"]


@pytest.mark.parametrize("damage", ["npy-header", "npy-short", "megatron-idx", "megatron-pointers"])
def test_damaged_token_files(tmp_path, damage):
    if damage.startswith("npy"):
        np.save(tmp_path / "a.npy", np.arange(100, dtype=np.int32).reshape(10, 10))
        data = (tmp_path / "a.npy").read_bytes()
        (tmp_path / "a.npy").write_bytes(data[:20] if damage == "npy-header" else data[:-40])
        with pytest.raises(UserError, match=r"a\.npy: (not a readable \.npy file|\.npy header says)"):
            read_slices(str(tmp_path), "a.npy", [[0, 2]])
        return
    from spike_audit.pipelines.shards.tokens import MEGATRON_MAGIC
    import struct

    np.arange(50, dtype=np.uint16).tofile(tmp_path / "m.bin")
    lengths = np.array([10, 10], np.int32)
    pointers = np.array([0, 20 if damage == "megatron-idx" else 10 ** 6], np.int64)
    head = MEGATRON_MAGIC + struct.pack("<Q", 1) + struct.pack("<B", 8) + struct.pack("<QQ", 2, 3)
    body = lengths.tobytes() + pointers.tobytes() + np.array([0, 1, 2], np.int64).tobytes()
    (tmp_path / "m.idx").write_bytes(head + (body[:-9] if damage == "megatron-idx" else body))
    if damage == "megatron-idx":
        with pytest.raises(UserError, match=r"m\.idx: the index says 2 sequences"):
            read_slices(str(tmp_path), "m.bin", [[0, 1]])
    else:
        with pytest.raises(UserError, match=r"m\.bin: row 1: the index puts this sequence at tokens"):
            read_slices(str(tmp_path), "m.bin", [[0, 2]])


def test_a_raw_token_file_cut_mid_token_is_refused_never_read_as_a_prefix(tmp_path):
    """A raw .bin whose size is not a whole number of tokens (a writer killed mid-token, or another dtype) is
    refused naming the file; documents asked for nothing scan nothing (no IndexError on an empty request)."""
    from spike_audit.pipelines.shards.rows import RowDef

    (tmp_path / "t.bin").write_bytes(np.arange(50, dtype=np.uint32).tobytes()[:-1])
    for dtype in (None, "uint16", "uint32"):
        with pytest.raises(UserError, match=r"t\.bin: 199 bytes is not a whole number of uint(16|32) tokens"):
            read_slices(str(tmp_path), "t.bin", [[0, 4]], unit="token", dtype=dtype)
    (tmp_path / "d.bin").write_bytes(np.array([5, 0, 7, 7, 0], np.uint16).tobytes())
    docs = RowDef("documents", eos_id=0)
    assert len(read_slices(str(tmp_path), "d.bin", [[0, 0]], rows=docs)) == 0
    assert read_slices(str(tmp_path), "d.bin", [[0, 2]], rows=docs).column("tokens").to_pylist() == [[5, 0], [7, 7, 0]]


# ------------------------------------------------------------------------------ non-regular files, access


def test_fifo_as_shard_is_refused_at_once(tmp_path):
    for name in ("a.parquet", "a.jsonl", "a.npy", "a.bin"):
        os.mkfifo(tmp_path / name)
        _out, err = _finishes(lambda: read_slices(str(tmp_path), name, [[0, 1]], unit="token" if name == "a.bin" else "row"))
        assert isinstance(err, UserError) and "not a regular file (a FIFO)" in str(err), (name, err)


def test_fifo_as_manifest_is_refused_at_once(tmp_path):
    os.mkfifo(tmp_path / "manifest.parquet")
    _out, err = _finishes(lambda: load_manifest_table(tmp_path / "manifest.parquet"))
    assert isinstance(err, UserError) and "not a regular file (a FIFO)" in str(err)
    rc, err = _finishes(lambda: main(["batch", "--manifest", str(tmp_path / "manifest.parquet"), "--step", "1"]))
    assert rc == 2 and err is None


def test_dev_zero_as_a_token_file_is_refused(tmp_path):
    os.symlink("/dev/zero", tmp_path / "z.bin")
    _out, err = _finishes(lambda: read_slices(ShardRoot(str(tmp_path), allow_outside_root=True), "z.bin", [[0, 4]],
                                              unit="token"))
    assert isinstance(err, UserError) and "not a regular file (a character device)" in str(err)


def test_permission_denied_is_a_user_error(tmp_path, monkeypatch):
    pq.write_table(_tokens_table(), tmp_path / "a.parquet")
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    real_open = os.open

    def denied(path, *a, **kw):
        if str(path).startswith(str(tmp_path)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "open", denied)
    for name in ("a.parquet", "a.jsonl"):
        with pytest.raises(UserError, match=rf"{name}: permission denied$"):
            read_slices(str(tmp_path), name, [[0, 1]])


# -------------------------------------------------------------------------------- confinement to the root


@pytest.fixture
def outside(tmp_path):
    """A shard root, a secret file beside it (outside), and a symlink inside the root pointing at the secret."""
    root = tmp_path / "root"
    root.mkdir()
    pq.write_table(_tokens_table(), root / "ok.parquet")
    pq.write_table(_tokens_table(), tmp_path / "secret.parquet")
    os.symlink(tmp_path / "secret.parquet", root / "link.parquet")
    os.symlink(root / "ok.parquet", root / "inner-link.parquet")  # a symlink inside the root is fine
    (root / "sub").mkdir()
    return tmp_path, root


BAD_NAMES = ["../secret.parquet", "sub/../../secret.parquet", "link.parquet", "{tmp}/secret.parquet"]
URL_NAMES = ["file://{tmp}/secret.parquet", "http://127.0.0.1:9/x.parquet", "s3://bucket/x.parquet",
             "simplecache::file://{tmp}/secret.parquet"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_names_outside_the_root_are_refused_unless_allowed(outside, name):
    tmp, root = outside
    name = name.format(tmp=tmp)
    with pytest.raises(UserError, match=rf"^shard '{name}': outside the shard root {root} .*--allow-outside-root"):
        read_slices(str(root), name, [[0, 1]])
    b = read_slices(ShardRoot(str(root), allow_outside_root=True), name, [[0, 1]])
    assert len(b) == 1


def test_names_inside_the_root_are_read(outside):
    tmp, root = outside
    for name in ("ok.parquet", "inner-link.parquet", "sub/../ok.parquet", f"{root}/ok.parquet", "./ok.parquet"):
        assert len(read_slices(str(root), name, [[0, 2]])) == 2


@pytest.mark.parametrize("name", URL_NAMES)
def test_url_names_are_refused_without_touching_the_network(outside, name, monkeypatch):
    tmp, root = outside
    name = name.format(tmp=tmp)
    import fsspec

    def no_network(*a, **kw):
        raise AssertionError("fsspec was called")

    monkeypatch.setattr(fsspec, "open", no_network)
    monkeypatch.setattr(fsspec.core, "url_to_fs", no_network)
    with pytest.raises(UserError, match=r"^shard '.*': a URL; pass --allow-urls"):
        read_slices(str(root), name, [[0, 1]])


def test_file_url_is_read_when_urls_are_allowed(outside):
    tmp, root = outside
    b = read_slices(ShardRoot(str(root), allow_urls=True), f"file://{tmp}/secret.parquet", [[0, 3]])
    assert len(b) == 3


def test_url_root_confines_names_under_it():
    root = "s3://bucket/data"
    assert resolve(root, "a/b.parquet") == "s3://bucket/data/a/b.parquet"
    assert resolve(root, "s3://bucket/data/x.parquet") == "s3://bucket/data/x.parquet"
    for name in ("../other/x.parquet", "a/../../x.parquet", "/etc/passwd", "s3://bucket/other/x.parquet",
                 "s3://bucket/data/../other/x.parquet", "gs://bucket/data/x.parquet", "s3://bucket/database/x"):
        with pytest.raises(UserError, match=r"^shard '.*': (outside the shard root|a URL outside)"):
            resolve(root, name)
    assert resolve(ShardRoot(root, allow_urls=True), "gs://elsewhere/x") == "gs://elsewhere/x"


def test_shard_root_survives_pickling():
    r = ShardRoot("/data", allow_outside_root=True)
    r2 = pickle.loads(pickle.dumps(r))
    assert r2 == "/data" and r2.allow_outside_root and not r2.allow_urls and isinstance(r2, ShardRoot)


def test_a_symlink_inside_a_datasets_directory_pointing_out_is_refused(tmp_path):
    import datasets

    root = tmp_path / "root"
    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(root / "ds"))
    assert len(read_slices(str(root), "ds", [[0, 2]])) == 2
    (tmp_path / "secret").write_text("x")
    os.symlink(tmp_path / "secret", root / "ds" / "planted.json")
    with pytest.raises(UserError, match=r"^shard 'ds': outside the shard root .*planted\.json resolves to"):
        read_slices(str(root), "ds", [[0, 2]])


def test_megatron_idx_next_to_the_bin_obeys_the_rule(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    np.arange(10, dtype=np.uint16).tofile(root / "m.bin")
    (tmp_path / "m.idx").write_bytes(b"x")
    os.symlink(tmp_path / "m.idx", root / "m.idx")
    with pytest.raises(UserError, match=r"^shard 'm\.idx': outside the shard root"):
        read_slices(str(root), "m.bin", [[0, 1]])


def _manifest(tmp_path, names):
    m = manifest_from_arrays([1] * len(names), names, [0] * len(names), [2] * len(names))
    write_manifest(m, tmp_path / "manifest.parquet")
    return tmp_path / "manifest.parquet"


@pytest.mark.parametrize("name", BAD_NAMES + URL_NAMES)
def test_batch_refuses_names_outside_the_root_with_one_line(outside, name, capsys):
    tmp, root = outside
    name = name.format(tmp=tmp)
    man = _manifest(tmp, ["ok.parquet", name])
    assert main(["batch", "--manifest", str(man), "--shards", str(root), "--step", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(r"manifest\.parquet: row \d: shard", err[0]), err
    if "://" in name and "file" not in name:
        return
    flag = "--allow-urls" if "://" in name else "--allow-outside-root"
    assert main(["batch", "--manifest", str(man), "--shards", str(root), "--step", "1", flag]) == 0


def test_batch_without_shards_confines_to_the_current_directory(outside, monkeypatch, capsys):
    tmp, root = outside
    monkeypatch.chdir(root)
    man = _manifest(tmp, ["ok.parquet"])
    assert main(["batch", "--manifest", str(man), "--step", "1"]) == 0
    man = _manifest(tmp, [str(tmp / "secret.parquet")])
    assert main(["batch", "--manifest", str(man), "--step", "1"]) == 2
    assert "outside the shard root ." in capsys.readouterr().err


def test_manifest_checks_use_the_rule(outside):
    tmp, root = outside
    table = manifest_from_arrays([1, 1], ["ok.parquet", "../secret.parquet"], [0, 0], [2, 2])
    with pytest.raises(UserError, match=r"^m: row 1: shard '\.\./secret\.parquet': outside the shard root"):
        check_shard_bounds(table, "m", str(root))
    assert len(check_shard_bounds(table, "m", ShardRoot(str(root), allow_outside_root=True))) == 2


# ------------------------------------------------------------------------------------ the shards command


@pytest.mark.slow
def test_shards_lists_a_zero_row_shard_and_refuses_a_planted_symlink(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for k in range(4):
        pq.write_table(pa.table({"tokens": pa.array([rng.integers(0, 500, 40).tolist() for _ in range(30)],
                                                    pa.list_(pa.int64()))}), corpus / f"s{k}.parquet")
    pq.write_table(pa.table({"tokens": pa.array([], pa.list_(pa.int64()))}), corpus / "empty.parquet")
    out = tmp_path / "out"
    assert main(["shards", str(corpus), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "empty: empty.parquet: 0 rows" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["empty"] == [{"shard": "empty.parquet", "n_rows": 0}] and summary["shards"] == 4
    # a symlink planted inside the input directory, pointing out of it
    pq.write_table(_tokens_table(), tmp_path / "secret.parquet")
    os.symlink(tmp_path / "secret.parquet", corpus / "zz.parquet")
    assert main(["shards", str(corpus), "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shard 'zz.parquet': outside the shard root" in err[0]
    assert not (tmp_path / "out2").exists()


@pytest.mark.slow
def test_shards_with_a_null_row_deep_in_a_shard_is_a_one_line_error(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for k in range(3):
        toks = [[1, 2, 3, k]] * 50
        if k == 1:
            toks = toks[:40] + [None] + toks[41:]
        pq.write_table(pa.table({"tokens": pa.array(toks, pa.list_(pa.int64()))}), corpus / f"s{k}.parquet")
    assert main(["shards", str(corpus), "--out", str(tmp_path / "out"), "--batch-rows", "16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "s1.parquet: row 40: 'tokens' is null" in err[0], err


def test_fifo_as_row_losses_or_tokenizer_is_refused_at_once(tmp_path):
    from spike_audit.pipelines.run.row_losses import read_row_losses
    from spike_audit.pipelines.tokenizer import load_tokenizer

    os.mkfifo(tmp_path / "losses.npy")
    os.mkfifo(tmp_path / "tokenizer.json")
    for fn in (lambda: read_row_losses(str(tmp_path / "losses.npy")), lambda: load_tokenizer(tmp_path / "tokenizer.json")):
        _out, err = _finishes(fn)
        assert isinstance(err, UserError) and "not a regular file (a FIFO)" in str(err), err


def test_shards_discovery_refuses_a_fifo_in_an_input_directory(tmp_path):
    from spike_audit.pipelines.shard_audit.discover import discover

    pq.write_table(_tokens_table(), tmp_path / "a.parquet")
    os.mkfifo(tmp_path / "b.parquet")
    _out, err = _finishes(lambda: discover((str(tmp_path),)))
    assert isinstance(err, UserError) and str(err) == f"{tmp_path / 'b.parquet'}: not a regular file (a FIFO); expected a shard file"


def test_litdata_chunks_and_index_are_refused_by_name_never_read_as_tokens(tmp_path):
    """litdata's optimized datasets (litgpt's data format: index.json with 'chunks' + chunk-R-I.bin) are not
    supported: refused naming litdata, never read as MDS nor as a raw uint16 token file."""
    d = tmp_path / "lit"
    d.mkdir()
    (d / "index.json").write_text(json.dumps({"chunks": [{"chunk_bytes": 64, "chunk_size": 2, "filename":
                                                          "chunk-0-0.bin", "dim": 8}],
                                              "config": {"chunk_bytes": 1 << 20, "data_format": ["no_header_tensor:16"]},
                                              "updated_at": "1"}))
    for name in ("chunk-0-0.bin", "chunk-0-1.zstd.bin"):
        (d / name).write_bytes(np.arange(32, dtype=np.uint16).tobytes())
    for name in ("lit", "lit/index.json", "lit/chunk-0-0.bin", "lit/chunk-0-1.zstd.bin"):
        with pytest.raises(UserError, match="litdata"):
            read_slices(str(tmp_path), name, [[0, 1]], unit="row" if not name.endswith(".bin") else "token")
    # a raw token file that merely has such a name, with no litdata index beside it, is still a token file
    (tmp_path / "chunk-0-0.bin").write_bytes(np.arange(8, dtype=np.uint16).tobytes())
    assert read_slices(str(tmp_path), "chunk-0-0.bin", [[0, 4]], unit="token").column("tokens").to_pylist() == [[0, 1, 2, 3]]


# ------------------------------------------------------------------------- inputs that crashed Arrow's JSON reader

_NULL_CASES = [b"null\n", b'  null\n{"text": "a"}\n', b'{"text": "a"}\nnull\n{"text": "b"}\n',
               b'\xef\xbb\xbfnull\n{"text": "a"}\n']


@pytest.mark.parametrize("data", _NULL_CASES)
def test_a_jsonl_line_null_is_a_one_line_error_never_a_crash(tmp_path, data):
    """pyarrow 25's JSON reader dies with a segmentation fault on a block that starts with ``null``: a JSONL shard
    whose first line was ``null`` killed ``shards`` and ``batch`` (exit 139, no message). Run in a child process,
    so a crash fails this test instead of the test run."""
    import subprocess
    import sys

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(data)
    line = next(i for i, ln in enumerate(data.split(b"\n"), 1) if b"null" in ln)
    child = subprocess.run([sys.executable, "-m", "spike_audit.pipelines.cli", "shards", str(tmp_path / "in"),
                            "--out", str(tmp_path / "out"), "-q"], capture_output=True, text=True, timeout=300)
    assert child.returncode == 2, (child.returncode, child.stderr[-500:])
    err = child.stderr.strip().splitlines()
    assert len(err) == 1 and f"a.jsonl:{line}: expected a JSON object" in err[0], child.stderr


@given(lines=st.lists(st.sampled_from([b"{}", b' {"a": 1}', b"", b"  ", b"\t", b"null", b" [1]", b"1", b"{", b"\r",
                                       b" " * 40 + b"{}", b"\t" * 20 + b"null", b" \r" * 30]),
                      max_size=12), bom=st.booleans(), chunk=st.integers(1, 40))
@settings(max_examples=400, deadline=None)
def test_first_non_object_line_matches_a_line_by_line_reading(lines, bom, chunk):
    import io

    from spike_audit.pipelines.files import first_non_object_line

    data = (b"\xef\xbb\xbf" if bom else b"") + b"\n".join(lines)
    want = next((i for i, ln in enumerate(lines, 1) if ln.strip(b" \t\r\n") and not ln.lstrip(b" \t\r\n").startswith(b"{")),
                None)
    assert first_non_object_line(io.BytesIO(data), chunk=chunk) == want


def test_a_damaged_datasets_arrow_file_is_a_one_line_error(tmp_path):
    """An ``.arrow`` file is memory-mapped without validation: list offsets pointing past the values were an
    ArrowIndexError traceback (``shards`` and ``batch``), and reading through them could crash. The record batches
    a read touches are now validated first. In a child process, so that a crash fails the test."""
    import subprocess
    import sys

    t = pa.table({"tokens": pa.array([[10, 11, 12, 13], [14, 15, 16, 17]], pa.list_(pa.int64())), "text": ["a", "b"]})
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / "s.arrow"
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, t.schema) as w:
        w.write_table(t)
    data = path.read_bytes()
    good = np.array([0, 4, 8], np.int32).tobytes()
    assert data.count(good) == 1
    path.write_bytes(data.replace(good, np.array([0, 4, 100000], np.int32).tobytes()))
    child = subprocess.run([sys.executable, "-m", "spike_audit.pipelines.cli", "shards", str(tmp_path / "in"),
                            "--out", str(tmp_path / "out"), "-q"], capture_output=True, text=True, timeout=300)
    assert child.returncode == 2, (child.returncode, child.stderr[-800:])
    err = child.stderr.strip().splitlines()
    assert len(err) == 1 and "s.arrow: column 'tokens' rows 0..1 of the file are damaged" in err[0], child.stderr


def _hf_dir(path, rows):
    import datasets

    datasets.Dataset.from_dict({"tokens": [list(range(i, i + 8)) for i in range(rows)],
                                "text": [f"row {i}" for i in range(rows)]}).save_to_disk(str(path))


@pytest.mark.parametrize("filename", ["../../elsewhere/data.arrow", "/abs/data.arrow", "sub/data.arrow", ".."])
def test_a_datasets_state_naming_a_file_outside_its_directory_is_refused(tmp_path, filename):
    """``state.json`` of a ``save_to_disk`` directory names its data files; a name with a directory part was followed
    out of the directory (a file outside the shard root read without --allow-outside-root)."""
    ds = tmp_path / "root" / "esc"
    _hf_dir(ds, 5)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (ds / "data-00000-of-00001.arrow").rename(outside / "data.arrow")
    state = json.loads((ds / "state.json").read_text())
    state["_data_files"] = [{"filename": filename if not filename.startswith("../../") else
                             os.path.relpath(outside / "data.arrow", ds)}]
    (ds / "state.json").write_text(json.dumps(state))
    with pytest.raises(UserError, match=r"esc: .*state\.json names the data file .*expected a file name inside"):
        open_shard(str(tmp_path / "root"), "esc")


def test_a_datasets_directory_of_no_rows_is_a_one_line_error(tmp_path):
    _hf_dir(tmp_path / "root" / "empty", 0)
    with pytest.raises(UserError, match=r"empty: .*not a readable datasets directory"):
        open_shard(str(tmp_path / "root"), "empty")
    _hf_dir(tmp_path / "root" / "ok", 3)  # a good one beside it still reads
    assert shard_length(str(tmp_path / "root"), "ok") == 3


@pytest.mark.parametrize("bad", ["455.5", "455.0", "1e3"])
def test_jsonl_float_token_ids_are_refused_naming_the_line(tmp_path, bad):
    """Arrow converts floats to an integer type by truncation: 455.5 was read as token 455."""
    root = tmp_path / "root"
    root.mkdir()
    lines = ['{"tokens": [1, 2, 3], "text": "a"}'] * 3 + ['{"tokens": [4, %s, 6], "text": "b"}' % bad]
    (root / "s.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"s\.jsonl:4: expected 'tokens' to be a list of integer token ids"):
        read_slices(str(root), "s.jsonl", [[0, 4]])
    (root / "ok.jsonl").write_text("\n".join(lines[:3] + ['{"tokens": [], "text": "c"}']) + "\n")
    assert read_slices(str(root), "ok.jsonl", [[0, 4]]).column("tokens").to_pylist() == [[1, 2, 3]] * 3 + [[]]


def test_a_linked_directory_inside_an_input_directory_is_refused_or_followed_never_skipped(tmp_path):
    """A directory given as input holding a symlink to another directory of shards: its shards were silently left
    out (os.walk does not follow links) while the glob form refused the same link."""
    from spike_audit.pipelines.shard_audit.discover import discover

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    pq.write_table(pa.table({"tokens": [[1, 2, 3]] * 4}), outside / "b.parquet")
    d = tmp_path / "in"
    d.mkdir()
    pq.write_table(pa.table({"tokens": [[4, 5, 6]] * 4}), d / "a.parquet")
    (d / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UserError, match=r"shard 'link': outside the shard root .* pass --allow-outside-root"):
        discover((str(d),))
    names = sorted(s.name for s in discover((str(d),), allow_outside_root=True))
    assert names == ["a.parquet", "link/b.parquet"]
    # a link back into the walked tree (a loop) is walked once, with or without the flag
    (d / "sub").mkdir()
    (d / "link").unlink()
    (d / "sub" / "loop").symlink_to(d, target_is_directory=True)
    assert [s.name for s in discover((str(d),))] == ["a.parquet"]
    assert [s.name for s in discover((str(d),), allow_outside_root=True)] == ["a.parquet"]


def test_jsonl_text_with_a_lone_surrogate_says_so(tmp_path):
    """JSON can escape a lone surrogate (\\ud800), which no UTF-8 text holds: the error said the value was not a
    string."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "s.jsonl").write_text('{"tokens": [1, 2], "text": "ok"}\n{"tokens": [3], "text": "bad \\ud800 x"}\n')
    with pytest.raises(UserError, match=r"s\.jsonl:2: 'text' is not valid Unicode text \(a lone surrogate"):
        read_slices(str(root), "s.jsonl", [[0, 2]])


@pytest.mark.parametrize("url", ["gs://bucket/tokenizer.json", "s3://bucket/tok/"])
def test_a_tokenizer_url_says_it_is_read_locally_only(url):
    """A tokenizer URL was reported as 'tokenizer file not found', as if the file were missing."""
    from spike_audit.pipelines.tokenizer import load_tokenizer

    with pytest.raises(UserError, match=r"the tokenizer is read from a local path only"):
        load_tokenizer(url)


def test_invalid_utf8_in_a_parquet_string_column_names_the_row(tmp_path):
    """A Parquet writer can store any bytes in a string column; decoding them was a UnicodeDecodeError or an
    ArrowInvalid traceback in `batch`, `run` and `shards`."""
    texts = [f"row {i}".encode() for i in range(50)]
    texts[37] = b"\xff\xfe" + texts[37]
    offs = np.cumsum([0] + [len(x) for x in texts]).astype(np.int32)
    text = pa.Array.from_buffers(pa.string(), len(texts), [None, pa.py_buffer(offs.tobytes()), pa.py_buffer(b"".join(texts))])
    root = tmp_path / "root"
    root.mkdir()
    pq.write_table(pa.table({"tokens": [[1, 2, 3]] * 50, "text": text}), root / "s.parquet")
    with pytest.raises(UserError, match=r"s\.parquet: row 37: 'text' is not valid UTF-8 text"):
        read_slices(str(root), "s.parquet", [[0, 50]])
    assert len(read_slices(str(root), "s.parquet", [[0, 37]])) == 37  # the rows before it read


def test_a_jsonl_key_that_is_not_utf8_is_a_one_line_error_naming_the_line(tmp_path, capsys):
    """Found by the suite's fuzzing: Arrow's JSON reader accepted a key of invalid UTF-8 bytes and the column name
    then raised UnicodeDecodeError (a traceback) when read."""
    from spike_audit.pipelines.cli.main import main

    d = tmp_path / "shards"
    d.mkdir()
    (d / "a.jsonl").write_bytes(b'{"tokens": [1, 2]}\n{"\xf4okens": null}\n{"tokens": [3]}\n')
    rc = main(["-q", "shards", str(d), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "a.jsonl:" in err and "expected a JSON object" in err, err
