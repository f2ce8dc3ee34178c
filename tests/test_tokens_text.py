"""Text signals from tokens: the run's tokenizer decodes token-only shards in batches (the text signals then
equal those of the same shards carrying that text), and gives the EOS / pad ids when they are not given."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.tokenizer import decode_tokens, load_tokenizer, special_ids


def _tokenizer(path, specials):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    text = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=120, special_tokens=specials, show_progress=False))
    tok.save(str(path))
    return tok


def test_special_ids_from_names_configs_and_pad_equal_to_eos(tmp_path):
    tok = _tokenizer(tmp_path / "a.json", ["<pad>", "</s>", "<|endoftext|>"])
    sp = special_ids(tmp_path / "a.json")  # a bare tokenizer.json: by name, first in EOS_NAMES order
    assert (sp.eos_token, sp.eos_id, sp.pad_token, sp.pad_id) == ("<|endoftext|>", tok.token_to_id("<|endoftext|>"),
                                                                   "<pad>", tok.token_to_id("<pad>"))
    d = tmp_path / "dir"
    d.mkdir()
    shutil.copy(tmp_path / "a.json", d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}, "pad_token": "</s>"}))
    sp = special_ids(d)  # the directory's config wins; a pad equal to the EOS is no pad
    assert (sp.eos_token, sp.eos_id, sp.pad_id, sp.source) == ("</s>", tok.token_to_id("</s>"), None,
                                                               "tokenizer_config.json")
    (d / "tokenizer_config.json").unlink()
    (d / "config.json").write_text(json.dumps({"eos_token_id": [tok.token_to_id("<pad>")]}))
    assert special_ids(d).eos_id == tok.token_to_id("<pad>")
    _tokenizer(tmp_path / "b.json", [])
    assert (special_ids(tmp_path / "b.json").eos_id, special_ids(tmp_path / "b.json").pad_id) == (None, None)


def test_megatron_pad_is_the_tokenizers_unless_it_is_another_special_token(tmp_path):
    """megatron-core keeps a pad id only when it collides with no other special token (else -1: no pad)."""
    from spike_audit.pipelines.tokenizer import megatron_pad_id

    d = tmp_path / "tok"
    d.mkdir()
    tok = _tokenizer(d / "tokenizer.json", ["<unk>", "<pad>", "</s>"])
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}))
    assert megatron_pad_id(d) == tok.token_to_id("<pad>")
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>"}))
    assert megatron_pad_id(d) is None  # pad = unk (a common setting): megatron-core feeds no pad
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "</s>"}))
    assert megatron_pad_id(d) is None  # pad = EOS


def test_decode_tokens_equals_decoding_each_row(tmp_path):
    tok = _tokenizer(tmp_path / "t.json", ["<|endoftext|>"])
    rows = [tok.encode("the lazy dog").ids + [0] + tok.encode("five jugs").ids, None, [], tok.encode("fox").ids]
    got = decode_tokens(tok, pa.array(rows, pa.list_(pa.int64()))).to_pylist()
    assert got == [tok.decode(r) if r is not None else None for r in rows]
    assert "<|endoftext|>" not in got[0]  # special tokens are markup, not text
    assert decode_tokens(tok, pa.array([rows[0]], pa.list_(pa.int64())), max_tokens=2).to_pylist() == [
        tok.decode(rows[0][:2])]
    with pytest.raises(UserError, match="token id 5000 is outside the tokenizer's vocabulary"):
        decode_tokens(tok, pa.array([[1, 5000]], pa.list_(pa.int64())))
    assert load_tokenizer(tmp_path / "t.json").get_vocab_size() == tok.get_vocab_size()


def _scores(path, key="step"):
    t = pq.read_table(path).to_pylist()
    return sorted((r[key], r.get("role"), r["n_rows"], r["n_tokens"],
                   [(s["name"], None if s["value"] is None else round(s["value"], 12)) for s in r["signals"]])
                  for r in t)


def _text_signal_values(path):
    vals = [s["value"] for r in pq.read_table(path).to_pylist() for s in r["signals"]
            if s["name"] == "compression_ratio"]
    return vals


@pytest.mark.slow
def test_run_on_token_only_shards_decodes_them_like_the_text_they_were_made_from(demo, tmp_path):
    """The demo's shards carry tokens and the text they decode to; a token-only copy audited with the tokenizer
    gives the same batch scores (text signals included), and without it the text signals are missing."""
    from spike_audit.pipelines.run.audit import run_audit
    from spike_audit.pipelines.run.plan import RunConfig

    root, _ = demo
    run = root / "run"
    tok_only = tmp_path / "shards"
    tok_only.mkdir()
    for f in sorted((run / "shards").glob("*.parquet")):
        pq.write_table(pq.read_table(f).drop(["text"]), tok_only / f.name, row_group_size=100)
    base = dict(log=str(run / "train.log"), manifest=str(run / "manifest.parquet"), tokenizer=str(run / "tokenizer.json"))
    run_audit(RunConfig(shards=str(run / "shards"), out=str(tmp_path / "text"), **base))
    run_audit(RunConfig(shards=str(tok_only), out=str(tmp_path / "decoded"), **base))
    assert _scores(tmp_path / "text" / "batch_scores.parquet") == _scores(tmp_path / "decoded" / "batch_scores.parquet")
    summary = json.loads((tmp_path / "decoded" / "summary.json").read_text())["tokens"]
    assert summary["eos_id"] == 0 and summary["text_decoded_from_tokens"]  # <|endoftext|> from the tokenizer
    base.pop("tokenizer")
    run_audit(RunConfig(shards=str(tok_only), out=str(tmp_path / "no_tok"), **base))
    assert all(v is None for v in _text_signal_values(tmp_path / "no_tok" / "batch_scores.parquet"))
    assert all(v is not None for v in _text_signal_values(tmp_path / "decoded" / "batch_scores.parquet"))


@pytest.mark.slow
def test_run_over_flat_documents_equals_the_same_token_ranges(demo, tmp_path):
    """The demo's rows written as one flat .bin per shard (each document ending in EOS): a unit=row manifest
    with --rows documents audits exactly what a unit=token manifest of the same token ranges does."""
    from spike_audit.pipelines.manifest import load_manifest_table, manifest_from_arrays, write_manifest
    from spike_audit.pipelines.run.audit import run_audit
    from spike_audit.pipelines.run.plan import RunConfig

    root, _ = demo
    run = root / "run"
    flat = tmp_path / "flat"
    flat.mkdir()
    bounds = {}
    for f in sorted((run / "shards").glob("*.parquet")):
        docs = [r + [0] for r in pq.read_table(f, columns=["tokens"]).column("tokens").to_pylist()]
        np.concatenate([np.asarray(d, np.uint16) for d in docs]).tofile(flat / (f.stem + ".bin"))
        bounds[f.stem + ".bin"] = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    m = load_manifest_table(run / "manifest.parquet")
    shard = [s.replace(".parquet", ".bin") for s in m.column("shard").to_pylist()]
    write_manifest(manifest_from_arrays(m.column("step").to_numpy(), shard, m.column("row_start").to_numpy(),
                                        m.column("row_end").to_numpy(), "row"), tmp_path / "rows.parquet")
    st, sh, a, b = [], [], [], []
    for s, name, r0, r1 in zip(m.column("step").to_pylist(), shard, m.column("row_start").to_pylist(),
                               m.column("row_end").to_pylist()):
        for r in range(r0, r1):  # a token slice is one sequence: one per document
            st.append(s), sh.append(name), a.append(bounds[name][r]), b.append(bounds[name][r + 1])
    write_manifest(manifest_from_arrays(st, sh, a, b, "token"), tmp_path / "tokens.parquet")
    base = dict(log=str(run / "train.log"), shards=str(flat), tokenizer=str(run / "tokenizer.json"))
    run_audit(RunConfig(manifest=str(tmp_path / "rows.parquet"), out=str(tmp_path / "a"), rows="documents", **base))
    run_audit(RunConfig(manifest=str(tmp_path / "tokens.parquet"), out=str(tmp_path / "b"), **base))
    assert _scores(tmp_path / "a" / "batch_scores.parquet") == _scores(tmp_path / "b" / "batch_scores.parquet")
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["tokens"]["flat_rows"] == {
        "kind": "documents", "eos_id": 0}
    with pytest.raises(UserError, match="rows need a definition"):
        run_audit(RunConfig(manifest=str(tmp_path / "rows.parquet"), out=str(tmp_path / "c"), **base))


@pytest.mark.slow
def test_shards_decode_token_only_shards_for_the_text_signals(tmp_path):
    from spike_audit.pipelines.cli.main import main

    tok = _tokenizer(tmp_path / "t.json", ["<|endoftext|>"])
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over lazy dog pack my box with five dozen liquor jugs".split()
    (tmp_path / "text").mkdir()
    (tmp_path / "ids").mkdir()
    for k in range(5):
        texts = [" ".join(rng.choice(words, int(rng.integers(3, 30)))) for _ in range(80)]
        if k == 4:
            texts = ["fox fox fox fox fox fox fox fox fox fox fox fox"] * 80
        ids = [e.ids for e in tok.encode_batch(texts)]
        decoded = [tok.decode(i) for i in ids]
        pq.write_table(pa.table({"tokens": pa.array(ids, pa.list_(pa.int64())), "text": decoded}),
                       tmp_path / "text" / f"s{k}.parquet")
        pq.write_table(pa.table({"tokens": pa.array(ids, pa.list_(pa.int64()))}), tmp_path / "ids" / f"s{k}.parquet")
    assert main(["-q", "shards", str(tmp_path / "text"), "--out", str(tmp_path / "o_text")]) == 0
    assert main(["-q", "shards", str(tmp_path / "ids"), "--out", str(tmp_path / "o_ids"), "--tokenizer",
                 str(tmp_path / "t.json")]) == 0
    a = _scores(tmp_path / "o_text" / "shard_scores.parquet", "shard")
    b = _scores(tmp_path / "o_ids" / "shard_scores.parquet", "shard")
    drop = {"eos_density", "doc_len_mean", "doc_len_p50", "doc_len_p95", "dup_doc_frac"}  # the EOS came with the tokenizer
    strip = lambda rows: [(r[0], r[2], r[3], [s for s in r[4] if s[0] not in drop]) for r in rows]
    assert strip(a) == strip(b)
    assert all(v is not None for v in _text_signal_values(tmp_path / "o_ids" / "shard_scores.parquet"))
