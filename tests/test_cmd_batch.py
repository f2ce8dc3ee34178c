"""``spike-audit batch`` and the tokenizer helpers."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spike_audit.pipelines.cli.main import main
from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.manifest import manifest_from_arrays, with_meta, write_manifest
from spike_audit.pipelines.tokenizer import decode_batch, load_tokenizer

CORPUS = ["the cat sat on the mat", "a dog barked at the mailman", "hello world, hello tokens", "numbers 12345 and ünïcode"]


@pytest.fixture
def tokenizer_path(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    tok.train_from_iterator(CORPUS * 5, trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture
def run(tmp_path, tokenizer_path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    root = tmp_path / "shards"
    root.mkdir()
    eot = tok.token_to_id("<|endoftext|>")
    ids = [tok.encode(t).ids for t in CORPUS]
    flat = np.concatenate([np.array(i + [eot]) for i in ids]).astype(np.uint16)
    flat.tofile(root / "tokens.bin")
    starts = np.concatenate([[0], np.cumsum([len(i) + 1 for i in ids])])
    pq.write_table(pa.table({"text": [f"row {i}: " + CORPUS[i % 4] for i in range(40)]}), root / "docs.parquet",
                   row_group_size=10)
    m = manifest_from_arrays(
        [1, 1, 1, 2], ["docs.parquet", "tokens.bin", "tokens.bin", "docs.parquet"],
        [5, starts[1], starts[3], 30], [8, starts[1] + len(ids[1]), starts[4], 40],
        ["row", "token", "token", "row"], rank=[0, 1, 1, 0])
    write_manifest(m, tmp_path / "manifest.parquet")
    return tmp_path, root, ids


def test_decode_round_trip(tokenizer_path):
    tok = load_tokenizer(tokenizer_path)
    ids = [np.array(tok.encode(t).ids, np.uint16) for t in CORPUS]
    assert decode_batch(tok, ids) == CORPUS
    with pytest.raises(UserError, match="sequence 1: token id 99999 is outside the tokenizer's vocabulary"):
        decode_batch(tok, [ids[0], np.array([1, 99999])])
    with pytest.raises(UserError, match="tokenizer file not found"):
        load_tokenizer(tokenizer_path.parent / "missing.json")


def test_batch_text_output(run, tokenizer_path, capsys):
    tmp, root, ids = run
    rc = main(["batch", "--manifest", str(tmp / "manifest.parquet"), "--shards", str(root), "--step", "1",
               "--tokenizer", str(tokenizer_path), "--max-chars", "80"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.splitlines()[0].startswith("step 1: 3 slices, 5 sequences")
    assert "docs.parquet rows [5, 8) rank=0: 3 sequences" in out
    for i in (5, 6, 7):
        assert f"row {i}: {CORPUS[i % 4]}" in out
    assert CORPUS[1] in out  # decoded from tokens.bin
    assert CORPUS[3] + "<|endoftext|>" in out  # special tokens are shown


def test_batch_json_counts(run, tokenizer_path, capsys):
    tmp, root, ids = run
    assert main(["batch", "--manifest", str(tmp / "manifest.parquet"), "--shards", str(root), "--step", "1",
                 "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["n_slices"] == 3 and rep["n_sequences"] == 5
    assert rep["n_tokens"] == len(ids[1]) + len(ids[3]) + 1  # text-only rows have no tokens
    tok_slices = [s for s in rep["slices"] if s["unit"] == "token"]
    assert [s["n_tokens"] for s in tok_slices] == [len(ids[1]), len(ids[3]) + 1]
    assert tok_slices[0]["sequences"][0]["excerpt_kind"] == "token_ids"  # no tokenizer given
    assert tok_slices[0]["sequences"][0]["excerpt"].split()[:3] == [str(x) for x in ids[1][:3]]


def test_limit(run, capsys):
    tmp, root, _ = run
    assert main(["batch", "--manifest", str(tmp / "manifest.parquet"), "--shards", str(root), "--step", "2",
                 "--limit", "4"]) == 0
    out = capsys.readouterr().out
    assert "row 33:" in out and "row 34:" not in out and "... 6 more sequences" in out


def _err(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    return err


def test_one_line_errors(run, capsys, tmp_path):
    tmp, root, _ = run
    base = ["batch", "--shards", str(root)]
    err = _err(capsys, base + ["--manifest", str(tmp / "nope.parquet"), "--step", "1"])
    assert "nope.parquet: manifest not found" in err
    err = _err(capsys, base + ["--manifest", str(tmp / "manifest.parquet"), "--step", "9"])
    assert "manifest.parquet: step 9 is not in the manifest (steps 1..2)" in err
    bad = manifest_from_arrays([1, 1], ["tokens.bin", "docs.parquet"], [0, 0], [3, 50], ["token", "row"])
    write_manifest(bad, tmp / "bad.parquet")
    err = _err(capsys, base + ["--manifest", str(tmp / "bad.parquet"), "--step", "1"])
    assert err.endswith("bad.parquet: row 0: slice [0, 50) of shard 'docs.parquet' is past its end (40 rows)"), err
    write_manifest(manifest_from_arrays([1], ["gone.parquet"], [0], [1]), tmp / "bad.parquet")
    err = _err(capsys, base + ["--manifest", str(tmp / "bad.parquet"), "--step", "1"])
    assert "bad.parquet: row 0: shard 'gone.parquet' not found" in err


def test_batch_reads_the_manifests_token_dtype(tmp_path, capsys):
    # uint32 tokens (a vocabulary over 65,535): read as uint16 they would be other data
    root = tmp_path / "shards"
    root.mkdir()
    toks = (np.arange(64, dtype=np.uint32) + 100_000)
    toks.tofile(root / "big.bin")
    m = with_meta(manifest_from_arrays([0], "big.bin", [8], [16], "token"), token_dtype="uint32", trainer="olmo")
    write_manifest(m, tmp_path / "m.parquet")
    assert main(["batch", "--manifest", str(tmp_path / "m.parquet"), "--shards", str(root), "--step", "0",
                 "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["slices"][0]["sequences"][0]["excerpt"].split()[:2] == ["100008", "100009"]
    assert rep["n_tokens"] == 8
    err = _err(capsys, ["batch", "--manifest", str(tmp_path / "m.parquet"), "--shards", str(root), "--step", "0",
                        "--dtype", "uint16"])
    assert "--dtype uint16 but the manifest records token dtype uint32" in err


def test_log_step_uses_the_recorded_trainers_numbering(tmp_path, capsys):
    root = tmp_path / "shards"
    root.mkdir()
    np.arange(64, dtype=np.uint16).tofile(root / "t.bin")
    m = with_meta(manifest_from_arrays([0, 1], "t.bin", [0, 8], [8, 16], "token"), trainer="megatron")
    write_manifest(m, tmp_path / "m.parquet")
    base = ["batch", "--manifest", str(tmp_path / "m.parquet"), "--shards", str(root), "--json"]
    assert main(base + ["--log-step", "2"]) == 0  # Megatron's iteration 2 is the second batch, index 1
    rep = json.loads(capsys.readouterr().out)
    assert rep["step"] == 1 and rep["log_step"] == 2 and rep["slices"][0]["row_start"] == 8
    assert rep["slices"][0]["epoch"] is None  # unknown for a hand-made manifest
    assert main(base[:-1] + ["--step", "0"]) == 0
    assert "step 0 (megatron iteration 1)" in capsys.readouterr().out
    # Megatron counts from 1: log step 0 is no batch, and the error shows the join
    err = _err(capsys, base + ["--log-step", "0"])
    assert ("log step 0 is batch index -1 in megatron's numbering (log step = batch index + 1), not in the manifest "
            "(steps 0..1; log steps 1..2)") in err
    write_manifest(manifest_from_arrays([0], "t.bin", [0], [8], "token"), tmp_path / "m.parquet")
    err = _err(capsys, base + ["--log-step", "1"])
    assert "--log-step needs the trainer's step numbering but it records no trainer" in err


@pytest.mark.parametrize("fmt", ["parquet", "hf", "jsonl", "jsonl.gz"])
def test_batch_names_the_token_column_it_did_not_read(tmp_path, capsys, caplog, fmt):
    """A shard whose token ids live under another name (``input_ids``) is read as text only: the step's token
    count is not shown as 0, and the integer-list column is named with the option that reads it."""
    root = tmp_path / "shards"
    root.mkdir()
    table = pa.table({"input_ids": [[1, 2, 3, 4][: 1 + i % 4] for i in range(10)], "text": [f"doc {i}" for i in range(10)]})
    if fmt == "parquet":
        name = "a.parquet"
        pq.write_table(table, root / name)
    elif fmt.startswith("jsonl"):
        import gzip

        name = f"a.{fmt}"
        body = "".join(json.dumps(r) + "\n" for r in table.to_pylist()).encode()
        (root / name).write_bytes(gzip.compress(body) if fmt.endswith(".gz") else body)
    else:
        import datasets

        name = "a_ds"
        datasets.Dataset(table).save_to_disk(str(root / name))
    write_manifest(manifest_from_arrays([0], [name], [2], [5], ["row"]), tmp_path / "m.parquet")
    args = ["batch", "--manifest", str(tmp_path / "m.parquet"), "--shards", str(root), "--step", "0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "0 tokens (and 3 sequences of text only)" in out.splitlines()[0]
    assert f"{name}: no 'tokens' column, token counts not read; its integer-list column 'input_ids': give " \
           "--tokens-column input_ids" in out
    assert "tokens not read" in out and "[2] text | doc 2" in out
    assert main(args + ["--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["slices"][0]["n_tokens"] is None and rep["slices"][0]["tokens_read"] is False
    assert rep["text_only_shards"] == [{"shard": name, "integer_list_columns": ["input_ids"]}]
    assert main(args + ["--tokens-column", "input_ids", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["n_tokens"] == 3 + 4 + 1 and rep["text_only_shards"] == []  # rows 2, 3, 4 hold 3, 4 and 1 ids
    assert [q["n_tokens"] for q in rep["slices"][0]["sequences"]] == [3, 4, 1]

    caplog.set_level("WARNING")
    assert main(["shards", str(root), "--out", str(tmp_path / "audit")]) == 0
    assert any("1 shard(s) have no 'tokens' column and are read as text only" in r.getMessage()
               and "--tokens-column input_ids" in r.getMessage() for r in caplog.records)
