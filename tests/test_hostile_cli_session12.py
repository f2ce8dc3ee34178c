"""The bad inputs of session 12's hostile-input campaigns, each through the command line as a user meets it: exit 2
and one line on stderr naming the file (and row or line) and what was expected, never a traceback. (Each also has a
test at the function that refuses it, next to that function's other tests.)"""

from __future__ import annotations

import io
import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spike_audit.pipelines.cli.main import main

MDS = Path(__file__).parent / "fixtures" / "mds" / "mixed_zstd"


def _refused(capsys, argv, pattern):
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, (rc, err)
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert re.search(pattern, err), (pattern, err)


def _megatron_log(path, n=60):
    path.write_text("".join(f" iteration {s:8d}/     100 | consumed samples: {16 * s:8d} | lm loss: "
                            f"{3.0 + (s % 5) / 10:E} | grad norm: 1.0 |\n" for s in range(1, n + 1)))


def test_a_log_with_a_crash_zeroed_block_under_strict(tmp_path, capsys):
    log = tmp_path / "train.log"
    _megatron_log(log)
    data = log.read_bytes()
    a, b = data.index(b"iteration       10/") + 30, data.index(b"iteration       20/") + 30
    log.write_bytes(data[:a] + b"\x00" * (b - a) + data[b:])
    _refused(capsys, ["spikes", str(log), "--strict", "--out", str(tmp_path / "o")],
             r"train\.log:10: expected 'iteration <int>/ <int>")


def test_a_token_file_header_with_an_unknown_magic(tmp_path, capsys):
    h = np.zeros(256, np.int32)
    h[:3] = [1234, 1, 5000]
    (tmp_path / "d_000000.bin").write_bytes(h.tobytes() + np.arange(5000, dtype=np.uint16).tobytes())
    _refused(capsys, ["manifest", "sequential", "--variant", "modded-nanogpt", "--data-files", "d_000000.bin",
                      "--shards", str(tmp_path), "-B", "2", "-T", "64", "--num-steps", "2",
                      "--out", str(tmp_path / "m.parquet")],
             r"d_000000\.bin: starts with a 1,024-byte token header .* magic 1234")


def _shards(tmp_path, capsys, root, pattern, *extra):
    _refused(capsys, ["shards", str(root), "--out", str(tmp_path / "out"), *extra], pattern)


def test_a_datasets_directory_naming_a_file_outside_it(tmp_path, capsys):
    import datasets

    ds = tmp_path / "root" / "esc"
    datasets.Dataset.from_dict({"tokens": [[1, 2, 3]] * 4}).save_to_disk(str(ds))
    (tmp_path / "out_of_root").mkdir()
    (ds / "data-00000-of-00001.arrow").rename(tmp_path / "out_of_root" / "x.arrow")
    state = json.loads((ds / "state.json").read_text())
    state["_data_files"] = [{"filename": "../../out_of_root/x.arrow"}]
    (ds / "state.json").write_text(json.dumps(state))
    _shards(tmp_path, capsys, tmp_path / "root", r"esc: .*state\.json names the data file '\.\./\.\./out_of_root/x\.arrow'")


def test_jsonl_float_token_ids(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "s.jsonl").write_text('{"tokens": [1, 2, 3]}\n{"tokens": [4, 455.5, 6]}\n')
    _shards(tmp_path, capsys, tmp_path / "r", r"s\.jsonl:2: expected 'tokens' to be a list of integer token ids")


def test_a_megatron_index_pointer_inside_a_token(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    p = tmp_path / "r" / "d"
    with open(f"{p}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 4) + struct.pack("<QQ", 2, 3))
        f.write(np.array([4, 4], np.int32).tobytes() + np.array([1, 17], np.int64).tobytes()
                + np.arange(3, dtype=np.int64).tobytes())
    (tmp_path / "r" / "d.bin").write_bytes(np.arange(12, dtype=np.int32).tobytes())
    _shards(tmp_path, capsys, tmp_path / "r", r"d\.bin: row 0: the index puts this sequence at byte 1, not a multiple")


def _mds_copy(tmp_path) -> Path:
    d = tmp_path / "r" / "ds"
    shutil.copytree(MDS, d)
    return d


def test_mds_negative_token_ids(tmp_path, capsys):
    import zstandard

    d = _mds_copy(tmp_path)
    index = json.loads((d / "index.json").read_text())
    first = index["shards"][0]
    z = d / first["zip_data"]["basename"]
    raw = zstandard.ZstdDecompressor().decompress(z.read_bytes(), max_output_size=1 << 20)
    at = re.search(rb"\[\d+, \d", raw).end() - 3
    z.write_bytes(zstandard.ZstdCompressor().compress(raw[:at] + b",-" + raw[at + 2:]))
    first["zip_data"]["bytes"] = z.stat().st_size
    (d / "index.json").write_text(json.dumps(index))
    _shards(tmp_path, capsys, d, r"sample 0: token id -\d+ is not a token id", "--tokens-column", "j")


@pytest.mark.parametrize("damage, pattern", [("samples", r"samples 1\.7, expected an integer count"),
                                             ("empty", r"the compressed shard file is empty")])
def test_mds_index_and_shard_damage(tmp_path, capsys, damage, pattern):
    d = _mds_copy(tmp_path)
    index = json.loads((d / "index.json").read_text())
    if damage == "samples":
        index["shards"][0]["samples"] = 1.7
        (d / "index.json").write_text(json.dumps(index))
    else:
        (d / index["shards"][0]["zip_data"]["basename"]).write_bytes(b"")
    _shards(tmp_path, capsys, d, pattern)


def test_invalid_utf8_in_a_parquet_text_column(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    texts = [f"row {i}".encode() for i in range(20)]
    texts[7] = b"\xff" + texts[7]
    offs = np.cumsum([0] + [len(x) for x in texts]).astype(np.int32)
    text = pa.Array.from_buffers(pa.string(), 20, [None, pa.py_buffer(offs.tobytes()), pa.py_buffer(b"".join(texts))])
    pq.write_table(pa.table({"tokens": [[1, 2, 3, 4]] * 20, "text": text}), tmp_path / "r" / "s.parquet")
    _shards(tmp_path, capsys, tmp_path / "r", r"s\.parquet: row 7: 'text' is not valid UTF-8 text")


def test_a_tokenizer_url(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    pq.write_table(pa.table({"tokens": [[1, 2, 3, 4]] * 8}), tmp_path / "r" / "s.parquet")
    _shards(tmp_path, capsys, tmp_path / "r", r"gs://b/tokenizer\.json: the tokenizer is read from a local path only",
            "--tokenizer", "gs://b/tokenizer.json")


def test_a_negative_sample_in_epoch(tmp_path, capsys):
    shutil.copytree(MDS, tmp_path / "mds" / "mixed_zstd")
    _refused(capsys, ["manifest", "streaming", "--data", "mixed_zstd", "--shards", str(tmp_path / "mds"),
                      "--batch-size", "4", "--sample-in-epoch", "-1", "--out", str(tmp_path / "m.parquet")],
             r"sample_in_epoch -1: expected a non-negative count")


@pytest.mark.parametrize("epochs", ["nan", "inf"])
def test_hf_epochs_that_are_not_finite(tmp_path, capsys, epochs):
    import datasets

    datasets.Dataset.from_dict({"input_ids": [list(range(i, i + 8)) for i in range(40)]}).save_to_disk(
        str(tmp_path / "hf" / "train"))
    _refused(capsys, ["manifest", "hf", "--data", "train", "--shards", str(tmp_path / "hf"),
                      "--per-device-train-batch-size", "4", "--num-train-epochs", epochs,
                      "--out", str(tmp_path / "m.parquet")],
             rf"--num-train-epochs {epochs}: expected a finite number of epochs")


@pytest.mark.slow
def test_run_with_a_corrupt_manifest_page(demo, tmp_path, capsys):
    root, _ = demo
    src = root / "run" / "manifest.parquet"
    data = bytearray(src.read_bytes())
    at = pq.ParquetFile(src).metadata.row_group(0).column(0).data_page_offset
    for i in range(at + 30, at + 60):
        data[i] ^= 0xFF
    (tmp_path / "manifest.parquet").write_bytes(bytes(data))
    _refused(capsys, ["run", "--log", str(root / "run" / "train.log"), "--manifest", str(tmp_path / "manifest.parquet"),
                      "--shards", str(root / "run" / "shards"), "--out", str(tmp_path / "out")],
             r"manifest\.parquet: .*not a readable Parquet manifest")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_run_with_a_manifest_whose_metadata_divides_by_zero(demo, tmp_path, capsys):
    root, _ = demo
    t = pq.read_table(root / "run" / "manifest.parquet")
    md = dict(t.schema.metadata)
    meta = json.loads(md[b"spike_audit.manifest"])
    meta["samples_per_step"] = 0
    md[b"spike_audit.manifest"] = json.dumps(meta).encode()
    pq.write_table(t.replace_schema_metadata(md), tmp_path / "manifest.parquet")
    _refused(capsys, ["run", "--log", str(root / "run" / "train.log"), "--manifest", str(tmp_path / "manifest.parquet"),
                      "--shards", str(root / "run" / "shards"), "--out", str(tmp_path / "out")],
             r"manifest\.parquet: manifest metadata samples_per_step = 0, expected a positive integer")
