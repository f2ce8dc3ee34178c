"""Scheduled `run --state`: the control steps' scores are kept in the state, so a rerun after the log grew reads
only the new windows' rows and writes the tables a rerun that reads the controls again writes."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from spike_audit.pipelines.cli.main import main
from spike_audit.pipelines.run.audit import run_audit
from spike_audit.pipelines.run.plan import RunConfig

pytestmark = pytest.mark.slow

TABLES = ("spikes", "batch_scores", "shard_scores", "row_flags", "verdicts")


def _logs(demo, tmp_path):
    root, _ = demo
    full = (root / "run" / "train.log").read_text().splitlines(keepends=True)
    cut = next(i for i, line in enumerate(full) if "iteration      200/" in line)
    (tmp_path / "early").mkdir()
    early = tmp_path / "early" / "train.log"
    early.write_text("".join(full[: cut + 1]))
    grown = tmp_path / "train.log"
    grown.write_text("".join(full))
    return early, grown


def _without_cache(src, dst):
    """A copy of a run state as an older spike-audit wrote it: no control scores kept."""
    shutil.copytree(src / ".current", dst)
    doc = json.loads((dst / "state.json").read_text())
    doc.pop("control_cache")
    (dst / "state.json").write_text(json.dumps(doc))
    for kind in ("state_controls", "state_control_hist"):
        shutil.rmtree(dst / kind)
    (dst / ".spike-audit.json").write_text((src / ".spike-audit.json").read_text())


def test_rerun_reads_only_the_new_windows_and_matches_a_rerun_that_reads_the_controls(demo, tmp_path, capsys):
    root, _ = demo
    run = root / "run"
    early, grown = _logs(demo, tmp_path)

    def cfg(log, out, state):
        return RunConfig(log=str(log), manifest=str(run / "manifest.parquet"), shards=str(run / "shards"),
                         out=str(tmp_path / out), state=str(tmp_path / state))

    first = run_audit(cfg(early, "out1", "state"))
    r1 = first.summary["read"]
    assert r1["controls_from_state"] == 0 and r1["rows"] > 0
    _without_cache(tmp_path / "state", tmp_path / "plain-state")

    second = run_audit(cfg(grown, "out2", "state"))
    r2 = second.summary["read"]
    n_controls = second.summary["controls"]
    assert second.n_new_spikes > 0 and r2["controls_from_state"] == n_controls > 0
    # exactly the new windows' rows were read: one batch of rows per new window step
    bs = second.tables["batch_scores"].to_pylist()
    new_windows = {r["step"] for r in bs if r["role"] == "window"} - {r["step"] for r in
                                                                        first.tables["batch_scores"].to_pylist()
                                                                        if r["role"] == "window"}
    rows_per_step = {r["step"]: r["n_rows"] for r in bs}
    assert r2["rows"] == sum(rows_per_step[s] for s in new_windows) > 0
    ctrl_rows = sum(r["n_rows"] for r in bs if r["role"] == "control")
    assert r2["rows"] < ctrl_rows

    # the same rerun reading the controls again (a state without kept scores): identical tables
    plain = run_audit(cfg(grown, "out3", "plain-state"))
    assert plain.summary["read"]["controls_from_state"] == 0
    assert plain.summary["read"]["rows"] == r2["rows"] + ctrl_rows
    for name in TABLES:
        assert (tmp_path / "out2" / f"{name}.parquet").read_bytes() == \
            (tmp_path / "out3" / f"{name}.parquet").read_bytes(), name
    # that rerun kept the control scores in its state in turn; a run with nothing new keeps them too
    assert "control_cache" in json.loads((tmp_path / "plain-state" / "state.json").read_text())
    rc = main(["run", "--log", str(grown), "--manifest", str(run / "manifest.parquet"), "--shards",
               str(run / "shards"), "--out", str(tmp_path / "out4"), "--state", str(tmp_path / "state"), "--json"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["summary"]["read"]["rows"] == 0
    assert "control_cache" in json.loads((tmp_path / "state" / "state.json").read_text())

    # a damaged kept part is a one-line error naming it (never silently other scores)
    st = tmp_path / "state"
    part = sorted((st / "state_controls").iterdir())[0]
    real = os.path.realpath(part)
    data = open(real, "rb").read()
    os.chmod(real, 0o644)
    with open(real, "wb") as f:
        f.write(data[:-7])
    rc = main(["run", "--log", str(grown), "--manifest", str(run / "manifest.parquet"), "--shards",
               str(run / "shards"), "--out", str(tmp_path / "out5"), "--state", str(st)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and part.name in err, err


def test_a_control_cache_holding_a_step_twice_is_a_one_line_error(demo, tmp_path, capsys):
    """A state whose index lists a copied control-scores part (a step twice in the reference) was a ValueError
    traceback from inside the pipeline."""
    from spike_audit.pipelines.errors import UserError

    root, _ = demo
    run = root / "run"
    early, grown = _logs(demo, tmp_path)

    def cfg(log, out):
        return RunConfig(log=str(log), manifest=str(run / "manifest.parquet"), shards=str(run / "shards"),
                         out=str(tmp_path / out), state=str(tmp_path / "state"))

    run_audit(cfg(early, "out1"))
    cur = (tmp_path / "state" / ".current").resolve()
    doc = json.loads((cur / "state.json").read_text())
    files = doc["control_cache"]["files"]
    name = sorted(n for n in files if n.startswith("state_controls/"))[0]
    copy = name.replace("part-", "part-9")
    shutil.copy(cur / name, cur / copy)
    files[copy] = files[name]
    (cur / "state.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match=r"the control steps' scores hold step\(s\) \[\d+.*twice .*control cache is corrupt"):
        run_audit(cfg(grown, "out2"))
