"""The spike lab's own bookkeeping (benchmarks/verdicts.py): one small lab run, 1 seed.

Checks that every planted row is where the step manifest says it was consumed, that its content is
the planted kind, that the rest of each planted batch is untouched, that scoring an oracle's outputs
gives a perfect table and an empty audit a table of misses, and that the real `spike-audit run`
outputs are read into a table with every kind. Not the tool's recall: that is what the lab measures.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "spikelab"))

pytestmark = pytest.mark.slow

TINY_POOL = dict(budget=(("stdlib", 2_600_000), ("man", 1_300_000), ("debian", 1_100_000), ("site_packages", 700_000),
                         ("pydoc", 300_000), ("licenses", 200_000)), vocab_size=4096, train_chars=1_200_000)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    import lab_corpus
    import lab_run

    root = tmp_path_factory.mktemp("spikelab")
    pool = lab_corpus.build_pool(root / "cache", lab_corpus.PoolConfig(**TINY_POOL))
    events = lab_run.design(quick=True)[0]
    spec = lab_run.RunSpec(seed=3, run=0, steps=800, rows_per_step=16, seq_len=128, layout="docs",
                           rows_per_shard=256, workers=2, log_format="jsonl", events=events)
    truth = lab_run.build_run(pool, spec, root / "run")
    return root / "run", truth, pool


def _manifest_rows(run: Path) -> dict[int, set]:
    m = pq.read_table(run / "manifest.parquet").to_pylist()
    by: dict[int, set] = {}
    for r in m:
        by.setdefault(r["step"], set()).update((r["shard"], i) for i in range(r["row_start"], r["row_end"]))
    return by


def _shard_tokens(run: Path) -> dict[str, list]:
    return {p.name: pq.read_table(p, columns=["tokens"]).column("tokens").to_pylist()
            for p in sorted((run / "shards").glob("*.parquet"))}


def test_planted_rows_are_where_the_manifest_says(lab):
    import lab_run
    from lab_corpus import EOS_ID, PAD_ID

    run, truth, _ = lab
    by_step = _manifest_rows(run)
    shards = _shard_tokens(run)
    assert all(len(v) == 16 for v in by_step.values()) and len(by_step) == truth["spec"]["steps"]
    planted_keys = set()
    for e in truth["events"]:
        if e["kind"] == "optimizer":
            assert e["rows"] == []
            continue
        assert [r["step"] for r in e["rows"]] == e["steps"]
        for r in e["rows"]:
            rows = r["shard_rows"]
            assert len(rows) == max(1, round(e["dose"] / 16 * 16))
            for shard, row, h in rows:
                assert (shard, row) in by_step[r["step"]], (e["kind"], r["step"], shard, row)
                toks = np.asarray(shards[shard][row])
                assert lab_run.row_hash(toks) == h
                planted_keys.add((shard, row))
            toks = [np.asarray(shards[s][i]) for s, i, _ in rows]
            if e["kind"] in ("dup_in_batch", "near_dup"):  # copies of max(1, k // 8) documents
                n_src = max(1, len(toks) // 8)
                if e["kind"] == "dup_in_batch":
                    assert len({lab_run.row_hash(t) for t in toks}) == n_src
                else:  # about 6% of the tokens substituted, the rest equal to the other copies
                    for a, b in zip(toks, toks[n_src:]):
                        assert len(a) == len(b) and 0.75 <= (a == b).mean() <= 0.97
            if e["kind"] == "eos_pad_flood":
                assert all(np.isin(t, [EOS_ID, PAD_ID]).mean() >= 0.75 for t in toks)
            if e["kind"] == "long_doc":
                assert all(len(t) >= 4 * truth["spec"]["seq_len"] for t in toks)
            if e["kind"] == "random_tokens":
                assert all(len(np.unique(t)) > 0.9 * len(t) for t in toks)
        if e["kind"] == "dup_copied":  # copies of the rows the same positions held at the source steps
            for r, src in zip(e["rows"], e["copied_from_steps"]):
                src_tok = {lab_run.row_hash(np.asarray(shards[s][i])) for s, i in by_step[src]}
                assert {h for _, _, h in r["shard_rows"]} <= src_tok
    # the rest of a planted batch is natural: not one of the planted rows, and no copy of them
    for e in truth["events"]:
        for r in e["rows"]:
            rest = by_step[r["step"]] - planted_keys
            assert len(rest) == 16 - len(r["shard_rows"])
    per_shard = {s: sum(1 for k in planted_keys if k[0] == s) for s in shards}
    assert {s: t["planted"] for s, t in truth["shards"].items()} == per_shard
    # copy_sources: the unplanted rows of the source steps whose tokens a dup_copied row copies, per shard
    copied = {h for e in truth["events"] if e["kind"] == "dup_copied" for r in e["rows"] for _, _, h in r["shard_rows"]}
    sources = {}
    for e in truth["events"]:
        for src in e.get("copied_from_steps", []):
            for s, i in by_step[src] - planted_keys:
                if lab_run.row_hash(np.asarray(shards[s][i])) in copied:
                    sources.setdefault(s, set()).add(i)
    assert copied and sources
    assert {s: t["copy_sources"] for s, t in truth["shards"].items() if t["copy_sources"]} == \
        {s: len(v) for s, v in sources.items()}
    assert {s: t["rows"] for s, t in truth["shards"].items()} == {s: len(v) for s, v in shards.items()}


def test_log_spikes_at_planted_steps(lab):
    run, truth, _ = lab
    lines = [json.loads(x) for x in (run / truth["log"]).read_text().splitlines()]
    steps = [x["step"] for x in lines]
    assert steps.count(truth["crashed_at"]) == 2 and steps.count(truth["resumed_from"] + 1) == 2
    loss = {}
    for x in lines:  # the later value of a step is the truth
        loss[x["step"]] = x["train/loss"]
    for e in truth["events"]:
        s0 = e["steps"][0]
        before = np.median([loss[s] for s in range(s0 - 30, s0 - 5)])
        assert max(loss[s] for s in range(s0, s0 + e["n_steps"] + 2)) > before + 0.25


def _oracle_audit(run: Path, truth: dict, dest: Path) -> None:
    """What a perfect tool would write: one spike per event, window = its steps, every planted row skipped."""
    dest.mkdir(parents=True)
    verdicts, windows, skips = [], [], []
    for e in truth["events"]:
        sid = f"train/train_loss/{e['steps'][-1]}"
        data = e["kind"] != "optimizer"
        verdicts.append({"spike_id": sid, "run": "train", "peak_step": e["steps"][-1],
                         "verdict": "data" if data else "not_data", "p_value": 0.01, "effect_size": 9.0,
                         "margin": 3.0, "top_signal": "x", "top_step": e["steps"][0], "reason": "oracle"})
        windows += [{"step": s, "role": "window", "spike_id": sid} for s in e["steps"]]
        skips.append({"spike_id": sid, "peak_step": e["steps"][-1], "verdict": verdicts[-1]["verdict"],
                      "skip_steps": e["steps"] if data else [],
                      "skip_data": [{"shard": sh, "row_start": row, "row_end": row + 1, "unit": "row"}
                                    for r in e["rows"] for sh, row, _ in r["shard_rows"]]})
    vschema = pa.schema([("spike_id", pa.string()), ("run", pa.string()), ("peak_step", pa.int64()),
                         ("verdict", pa.string()), ("p_value", pa.float64()), ("effect_size", pa.float64()),
                         ("margin", pa.float64()), ("top_signal", pa.string()), ("top_step", pa.int64()),
                         ("reason", pa.string())])
    bschema = pa.schema([("step", pa.int64()), ("role", pa.string()), ("spike_id", pa.string())])
    pq.write_table(pa.Table.from_pylist(verdicts, schema=vschema), dest / "verdicts.parquet")
    pq.write_table(pa.Table.from_pylist(windows, schema=bschema), dest / "batch_scores.parquet")
    (dest / "skip_list.json").write_text(json.dumps({"spikes": skips, "steps_to_skip": sorted(
        s for x in skips for s in x["skip_steps"])}))
    (dest / "quarantine.json").write_text(json.dumps({"shards": []}))
    (dest / "summary.json").write_text(json.dumps({"control_calibration": {"false_alarms": 0, "n_controls": 100}}))


def test_oracle_scores_perfect_and_empty_scores_misses(lab, tmp_path):
    import lab_eval
    from lab_plant import KINDS

    run, truth, _ = lab
    _oracle_audit(run, truth, tmp_path / "oracle")
    pooled = lab_eval.pool_scores([lab_eval.score_run(run, tmp_path / "oracle", None)], 1)
    assert set(pooled["kinds"]) == set(KINDS)
    for kind, k in pooled["kinds"].items():
        assert k["n"] == 1 and k["missed"] == 0 and k["skip_recall"] == 1.0 and k["skip_precision"] == 1.0, kind
        assert all(c["recall"] == 1.0 for c in k["doses"].values()), kind
    assert pooled["optimizer"]["false_data"] == 0 and pooled["optimizer"]["detected"] == 2
    assert pooled["skip"]["precision"] == 1.0 and pooled["skip"]["recall"] == 1.0
    assert pooled["spurious_spikes"] == 0

    empty = tmp_path / "empty"
    _oracle_audit(run, {"events": []}, empty)
    pooled = lab_eval.pool_scores([lab_eval.score_run(run, empty, None)], 1)
    assert pooled["all_data_kinds"]["missed"] == pooled["all_data_kinds"]["n"] == 10
    assert pooled["skip"]["recall"] == 0.0


def test_real_tool_outputs_give_a_table_with_every_kind(lab, tmp_path):
    import lab_eval
    from lab_plant import KINDS

    run, truth, _ = lab
    tool = Path(sys.executable).parent / "spike-audit"
    tool = str(tool) if tool.exists() else shutil.which("spike-audit")
    assert tool, "spike-audit is not installed"
    out = tmp_path / "audit"
    subprocess.run([tool, "-q", "run", "--log", str(run / truth["log"]), "--manifest", str(run / "manifest.parquet"),
                    "--shards", str(run / "shards"), "--out", str(out), "--eos-id", "0"], check=True,
                   capture_output=True)
    pooled = lab_eval.pool_scores([lab_eval.score_run(run, out, None)], 1)
    table = lab_eval.render(pooled, {})
    for kind in KINDS:
        assert pooled["kinds"][kind]["n"] == 1
        assert f"| {kind} |" in table
    counted = sum(sum(pooled["kinds"][k]["verdicts"].values()) for k in KINDS)
    assert counted == 10 and "optimizer" in table
