"""MDS reader: fixtures written by mosaicml-streaming 0.13's own MDSWriter (zstd, mixed encodings,
several shards; a pickled column), plus a hand-built shard for the corrupt-file errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.shards.mds import MDSReader, is_mds, read_mds_index

FIX = Path(__file__).parent / "fixtures" / "mds"
TRUTH = json.loads((FIX / "mixed_zstd_tokens.json").read_text())


@pytest.mark.parametrize("col,dtype,shift", [("tokens", None, 0), ("j", None, 0), ("b", "int64", 0), ("u", None, 70000)])
def test_every_token_encoding_gives_the_written_tokens(col, dtype, shift):
    r = MDSReader(str(FIX / "mixed_zstd"), "mixed_zstd", tokens_col=col, dtype=dtype)
    assert r.length() == len(TRUTH)
    rows = np.array([[0, 24]])
    got = r.read(rows).column("tokens").to_pylist()
    assert got == [[t + shift for t in row] for row in TRUTH]


def test_rows_in_request_order_across_shards_with_text():
    r = MDSReader(str(FIX / "mixed_zstd"), "m")
    assert len(r.shards) > 3
    b = r.read(np.array([[20, 22], [3, 4], [11, 13]]))
    assert b.column("row").to_pylist() == [20, 21, 3, 11, 12]
    assert b.column("text").to_pylist() == [f"row {i} — ünï" for i in (20, 21, 3, 11, 12)]
    assert b.column("tokens").to_pylist() == [TRUTH[i] for i in (20, 21, 3, 11, 12)]


def test_one_shard_file_is_its_own_rows():
    shards = read_mds_index(str(FIX / "mixed_zstd"))
    second = Path(shards[1].zip)
    r = MDSReader(str(second), second.name)
    n0 = shards[0].samples
    assert r.length() == shards[1].samples
    assert r.read(np.array([[0, r.length()]])).column("tokens").to_pylist() == TRUTH[n0:n0 + shards[1].samples]
    assert is_mds(str(second)) and is_mds(str(FIX / "mixed_zstd")) and not is_mds(str(FIX))


def test_pickle_is_refused_never_unpickled():
    r = MDSReader(str(FIX / "pickled"), "pickled")
    with pytest.raises(UserError, match="pickled.*'pkl'.*never unpickles"):
        r.read(np.array([[0, 1]]))
    # the text column alone is fine
    assert MDSReader(str(FIX / "pickled"), "p", tokens_col="none").read(np.array([[0, 3]])).column("text").to_pylist() == ["x"] * 3


def test_bytes_tokens_need_a_dtype():
    with pytest.raises(UserError, match="'bytes': pass the token dtype"):
        MDSReader(str(FIX / "mixed_zstd"), "m", tokens_col="b").read(np.array([[0, 1]]))


def test_bad_inputs_are_one_line_errors(tmp_path):
    d = tmp_path / "ds"
    shutil.copytree(FIX / "mixed_zstd", d)
    idx = json.loads((d / "index.json").read_text())
    idx["shards"][0]["format"] = "json"
    (d / "index.json").write_text(json.dumps(idx))
    with pytest.raises(UserError, match="shard 0: format 'json' is not supported"):
        MDSReader(str(d), "ds")
    idx["shards"][0]["format"] = "mds"
    idx["shards"][0]["compression"] = "br"
    (d / "index.json").write_text(json.dumps(idx))
    with pytest.raises(UserError, match="compression 'br' is not supported"):
        MDSReader(str(d), "ds").read(np.array([[0, 1]]))
    idx["version"] = 1
    (d / "index.json").write_text(json.dumps(idx))
    with pytest.raises(UserError, match="index version 1"):
        MDSReader(str(d), "ds")
    with pytest.raises(UserError, match="no index.json"):
        MDSReader(str(tmp_path), "x")


def test_stale_index_is_detected(tmp_path):
    d = tmp_path / "p"
    shutil.copytree(FIX / "pickled", d)
    idx = json.loads((d / "index.json").read_text())
    idx["shards"][0]["samples"] = 5
    (d / "index.json").write_text(json.dumps(idx))
    with pytest.raises(UserError, match="does not start with its sample count 5"):
        MDSReader(str(d), "p", tokens_col="none").read(np.array([[0, 1]]))


def test_open_shard_and_the_cli_read_mds(tmp_path):
    from spike_audit.pipelines.shards.read import read_slices, shard_format, shard_length

    assert shard_format(str(FIX / "mixed_zstd")) == "mds"
    assert shard_length(str(FIX), "mixed_zstd") == len(TRUTH)
    b = read_slices(str(FIX), "mixed_zstd", np.array([[5, 7]]))
    assert b.column("tokens").to_pylist() == TRUTH[5:7]


def test_a_shard_too_short_for_its_offsets_or_sizes_is_a_one_line_error(tmp_path):
    """Found by the fuzz test: a shard holding only its sample count (or offsets that leave no room for the
    per-sample size fields) is refused naming the shard file, never an IndexError."""
    import struct

    import zstandard

    d = tmp_path / "m"
    shutil.copytree(FIX / "mixed_zstd", d)
    first = read_mds_index(str(d))[0]
    Path(first.zip).write_bytes(zstandard.ZstdCompressor().compress(struct.pack("<I", first.samples)))
    with pytest.raises(UserError, match=r"shard\.00000\.mds: 4 bytes cannot hold the offsets of its 1 samples"):
        MDSReader(str(d), "m").read(np.array([[0, 1]]))
    # offsets pointing at a sample too short for its size fields
    body = struct.pack("<I", 1) + struct.pack("<II", 12, 14) + b"\0\0"
    Path(first.zip).write_bytes(zstandard.ZstdCompressor().compress(body))
    with pytest.raises(UserError, match=r"shard\.00000\.mds: sample offsets are corrupt"):
        MDSReader(str(d), "m").read(np.array([[0, 1]]))


@pytest.mark.parametrize("field,value,match", [
    ("zip_data", "x", r"shard 3: missing or malformed field"),  # was AttributeError: 'str' object has no 'get'
    ("raw_data", True, r"shard 3: missing or malformed field"),
    ("compression", ["zstd"], r"shard 3: compression \['zstd'\], expected a name"),
    ("column_names", [1, "j", "text", "tokens", "u"], r"shard 3: column_names and column_encodings must be strings"),
    ("column_sizes", [None, -4, None, None, None], r"shard 3: column_sizes must be non-negative integers or null"),
    ("samples", -2, r"shard 3: samples -2, expected a non-negative count"),
    ("samples", 1.7, r"shard 3: samples 1\.7, expected an integer count"),  # were taken as int(): 1
    ("samples", "1", r"shard 3: samples '1', expected an integer count"),
])
def test_a_damaged_index_field_is_a_one_line_error_naming_the_shard(tmp_path, field, value, match):
    """Found by mutating the fields of a real index.json: a field of the wrong JSON type was a traceback."""
    d = tmp_path / "ds"
    shutil.copytree(FIX / "mixed_zstd", d)
    idx = json.loads((d / "index.json").read_text())
    idx["shards"][3][field] = value
    (d / "index.json").write_text(json.dumps(idx))
    with pytest.raises(UserError, match=match) as e:
        read_mds_index(str(d), "ds")
    assert "\n" not in str(e.value)


def test_a_damaged_index_is_one_line_and_exit_2_at_the_command_line(tmp_path, capsys):
    from spike_audit.pipelines.cli.main import main

    d = tmp_path / "in" / "ds"
    shutil.copytree(FIX / "mixed_zstd", d)
    idx = json.loads((d / "index.json").read_text())
    idx["shards"][3]["zip_data"] = "x"
    (d / "index.json").write_text(json.dumps(idx))
    assert main(["shards", str(d), "--out", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shard 3: missing or malformed field" in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_negative_token_id_is_refused_naming_the_sample(tmp_path):
    """A signed token column (json lists, or an ndarray of int16/int32/int64) can hold negative ids: they were
    returned as tokens (found by the fuzz test); now refused like every other format's, naming the sample."""
    import zstandard

    src = FIX / "mixed_zstd"
    dst = tmp_path / "neg"
    shutil.copytree(src, dst)
    index = json.loads((dst / "index.json").read_text())
    first = index["shards"][0]
    zpath = dst / first["zip_data"]["basename"]
    raw = zstandard.ZstdDecompressor().decompress(zpath.read_bytes(), max_output_size=1 << 20)
    import re

    at = re.search(rb"\[\d+, \d", raw).end() - 3  # inside the first sample's json token list: ", 12" -> ",-12"
    raw = raw[:at] + b",-" + raw[at + 2:]
    zpath.write_bytes(zstandard.ZstdCompressor().compress(raw))
    first["zip_data"]["bytes"] = zpath.stat().st_size
    (dst / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=r"shard\.00000\.mds.*: sample 0: token id -\d+ is not a token id"):
        MDSReader(str(dst), "neg", tokens_col="j").read(np.array([[0, 2]]))
    # the other columns of the same shard are still read
    assert MDSReader(str(dst), "neg").read(np.array([[0, 2]])).column("tokens").to_pylist() == TRUTH[:2]


def test_an_empty_compressed_shard_file_says_so(tmp_path):
    """An empty .mds.zstd was reported as a shard not starting with its sample count."""
    d = tmp_path / "ds"
    shutil.copytree(FIX / "mixed_zstd", d)
    first = json.loads((d / "index.json").read_text())["shards"][0]["zip_data"]["basename"]
    (d / first).write_bytes(b"")
    with pytest.raises(UserError, match=r"shard\.00000\.mds\.zstd: the compressed shard file is empty"):
        MDSReader(str(d), "ds").read(np.array([[0, 1]]))
