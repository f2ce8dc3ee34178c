"""Saved baselines: `shards TRUSTED --save-baseline B`, then `shards NEW --baseline B` judges new shards against it
without reading the trusted corpus again; a corrupt, foreign or incompatible baseline is refused in one line."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from spike_audit.pipelines.cli.main import main
from spike_audit.pipelines.errors import UserError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """A trusted corpus of clean shards, and a new corpus: other clean shards (their documents are not in the
    trusted corpus) with the four planted anomalous ones among them."""
    from spike_audit.pipelines.demo import make_shard_corpus

    root = tmp_path_factory.mktemp("bl")
    truth = make_shard_corpus(root / "all", n_clean=30, rows_per_shard=80)
    planted = truth["planted"]
    clean = sorted(n for n in os.listdir(root / "all") if n not in planted)
    for d, names in (("trusted", clean[:18]), ("new", clean[18:] + sorted(planted))):
        (root / d).mkdir()
        for n in names:
            shutil.copy2(root / "all" / n, root / d / n)
    return root, planted


@pytest.fixture(scope="module")
def saved(split):
    """The baseline saved from the trusted corpus, which is then deleted (judging must not read it)."""
    from spike_audit.pipelines import api

    root, _ = split
    trusted = root / "trusted-copy"
    shutil.copytree(root / "trusted", trusted)
    res = api.audit_shards(str(trusted), out=str(root / "o-trusted"), save_baseline=str(root / "B"))
    shutil.rmtree(trusted)
    return root / "B", res


def test_planted_shards_flagged_against_a_clean_baseline_without_reading_it(split, saved, tmp_path, capsys):
    root, planted = split
    B, _ = saved
    assert not (root / "trusted-copy").exists()
    rc = main(["shards", str(root / "new"), "--out", str(tmp_path / "o"), "--baseline", str(B), "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["quarantined"]) == set(planted)
    assert doc["n_read_now"] == 16 and doc["n_shards"] == 16  # only the new shards are read
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["reference"]["kind"] == "baseline" and summary["reference"]["baseline_shards"] == 18
    scores = {r["shard"]: r for r in doc["shards"]}
    q = json.loads((tmp_path / "o" / "quarantine.json").read_text())
    assert max(r["anomaly_score"] for n, r in scores.items() if n not in planted) < q["threshold_evidence"]
    # the suite signals' robust z is against the baseline's shards: the planted ones stand out, the clean ones not
    import pyarrow.parquet as pq

    def maxz(r):
        return max(abs(s["z"]) for s in r["signals"] if s["z"] is not None)
    tab = {r["shard"]: r for r in pq.read_table(tmp_path / "o" / "shard_scores.parquet").to_pylist()}
    assert min(maxz(tab[n]) for n in planted) > 10 > max(maxz(r) for n, r in tab.items() if n not in planted)


def test_baseline_round_trip_and_determinism(split, saved, tmp_path):
    from spike_audit.pipelines import api
    from spike_audit.pipelines.beam.baseline import load_baseline
    from spike_audit.pipelines.shard_audit.config import ShardAuditConfig

    root, _ = split
    B, res = saved
    bl = load_baseline(str(B), ShardAuditConfig(inputs=("x",), out="y"))
    n_rows = sum(r["n_rows"] for r in res.tables["shard_scores"].to_pylist())
    assert bl.rows == n_rows == bl.meta["rows"] and bl.meta["shards"] == 18
    assert (bl.reference.sum(axis=1) == n_rows).all()
    assert len(bl.shard_signals) == 18 and all("token_jsd" in d for d in bl.shard_signals)
    assert bl.unigram.sum() == sum(r["n_tokens"] for r in res.tables["shard_scores"].to_pylist())
    # the same corpus saved again: the same baseline (tables byte for byte, the same row hashes)
    api.audit_shards(str(root / "trusted"), out=str(tmp_path / "o2"), save_baseline=str(tmp_path / "B2"))
    for name in ("reference.parquet", "unigram.parquet", "shard_signals.parquet"):
        assert (B / name).read_bytes() == (tmp_path / "B2" / name).read_bytes()
    bl2 = load_baseline(str(tmp_path / "B2"), ShardAuditConfig(inputs=("x",), out="y"))
    from spike_audit.pipelines import records as rec_io

    def hashes(b):
        return np.sort(np.concatenate([r["hash"] for p in b.hash_parts
                                       for r in rec_io.from_bytes(open(p, "rb").read(), p, "baseline_row_hashes")]))
    h1 = hashes(bl)
    assert np.array_equal(h1, hashes(bl2)) and len(np.unique(h1)) == len(h1) > 0
    # judging twice gives identical tables; the config file route gives the same as the flag
    cfgf = tmp_path / "c.toml"
    cfgf.write_text(f'[shards]\nbaseline = "{B}"\n')
    a = api.audit_shards(str(root / "new"), out=str(tmp_path / "j1"), baseline=str(B))
    b = api.audit_shards(str(root / "new"), out=str(tmp_path / "j2"), config_file=str(cfgf))
    for t in ("shard_scores", "duplicates"):
        assert (tmp_path / "j1" / f"{t}.parquet").read_bytes() == (tmp_path / "j2" / f"{t}.parquet").read_bytes()
    assert a.tables["shard_scores"].equals(b.tables["shard_scores"])


def _err(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_corrupt_foreign_and_incompatible_baselines_are_refused(split, saved, tmp_path, capsys):
    root, _ = split
    B, _ = saved
    new = str(root / "new")

    def copy():
        d = tmp_path / f"B{len(os.listdir(tmp_path))}"
        shutil.copytree(B / ".current", d)
        return d

    out = str(tmp_path / "out")
    assert "made with seed=0, this audit has seed=1" in _err(capsys, ["shards", new, "--out", out, "--baseline", str(B),
                                                                      "--seed", "1"])
    assert "made with seed=0" in _err(capsys, ["shards", new, "--out", out, "--baseline", str(B), "--seed", "1",
                                              "--dry-run"])
    d = copy()
    meta = json.loads((d / "baseline.json").read_text())
    (d / "baseline.json").write_text(json.dumps(dict(meta, version=99)))
    assert "baseline format version 99, expected 1" in _err(capsys, ["shards", new, "--out", out, "--baseline", str(d)])
    # saved by a version with one family fewer (before near_dup_in_shard, the 48th): refused, not read as zeros
    d = copy()
    meta = json.loads((d / "baseline.json").read_text())
    assert meta["families"][-1] == "near_dup_in_shard"
    (d / "baseline.json").write_text(json.dumps(dict(meta, families=meta["families"][:-1])))
    err = _err(capsys, ["shards", new, "--out", out, "--baseline", str(d)])
    assert "another set of signal families" in err and "baseline.json" in err and "save the baseline again" in err
    d = copy()
    data = bytearray((d / "reference.parquet").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / "reference.parquet").write_bytes(bytes(data))
    err = _err(capsys, ["shards", new, "--out", out, "--baseline", str(d)])
    assert "reference.parquet" in err and "corrupt" in err
    d = copy()
    part = sorted((d / "row_hashes").iterdir())[0]
    part.write_bytes(part.read_bytes()[:-10])
    err = _err(capsys, ["shards", new, "--out", out, "--baseline", str(d)])
    assert part.name in err and "corrupt" in err
    assert "not a spike-audit baseline" in _err(capsys, ["shards", new, "--out", out, "--baseline",
                                                         str(root / "o-trusted")])
    assert "give one" in _err(capsys, ["shards", new, "--out", out, "--baseline", str(B), "--save-baseline",
                                       str(tmp_path / "x")])
    assert not os.path.exists(out)  # refused before anything was created
    # a baseline directory is never written over an output or a state, nor they over it
    assert "refusing" in _err(capsys, ["shards", new, "--out", str(B)])
    with pytest.raises(UserError):
        from spike_audit.pipelines import api

        api.audit_shards(new, out=out, save_baseline=str(root / "o-trusted"))


def test_run_takes_its_unigram_reference_from_a_saved_baseline(demo, tmp_path, capsys):
    """`run --baseline`: the baseline-relative signals are against the saved unigram histogram (the step signals
    change), the control rows still give the natural rates and calibrate p (the planted data spikes stay data);
    a baseline made with other token settings is refused before anything is read."""
    from spike_audit.pipelines import api
    from spike_audit.pipelines.demo import INJECTIONS

    root, truth = demo
    run = root / "run"
    B = tmp_path / "B"
    api.audit_shards(str(run / "shards"), out=str(tmp_path / "sh"), save_baseline=str(B),
                     tokenizer=str(run / "tokenizer.json"))
    common = dict(log=str(run / "train.log"), manifest=str(run / "manifest.parquet"), shards=str(run / "shards"),
                  tokenizer=str(run / "tokenizer.json"))
    with_b = api.audit_run(out=str(tmp_path / "r1"), baseline=str(B), **common)
    plain = api.audit_run(out=str(tmp_path / "r0"), **common)
    ref = json.loads((tmp_path / "r1" / "summary.json").read_text())["reference"]
    assert ref["unigram"] == "saved baseline" and ref["baseline_rows"] > 0
    verdicts = {v["spike_id"]: v for v in with_b.tables["verdicts"].to_pylist()}
    for step, kind in INJECTIONS.items():
        v = next(v for k, v in verdicts.items() if k.endswith(f"/train_loss/{step}"))
        assert (v["verdict"] == "data") == (kind != "optimizer"), (kind, v)

    def xent(res):
        return {(r["step"], r["role"]): {s["name"]: s["value"] for s in r["signals"]}.get("baseline_xent")
                for r in res.tables["batch_scores"].to_pylist()}
    a, b = xent(with_b), xent(plain)
    assert a.keys() == b.keys() and any(a[k] != b[k] for k in a)
    # made without the tokenizer (no EOS id): refused by the run, in one line, before anything is read
    api.audit_shards(str(run / "shards"), out=str(tmp_path / "sh2"), save_baseline=str(tmp_path / "B2"))
    argv = ["run", "--log", common["log"], "--manifest", common["manifest"], "--shards", common["shards"],
            "--tokenizer", common["tokenizer"], "--out", str(tmp_path / "r2"), "--baseline", str(tmp_path / "B2")]
    err = _err(capsys, argv)
    assert "B2" in err and "eos_id" in err
    assert not (tmp_path / "r2").exists()
