"""End to end: `spike-audit run` on the demo run (real text, planted spikes, a resume)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from spike_audit.pipelines.demo import INJECTIONS
from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.run.audit import run_audit
from spike_audit.pipelines.run.outputs import OUTPUT_SPECS
from spike_audit.pipelines.run.plan import RunConfig

pytestmark = pytest.mark.slow

TABLES = ("spikes", "batch_scores", "shard_scores", "row_flags", "verdicts")


def _cfg(root: Path, out: str, **kw) -> RunConfig:
    run = root / "run"
    return RunConfig(log=str(run / "train.log"), manifest=str(run / "manifest.parquet"), shards=str(run / "shards"),
                     out=str(root / out), tokenizer=str(run / "tokenizer.json"), **kw)


@pytest.fixture(scope="module")
def audited(demo):
    root, truth = demo
    res = run_audit(_cfg(root, "audit"))
    return root, truth, res


def _verdict_at(verdicts, step):
    rows = [v for v in verdicts if v["spike_id"].endswith(f"/train_loss/{step}")]
    assert rows, f"no train_loss spike was audited at step {step}: {[v['spike_id'] for v in verdicts]}"
    return rows[0]


def test_every_planted_data_spike_is_data_with_the_right_shard(audited):
    root, truth, res = audited
    verdicts = res.tables["verdicts"].to_pylist()
    for step, kind in INJECTIONS.items():
        if kind == "optimizer":
            continue
        v = _verdict_at(verdicts, step)
        assert v["verdict"] == "data", (kind, v)
        assert truth["injections"][str(step)]["shards"][0] in v["top_shards"], (kind, v)
        assert v["p_value"] <= 0.05


def test_optimizer_spike_is_not_data(audited):
    _, _, res = audited
    step = next(s for s, k in INJECTIONS.items() if k == "optimizer")
    v = _verdict_at(res.tables["verdicts"].to_pylist(), step)
    assert v["verdict"] == "not_data", v


def test_controls_judged_as_windows_are_data_at_most_alpha_of_the_time(audited):
    # every control judged as a one-step spike against the others: the test's calibration (exact ranks: at most
    # alpha of them reach p <= alpha, and a data verdict needs more than that)
    root, _, res = audited
    summary = json.loads((root / "audit" / "summary.json").read_text())
    cal = summary["control_calibration"]
    assert cal["n_controls"] >= 150 and not cal["excluded_as_anomalous"]
    assert cal["false_alarms"] <= 0.05 * cal["n_controls"], cal["alarms"]
    assert not any(v["verdict"] == "data" for v in res.tables["verdicts"].to_pylist()
                   if int(v["peak_step"]) not in INJECTIONS)


def test_loss_and_grad_norm_spikes_are_one_event_with_both_peaks(audited):
    _, _, res = audited
    spikes = res.tables["verdicts"].to_pylist()
    assert len(spikes) == len(INJECTIONS)  # the log has a grad-norm spike at every loss spike: 4 events, not 8
    for v in spikes:
        assert {p["metric"] for p in v["peaks"]} == {"train_loss", "grad_norm"}, v["peaks"]
        assert len(v["spikes"]) == 2 and v["window_end"] >= v["peak_step"]


def test_reason_states_the_row_count_and_the_control_maximum(audited):
    _, _, res = audited
    for v in res.tables["verdicts"].to_pylist():
        if v["verdict"] != "data":
            continue
        assert f"{v['anomalous_rows']} of 16 rows anomalous on {v['top_signal']} at step {v['top_step']}" in v["reason"]
        assert v["anomalous_rows"] > v["control_max_rows"] and v["effect_size"] <= 16
        assert 0 < v["p_value"] <= 0.05 and v["evidence"] <= 300


def test_flagged_rows_are_the_planted_rows(audited):
    _, truth, res = audited
    flags = res.tables["row_flags"].to_pylist()
    for step, t in truth["injections"].items():
        if t["kind"] == "optimizer":
            continue
        got = {(f["shard"], f["row"]) for f in flags if f["step"] == int(step)}
        want = {(f"train-{r // 400:05d}.parquet", r % 400) for r in t["rows"]}
        # every planted row is flagged, and at most one natural row with them
        assert want <= got and len(got - want) <= 1, (t["kind"], sorted(want - got), sorted(got - want))
    # nothing is flagged at a step where nothing was planted
    planted_steps = {int(s) for s, t in truth["injections"].items() if t["kind"] != "optimizer"}
    assert {f["step"] for f in flags} <= planted_steps


def test_tokens_scored_counts_each_step_once(audited):
    _, _, res = audited
    bs = res.tables["batch_scores"].to_pylist()
    per_step = {r["step"]: r["n_tokens"] for r in bs}
    assert res.n_tokens == sum(per_step.values()) <= sum(r["n_tokens"] for r in bs)
    assert len(per_step) == len({(r["step"]) for r in bs})


def test_resume_is_resolved_and_outputs_follow_their_schemas(audited):
    root, _, res = audited
    summary = json.loads((root / "audit" / "summary.json").read_text())
    # steps 251..270 were logged twice (crash at 270, resume from 250): 20 steps of every metric
    assert summary["log"]["n_replaced"] == 20 * len(summary["log"]["metrics"])
    assert "train_loss" in summary["log"]["metrics"]
    for spec in OUTPUT_SPECS:
        t = pq.read_table(root / "audit" / f"{spec.name}.parquet")
        assert t.schema.equals(spec.schema, check_metadata=False), spec.name
        assert t.schema.metadata[b"spike_audit.table"] == spec.name.encode()


def test_skip_list_quarantine_and_report(audited):
    root, truth, res = audited
    skip = json.loads((root / "audit" / "skip_list.json").read_text())
    data_steps = sorted(int(s) for s, t in truth["injections"].items() if t["kind"] != "optimizer")
    assert set(data_steps) <= set(skip["steps_to_skip"])
    assert skip["render"]["megatron"]["iterations_to_skip"] == skip["steps_to_skip"]
    assert 180 not in skip["steps_to_skip"]
    # the skip list names the planted rows of each data spike (the rows that carry it)
    for step, t in truth["injections"].items():
        if t["kind"] == "optimizer":
            continue
        entry = next(e for e in skip["spikes"] if e["spike_id"].endswith(f"/train_loss/{step}"))
        assert entry["skip_steps"] == [int(step)]
        got = {(d["shard"], d["row_start"]) for d in entry["skip_data"]}
        want = {(f"train-{r // 400:05d}.parquet", r % 400) for r in t["rows"]}
        assert want <= got and len(got - want) <= 1, (t["kind"], sorted(got ^ want))
    q = json.loads((root / "audit" / "quarantine.json").read_text())
    planted_shards = {s for t in truth["injections"].values() for s in t["shards"]}
    assert planted_shards == {e["shard"] for e in q["shards"]}
    assert all(e["n_flagged_rows"] >= 2 for e in q["shards"])
    html = (root / "audit" / "report.html").read_text()
    assert html.count("<svg") >= 3 and "not_data" in html and "Click here to subscribe" in html


def test_rerun_is_byte_identical(audited):
    root, _, _ = audited
    run_audit(_cfg(root, "audit2"))
    names = [f"{t}.parquet" for t in TABLES + ("loss_series",)]
    names += ["skip_list.json", "quarantine.json", "summary.json", "report.html", "metadata.json", "config.toml"]
    assert sorted(p.name for p in (root / "audit").iterdir() if not p.name.startswith(".")) == sorted(
        names + ["_SUCCESS"])
    for name in names:  # every output, not only the tables: nothing in them depends on time or the out path
        a = (root / "audit" / name).read_bytes()
        b = (root / "audit2" / name).read_bytes()
        assert a == b, name


def test_missing_shard_is_a_one_line_error_and_leaves_no_output(demo, tmp_path):
    root, _ = demo
    broken = tmp_path / "run"
    shutil.copytree(root / "run", broken)
    (broken / "shards" / "train-00004.parquet").unlink()
    cfg = RunConfig(log=str(broken / "train.log"), manifest=str(broken / "manifest.parquet"),
                    shards=str(broken / "shards"), out=str(tmp_path / "out"))
    with pytest.raises(UserError, match=r"manifest\.parquet: row (\d+): shard .train-00004\.parquet. not found") as err:
        run_audit(cfg)
    # the row named is the manifest file's own row (shard 4 starts at step 101: row 100 of the file)
    row = int(re.search(r"row (\d+)", str(err.value)).group(1))
    assert pq.read_table(broken / "manifest.parquet").slice(row, 1).column("shard")[0].as_py() == "train-00004.parquet"
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging left behind"


def test_manifest_log_mismatch_is_a_one_line_error(demo, tmp_path):
    root, _ = demo
    log = tmp_path / "other.log"
    text = (root / "run" / "train.log").read_text()
    # the same run logged 1000 iterations later: its spikes are outside the manifest
    log.write_text(re.sub(r"iteration\s+(\d+)/", lambda m: f"iteration {int(m.group(1)) + 1000:8d}/", text))
    cfg = RunConfig(log=str(log), manifest=str(root / "run" / "manifest.parquet"), shards=str(root / "run" / "shards"),
                    out=str(tmp_path / "out"))
    with pytest.raises(UserError, match=r"other\.log:\d+: train_loss at step 1\d\d\d maps to manifest step 1\d\d\d, "
                                        r"outside the manifest's steps 0\.\.399"):
        run_audit(cfg)
    assert not (tmp_path / "out").exists()


def test_empty_log_is_a_one_line_error(demo, tmp_path):
    root, _ = demo
    log = tmp_path / "empty.log"
    log.write_text("")
    cfg = RunConfig(log=str(log), manifest=str(root / "run" / "manifest.parquet"), shards=str(root / "run" / "shards"),
                    out=str(tmp_path / "out"))
    with pytest.raises(UserError):
        run_audit(cfg)
    assert not (tmp_path / "out").exists()


def test_state_rerun_after_the_log_grew_audits_only_new_spikes(demo, tmp_path):
    root, _ = demo
    full = (root / "run" / "train.log").read_text().splitlines(keepends=True)
    cut = next(i for i, line in enumerate(full) if "iteration      200/" in line)
    # the same log file, read once at step 200 and again after the run went on to step 400
    (tmp_path / "early").mkdir()
    early = tmp_path / "early" / "train.log"
    early.write_text("".join(full[: cut + 1]))
    grown = tmp_path / "train.log"
    grown.write_text("".join(full))
    state = str(tmp_path / "state")
    run = root / "run"

    def cfg(log, out):
        return RunConfig(log=str(log), manifest=str(run / "manifest.parquet"), shards=str(run / "shards"),
                         out=str(tmp_path / out), state=state)

    first = run_audit(cfg(early, "out1"))
    assert first.n_new_spikes >= 2
    second = run_audit(cfg(grown, "out2"))
    assert second.n_spikes > first.n_spikes
    # events (loss and grad-norm spikes together) not audited before: the verdicts the second run added
    assert second.n_new_spikes == second.tables["verdicts"].num_rows - first.tables["verdicts"].num_rows > 0
    old = {v["spike_id"]: v for v in first.tables["verdicts"].to_pylist()}
    new = {v["spike_id"]: v for v in second.tables["verdicts"].to_pylist()}
    for sid, v in old.items():
        assert new[sid] == v
    # nothing new: a third run audits nothing and writes identical tables
    third = run_audit(cfg(grown, "out3"))
    assert third.n_new_spikes == 0
    for name in TABLES:
        assert (tmp_path / "out2" / f"{name}.parquet").read_bytes() == (tmp_path / "out3" / f"{name}.parquet").read_bytes()


def test_a_manifest_of_only_the_required_columns_gives_the_same_audit(audited, tmp_path):
    """``unit`` and the other optional manifest columns may be left out (null ``unit`` means ``row``): the audit is
    the one of the full manifest (the duplicate reference read every row group without ``unit`` and failed)."""
    root, _, _ = audited
    t = pq.read_table(root / "run" / "manifest.parquet")
    slim = tmp_path / "manifest.parquet"
    pq.write_table(t.select(["step", "shard", "row_start", "row_end"]).replace_schema_metadata(t.schema.metadata), slim)
    cfg = _cfg(root, "unused")
    run_audit(RunConfig(**{**cfg.__dict__, "manifest": str(slim), "out": str(tmp_path / "out")}))
    for name in ("verdicts", "row_flags", "batch_scores", "shard_scores"):
        assert pq.read_table(tmp_path / "out" / f"{name}.parquet").equals(
            pq.read_table(root / "audit" / f"{name}.parquet")), name


def test_a_corrupt_page_in_the_manifest_is_a_one_line_error(demo, tmp_path):
    """A data page damaged past the footer (the footer and schema read fine): the manifest named, no traceback."""
    root, _ = demo
    src = root / "run" / "manifest.parquet"
    data = bytearray(src.read_bytes())
    at = pq.ParquetFile(src).metadata.row_group(0).column(0).data_page_offset
    for i in range(at + 30, at + 60):
        data[i] ^= 0xFF
    bad = tmp_path / "manifest.parquet"
    bad.write_bytes(bytes(data))
    cfg = RunConfig(log=str(root / "run" / "train.log"), manifest=str(bad), shards=str(root / "run" / "shards"),
                    out=str(tmp_path / "out"))
    with pytest.raises(UserError, match=r"manifest\.parquet: .*not a readable Parquet manifest") as err:
        run_audit(cfg)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_steps_of_another_size_than_samples_per_step_are_warned_about(audited, tmp_path, caplog):
    """A manifest whose step column puts two batches under one number (step 6's rows labelled 5): the audit judges
    what the manifest says, so the mismatch with the run description's samples_per_step is a warning."""
    import pyarrow as pa

    root, _, _ = audited
    t = pq.read_table(root / "run" / "manifest.parquet")
    st = t.column("step").to_numpy().copy()
    st[st == 6] = 5
    bad = tmp_path / "manifest.parquet"
    pq.write_table(t.set_column(t.schema.get_field_index("step"), t.schema.field("step"), pa.array(st)), bad)
    cfg = _cfg(root, "unused")
    with caplog.at_level("WARNING", logger="spike_audit.pipelines.run.plan"):
        run_audit(RunConfig(**{**cfg.__dict__, "manifest": str(bad), "out": str(tmp_path / "out")}))
    assert ("audited steps hold another number of rows than the run description's samples_per_step 16 (log step 6 "
            "has 32)") in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="spike_audit.pipelines.run.plan"):
        run_audit(RunConfig(**{**cfg.__dict__, "out": str(tmp_path / "out2")}))
    assert "samples_per_step" not in caplog.text


def test_a_state_rerun_after_the_manifest_or_shards_changed_at_the_same_paths_audits_again(demo, tmp_path):
    """The run state's fingerprint held the paths only: a manifest rebuilt at the same path (rows moved to other
    shards) kept the old verdicts, and a shard removed was not noticed. Now the state is another one: everything is
    judged again, as a fresh run judges it (and a missing shard is the fresh run's one-line error)."""
    import pyarrow as pa

    root, _ = demo
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    state = str(tmp_path / "state")

    def cfg(out, st=state):
        return RunConfig(log=str(run / "train.log"), manifest=str(run / "manifest.parquet"), shards=str(run / "shards"),
                         out=str(tmp_path / out), tokenizer=str(run / "tokenizer.json"), state=st)

    run_audit(cfg("out1"))
    assert run_audit(cfg("out1b")).n_new_spikes == 0  # unchanged inputs: nothing audited again
    t = pq.read_table(run / "manifest.parquet")
    moved = {f"train-{i:05d}.parquet": f"train-{(i + 1) % 16:05d}.parquet" for i in range(16)}
    i = t.schema.get_field_index("shard")
    pq.write_table(t.set_column(i, t.schema.field(i), pa.array([moved[x] for x in t.column("shard").to_pylist()]))
                   .replace_schema_metadata(t.schema.metadata), run / "manifest.parquet")
    again = run_audit(cfg("out2"))
    assert again.n_new_spikes == again.tables["verdicts"].num_rows > 0
    fresh = run_audit(cfg("out3", st=None))
    for name in ("verdicts", "row_flags"):
        assert again.tables[name].equals(fresh.tables[name]), name
    (run / "shards" / "train-00004.parquet").unlink()
    with pytest.raises(UserError, match=r"shard .train-00004\.parquet. not found"):
        run_audit(cfg("out4"))
