"""`spike-audit shards`: corpus-scale shard audit without a loss log."""

from __future__ import annotations

import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spike_audit.pipelines.cli.main import main
from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.shard_audit.audit import run_shard_audit
from spike_audit.pipelines.shard_audit.config import ShardAuditConfig

pytestmark = pytest.mark.slow

EXPECTED = {  # the families that name each planted anomaly
    "random_tokens": {"token_entropy", "distinct_token_ratio", "compression_ratio:low", "mean_word_len",
                      "non_alnum_frac"},
    "duplication": {"seen_elsewhere", "dup_in_batch", "near_dup_jaccard"},
    "repeated_ngram": {"repeat_token_frac", "repeat_any_token_frac", "repeat_run_row", "max_repeat_run",
                       "distinct_token_ratio:low", "token_entropy:low", "compression_ratio",
                       *(f"gopher_top{n}_char_frac" for n in (2, 3, 4)), *(f"gopher_dup{n}_char_frac" for n in range(5, 11))},
    "out_of_domain": {"mean_word_len", "non_alnum_frac", "top_token_share", "gopher_top4_char_frac",
                      "compression_ratio:low"},
}


@pytest.fixture(scope="module")
def audited(corpus, tmp_path_factory):
    root, truth = corpus
    out = tmp_path_factory.mktemp("shard-audit") / "out"
    res = run_shard_audit(ShardAuditConfig(inputs=(str(root / "shards"),), out=str(out)))
    return res, truth, out


def test_planted_shards_rank_on_top_with_the_right_reason(audited):
    res, truth, _ = audited
    scores = res.tables["shard_scores"].to_pylist()
    planted = truth["planted"]
    assert {r["shard"] for r in scores[: len(planted)]} == set(planted)
    for r in scores[: len(planted)]:
        assert r["top_signal"] in EXPECTED[planted[r["shard"]]], (planted[r["shard"]], r["reason"])
        assert r["anomaly_score"] >= 20 and r["top_rows"] >= 20, r["reason"]


def test_clean_shards_are_not_quarantined(audited):
    res, truth, out = audited
    q = json.loads((out / "quarantine.json").read_text())
    assert {e["shard"] for e in q["shards"]} == set(truth["planted"])
    clean = [r for r in res.tables["shard_scores"].to_pylist() if r["shard"] not in truth["planted"]]
    assert len(clean) == 50 and max(r["anomaly_score"] for r in clean) < q["threshold_evidence"]


def test_cross_shard_duplicates_are_found(audited, corpus):
    res, truth, _ = audited
    dups = res.tables["duplicates"].to_pylist()
    assert dups and all(d["n_shards"] >= 2 for d in dups)
    rep = next(s for s, k in truth["planted"].items() if k == "repeated_ngram")
    # two rows in three of the repeated-n-gram shard are copies of documents of clean shards
    exact = {(d["shard"], d["row"]) for d in dups if d["kind"] == "exact"}
    copied = [r for r in range(truth["rows_per_shard"]) if r % 3 and (rep, r) in exact]
    assert len(copied) >= 0.9 * (2 * truth["rows_per_shard"] // 3)
    by_cluster = {}
    for d in dups:
        by_cluster.setdefault(d["cluster_id"], set()).add(d["shard"])
    assert any(rep in shards and any(s not in truth["planted"] for s in shards) for shards in by_cluster.values())


def test_outputs_follow_their_schemas_and_report_renders(audited):
    from spike_audit.schemas import DUPLICATES, SHARD_SCORES

    _, truth, out = audited
    assert pq.read_schema(out / "shard_scores.parquet").equals(SHARD_SCORES.schema, check_metadata=False)
    assert pq.read_schema(out / "duplicates.parquet").equals(DUPLICATES.schema, check_metadata=False)
    html = (out / "report.html").read_text()
    assert all(s in html for s in truth["planted"]) and "<svg" in html


def test_report_excerpts_are_each_shards_anomalous_rows(audited):
    """row_flags: the top shards' rows at their anomalous families' cuts (not their first rows), strongest first,
    and the report shows them; duplicate clusters list their members with a text."""
    from spike_audit.schemas import ROW_FLAGS

    res, truth, out = audited
    assert pq.read_schema(out / "row_flags.parquet").equals(ROW_FLAGS.schema, check_metadata=False)
    flags = pq.read_table(out / "row_flags.parquet").to_pylist()
    by_shard = {}
    for f in flags:
        by_shard.setdefault(f["shard"], []).append(f)
    for shard, kind in truth["planted"].items():
        if kind == "duplication":  # shard-level families: its rows are the duplicate clusters' members
            continue
        rows = by_shard[shard]
        assert 1 <= len(rows) <= 5 and all(f["step"] is None and f["excerpt"] for f in rows)
        assert any(set(f["signals"]) & EXPECTED[kind] for f in rows), (kind, rows[0]["signals"])
    html = (out / "report.html").read_text()
    assert "<th>anomalous rows</th>" in html
    rep = next(s for s, k in truth["planted"].items() if k == "random_tokens")
    first = by_shard[rep][0]
    assert f"row {first['row']:,}" in html
    assert "members (shard: row)" in html and "(not read)" not in html


def _copy(src, dst, names):
    dst.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copy2(src / n, dst / n)


def _table_bytes(out):
    return {n: (out / f"{n}.parquet").read_bytes() for n in ("shard_scores", "duplicates", "row_flags")}


def test_incremental_rerun_equals_a_full_run(corpus, tmp_path):
    root, truth = corpus
    names = sorted(os.listdir(root / "shards"))
    data = tmp_path / "data"
    _copy(root / "shards", data, names[:40])
    state = str(tmp_path / "state")

    def cfg(out, st=None):
        return ShardAuditConfig(inputs=(str(data),), out=str(tmp_path / out), state=st)

    first = run_shard_audit(cfg("inc1", state))
    assert first.n_scanned == 40
    _copy(root / "shards", data, names[40:])  # new shards arrive
    second = run_shard_audit(cfg("inc2", state))
    assert second.n_scanned == len(names) - 40 and second.n_shards == len(names)
    full = run_shard_audit(cfg("full"))
    assert _table_bytes(tmp_path / "inc2") == _table_bytes(tmp_path / "full")

    # a changed shard is read again, and only that one
    t = pq.read_table(data / names[3])
    pq.write_table(t.slice(0, 60), data / names[3])
    third = run_shard_audit(cfg("inc3", state))
    assert third.n_scanned == 1
    run_shard_audit(cfg("full3"))
    assert _table_bytes(tmp_path / "inc3") == _table_bytes(tmp_path / "full3")
    assert full.n_shards == third.n_shards


def test_unreadable_and_schema_mismatched_shards_are_listed(corpus, tmp_path):
    root, _ = corpus
    data = tmp_path / "data"
    _copy(root / "shards", data, sorted(os.listdir(root / "shards"))[:6])
    (data / "zz-broken.parquet").write_bytes(b"not a parquet file at all")
    pq.write_table(pa.table({"ids": [1, 2, 3]}), data / "zz-wrong-columns.parquet")
    cfg = ShardAuditConfig(inputs=(str(data),), out=str(tmp_path / "out"))
    with pytest.raises(UserError, match=r"zz-broken\.parquet: .*\(and 1 more\); --skip-bad") as err:
        run_shard_audit(cfg)
    assert "\n" not in str(err.value)
    assert str(err.value).count("zz-broken.parquet") == 1  # named once, not as its name and then its path
    assert not (tmp_path / "out").exists()

    res = run_shard_audit(ShardAuditConfig(inputs=(str(data),), out=str(tmp_path / "out"), skip_bad=True))
    assert {b["shard"] for b in res.bad} == {"zz-broken.parquet", "zz-wrong-columns.parquet"}
    assert "tokens" in next(b["error"] for b in res.bad if b["shard"] == "zz-wrong-columns.parquet")
    assert res.n_shards == 6
    q = json.loads((tmp_path / "out" / "quarantine.json").read_text())
    assert {b["shard"] for b in q["unreadable"]} == {"zz-broken.parquet", "zz-wrong-columns.parquet"}


def test_command_line_prints_the_ranking(corpus, tmp_path, capsys):
    root, truth = corpus
    rc = main(["shards", str(root / "shards"), "--out", str(tmp_path / "cli")])
    assert rc == 0
    text = capsys.readouterr().out
    top = [line for line in text.splitlines() if line.startswith(" !")]
    assert len(top) == len(truth["planted"])
    assert "tokens/s" in text


def test_missing_input_is_a_one_line_error(tmp_path, capsys):
    rc = main(["shards", str(tmp_path / "nope" / "*.parquet"), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "matches no file" in err


def test_one_shard_alone_is_ranked_but_never_quarantined_against_nothing(corpus, tmp_path, capsys):
    """An ad hoc audit of one shard has no other rows to judge it against: no evidence, no quarantine, and the
    reason says so (it had e=120 on every family against an empty reference)."""
    import json

    root, truth = corpus
    one = sorted((root / "shards").glob("*.parquet"))[0]
    rc = main(["shards", str(one), "--out", str(tmp_path / "one"), "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["quarantined"] == []
    (rec,) = res["shards"]
    assert rec["anomaly_score"] == 0.0 and "no other rows" in rec["reason"]


def test_an_mds_dataset_directory_is_one_shard(tmp_path, capsys):
    """A mosaicml-streaming dataset (index.json + shard files, written by streaming's own MDSWriter) given to
    `shards`, alone or inside a folder, is one shard; a pickled one beside it is refused, never unpickled."""
    import json
    from pathlib import Path

    fix = Path(__file__).parent / "fixtures" / "mds"
    rc = main(["shards", str(fix / "mixed_zstd"), "--out", str(tmp_path / "a"), "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert [s["shard"] for s in res["shards"]] == ["mixed_zstd"] and res["shards"][0]["n_rows"] > 0
    rc = main(["shards", str(fix), "--out", str(tmp_path / "b"), "--skip-bad", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert [s["shard"] for s in res["shards"]] == ["mixed_zstd"]
    assert [b["shard"] for b in res["unreadable"]] == ["pickled"] and "pickled" in res["unreadable"][0]["error"]


def test_near_copies_of_another_shards_rows_count_on_near_dup(corpus, tmp_path):
    """A shard whose rows are near copies (6% of tokens substituted, 5-gram Jaccard ~0.5-0.7) of rows held in
    another shard counts them on ``near_dup_jaccard`` (a verified near duplicate anywhere in the audited
    shards), and ranks first; before, only near copies within the same shard counted."""
    import numpy as np

    root, truth = corpus
    clean = sorted(n for n in os.listdir(root / "shards") if n not in truth["planted"])[:12]
    src = tmp_path / "shards"
    src.mkdir()
    for n in clean:
        shutil.copy(root / "shards" / n, src / n)
    a = pq.read_table(src / clean[0])
    b = pq.read_table(src / clean[1])
    rng = np.random.default_rng(0)
    toks = b.column("tokens").to_pylist()
    donor = a.column("tokens").to_pylist()
    vocab = int(max(max(r) for r in donor if r)) + 1
    n_near = 30
    for i in range(n_near):
        row = np.asarray(donor[i], dtype=np.int64)
        sub = rng.random(len(row)) < 0.06
        row[sub] = rng.integers(1, vocab, int(sub.sum()))
        toks[i] = row.tolist()
    b = b.set_column(b.schema.get_field_index("tokens"), "tokens", pa.array(toks, b.schema.field("tokens").type))
    pq.write_table(b, src / clean[1])
    res = run_shard_audit(ShardAuditConfig(inputs=(str(src),), out=str(tmp_path / "out")))
    scores = res.tables["shard_scores"].to_pylist()
    near = {r["shard"]: next((f["rows"] for f in r["families"] if f["name"] == "near_dup_jaccard"), 0) for r in scores}
    assert near[clean[1]] >= n_near - 3, near
    assert scores[0]["shard"] in (clean[0], clean[1]), scores[0]


def test_a_block_copied_from_one_other_shard_ranks_above_scattered_natural_duplicates(corpus, tmp_path):
    """A shard holding 16 rows copied from one other shard (a shard written twice, an overlapping split) is a block
    on ``replay_rows``; the same number of copies spread one per shard over 16 shards is not. The block's shard,
    and the shard it copies, rank above every other clean shard; the scattered copies do not make a block."""
    root, truth = corpus
    clean = sorted(n for n in os.listdir(root / "shards") if n not in truth["planted"])[:30]
    src = tmp_path / "shards"
    src.mkdir()
    for n in clean:
        shutil.copy(root / "shards" / n, src / n)
    k = 16
    donor = pq.read_table(src / clean[0]).column("tokens").to_pylist()
    target = pq.read_table(src / clean[1])
    toks = target.column("tokens").to_pylist()
    toks[40:40 + k] = donor[:k]  # one block of 16 rows of clean[0]
    ftype = target.schema.field("tokens").type
    pq.write_table(target.set_column(target.schema.get_field_index("tokens"), "tokens", pa.array(toks, ftype))
                   .drop_columns([c for c in target.column_names if c != "tokens"]), src / clean[1])
    scattered = pq.read_table(src / clean[2])
    stoks = scattered.column("tokens").to_pylist()
    for i in range(k):  # 16 rows, each copied from a different shard
        stoks[10 + i] = pq.read_table(src / clean[3 + i]).column("tokens").to_pylist()[5]
    pq.write_table(scattered.set_column(scattered.schema.get_field_index("tokens"), "tokens", pa.array(stoks, ftype))
                   .drop_columns([c for c in scattered.column_names if c != "tokens"]), src / clean[2])
    res = run_shard_audit(ShardAuditConfig(inputs=(str(src),), out=str(tmp_path / "out")))
    scores = res.tables["shard_scores"].to_pylist()
    fam = {r["shard"]: next((f for f in r["families"] if f["name"] == "replay_rows"), None) for r in scores}
    for n in clean[:2]:  # the block: the k - 1 later of k distinct rows shared with one shard
        assert fam[n]["rows"] == k - 1, fam[n]
    # the scattered copies are 16 rows seen elsewhere, none in a block of more than one row
    assert fam[clean[2]] is None, fam[clean[2]]
    assert {r["shard"] for r in scores[:2]} == {clean[0], clean[1]}, [(r["shard"], r["reason"]) for r in scores[:4]]
    assert scores[0]["top_signal"] == "replay_rows" and "replay_rows" in scores[0]["reason"]


def test_shards_that_all_share_rows_evenly_are_no_copied_blocks(tmp_path):
    """A corpus where every shard shares rows with many others alike (each shared row in 8 of 40 shards): every
    shard has a largest block by chance, the largest of them only a little larger; no shard is anomalous on
    ``replay_rows`` and none is quarantined (a graded block value put the largest at a rare tail)."""
    import numpy as np

    rng = np.random.default_rng(5)
    n_shards, rows, length = 40, 200, 64
    shared = rng.integers(2, 30000, (n_shards * rows // 2 // 8, length))
    slots = [[] for _ in range(n_shards)]
    for i in range(len(shared)):
        for s_ in rng.choice(n_shards, 8, replace=False):
            slots[s_].append(i)
    src = tmp_path / "shards"
    src.mkdir()
    for s_ in range(n_shards):
        mine = shared[slots[s_][:rows]]
        own = rng.integers(2, 30000, (rows - len(mine), length))
        block = np.concatenate([mine, own])
        rng.shuffle(block)
        pq.write_table(pa.table({"tokens": pa.array(list(block.astype(np.uint16)), pa.list_(pa.uint16()))}),
                       src / f"s{s_:03d}.parquet")
    out = tmp_path / "out"
    res = run_shard_audit(ShardAuditConfig(inputs=(str(src),), out=str(out)))
    scores = res.tables["shard_scores"].to_pylist()
    ev = [next((f["evidence"] for f in r["families"] if f["name"] == "replay_rows"), 0.0) for r in scores]
    assert max(ev) < 3, max(ev)
    assert json.loads((out / "quarantine.json").read_text())["shards"] == []


def test_near_copies_within_one_shard_count_on_near_dup_in_shard(corpus, tmp_path):
    """20 copies of one document with 6% of tokens substituted in each (two copies at 5-gram Jaccard ~0.37, below
    the near-duplicate join's 0.5) inside one shard: 19 rows on ``near_dup_in_shard`` (the first counted once), the
    shard ranked first; the clean shards have few such rows."""
    import numpy as np

    root, truth = corpus
    clean = sorted(n for n in os.listdir(root / "shards") if n not in truth["planted"])[:20]
    src = tmp_path / "shards"
    src.mkdir()
    for n in clean:
        shutil.copy(root / "shards" / n, src / n)
    t = pq.read_table(src / clean[0])
    toks = t.column("tokens").to_pylist()
    rng = np.random.default_rng(3)
    doc = np.asarray(max(toks, key=len), dtype=np.int64)
    vocab = int(max(max(r) for r in toks if r)) + 1
    for i in range(20):
        row = doc.copy()
        sub = rng.random(len(row)) < 0.06
        row[sub] = rng.integers(1, vocab, int(sub.sum()))
        toks[5 + 5 * i] = row.tolist()
    t = t.set_column(t.schema.get_field_index("tokens"), "tokens", pa.array(toks, t.schema.field("tokens").type))
    pq.write_table(t.drop_columns([c for c in t.column_names if c != "tokens"]), src / clean[0])
    res = run_shard_audit(ShardAuditConfig(inputs=(str(src),), out=str(tmp_path / "out")))
    scores = res.tables["shard_scores"].to_pylist()
    fam = {r["shard"]: next((f for f in r["families"] if f["name"] == "near_dup_in_shard"), None) for r in scores}
    assert fam[clean[0]] is not None and fam[clean[0]]["rows"] >= 19, fam[clean[0]]
    assert scores[0]["shard"] == clean[0], [(r["shard"], r["reason"]) for r in scores[:3]]
    assert all(f is None or f["rows"] <= 3 for n, f in fam.items() if n != clean[0]), fam
