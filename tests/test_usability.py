"""What users of data tools expect from the command line and the library (issue 14): progress through logging,
quiet Beam, one spelling per option, --version, --json, --dry-run, config files, run metadata and a completion
marker, multi-run logs, the Python API."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from spike_audit.pipelines import api
from spike_audit.pipelines.cli.main import build_parser, main
from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.progress import LiveLineHandler, Progress, tick
from spike_audit.pipelines.run.plan import RunConfig
from spike_audit.pipelines.shard_audit.config import ShardAuditConfig


def _cli(*args) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "spike-audit"
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=600)


# -- progress ---------------------------------------------------------------------------------------------------

def test_progress_counts_worker_ticks_and_shows_rate_and_eta(caplog):
    caplog.set_level(logging.INFO, logger="spike_audit.progress")
    with Progress("reading", total_rows=100, total_shards=4, interval=0.0) as pr:
        tick(rows=25, tokens=1000, shards=1)
        tick(rows=25, tokens=1000, shards=1)
        line = pr.line()
    assert pr.done == {"rows": 50, "tokens": 2000, "shards": 2, "bytes": 0}
    assert "50/100 rows (50%)" in line and "2/4 shards" in line and "tokens/s" in line and "ETA" in line
    msgs = [r.getMessage() for r in caplog.records if r.name == "spike_audit.progress"]
    assert msgs[-1].startswith("reading: 50/100 rows") and len(msgs) >= 3  # start, each tick, the end
    # outside a Progress a tick is not counted and costs nothing
    tick(rows=10)
    assert pr.done["rows"] == 50


def test_live_line_is_redrawn_in_place_on_a_terminal_and_plain_lines_otherwise():
    tty, plain = io.StringIO(), io.StringIO()
    lg = logging.getLogger("spike_audit.progress")
    handlers = [LiveLineHandler(tty, tty=True), LiveLineHandler(plain, tty=False)]
    old = lg.level
    lg.setLevel(logging.INFO)
    for h in handlers:
        lg.addHandler(h)
    try:
        with Progress("reading", total_rows=10, interval=0.0):
            tick(rows=5)
        logging.getLogger("spike_audit.progress").warning("an ordinary line")
    finally:
        for h in handlers:
            lg.removeHandler(h)
        lg.setLevel(old)
    assert "\rreading: 5/10 rows (50%)" in tty.getvalue()  # redrawn with a carriage return
    assert tty.getvalue().endswith("an ordinary line\n")  # the live line is cleared before an ordinary one
    lines = plain.getvalue().splitlines()
    assert "\r" not in plain.getvalue() and any("5/10 rows" in ln for ln in lines)


def test_beam_warnings_hidden_by_default_and_at_q_shown_at_v():
    # Beam logs "apitools not found ..." on the root logger when its options are imported (beam_options does)
    code = ("import logging, sys; from spike_audit.pipelines.cli.main import setup_logging; "
            "setup_logging(int(sys.argv[1]), sys.argv[2] == 'q'); "
            "from spike_audit.pipelines.beam.options import beam_options; beam_options([]); "
            "logging.getLogger('apache_beam').info('beam info'); "
            "logging.getLogger('apache_beam.io').warning('beam warning'); "
            "logging.getLogger('spike_audit.pipelines.x').debug('our debug'); "
            "logging.getLogger('spike_audit.pipelines.x').info('our info')")

    def stderr(verbose, quiet):
        return subprocess.run([sys.executable, "-c", code, str(verbose), "q" if quiet else "-"], capture_output=True,
                              text=True, timeout=120).stderr

    q, default, v, vv = stderr(0, True), stderr(0, False), stderr(1, False), stderr(2, False)
    assert "apitools" not in q + default + v and "beam warning" not in q + default, (q, default)
    assert "our info" in default and "our debug" not in default and "our info" not in q
    assert "beam warning" in v and "our debug" in v and "beam info" not in v
    assert "beam info" in vv


# -- one spelling per option, --version, help ------------------------------------------------------------------

def test_version_and_one_spelling_per_column_option():
    out = _cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("spike-audit ")
    for cmd in ("run", "shards", "batch"):
        h = _cli(cmd, "--help").stdout
        assert "--tokens-column" in h and "--text-column" in h, cmd
        assert "--tokens-col " not in h and "--tokens-col," not in h, cmd  # the old spelling is a hidden alias
    parser = build_parser()
    a = parser.parse_args(["shards", "x", "--out", "o", "--tokens-col", "ids", "--text-col", "body"])
    assert (a.tokens_col, a.text_col) == ("ids", "body")
    a = parser.parse_args(["batch", "--manifest", "m", "--step", "1", "--tokens-col", "ids"])
    assert a.tokens_col == "ids" and a.text_col == "text"
    h = _cli("run", "--help").stdout
    for flag in ("--step-key", "--value-key", "--tag", "--format", "--strict", "--pattern", "--json", "--dry-run",
                 "--config", "--run"):
        assert flag in h, flag
    assert f"(default {RunConfig.n_controls})" in h  # defaults shown from the config dataclass
    assert "--dry-run" in _cli("shards", "--help").stdout


def test_cli_and_dataclass_share_defaults_and_flags_override_a_config_file(tmp_path):
    from spike_audit.pipelines.cli.run import config_from_args
    from spike_audit.pipelines.cli.shards import config_from_args as shards_config

    parser = build_parser()
    cfg, beam = config_from_args(parser.parse_args(["run", "--log", "l", "--manifest", "m", "--shards", "s",
                                                    "--out", "o"]))
    assert cfg == RunConfig(log="l", manifest="m", shards="s", out="o") and "--runner" not in " ".join(beam)
    cfg, _ = shards_config(parser.parse_args(["shards", "a", "b", "--out", "o"]))
    assert cfg == ShardAuditConfig(inputs=("a", "b"), out="o")

    conf = tmp_path / "audit.toml"
    conf.write_text('beam = ["--direct_num_workers=1"]\ncontrols = 40\n[run]\nlog = "l"\nmanifest = "m"\n'
                    'shards = "s"\nout = "o"\nmin-rows = 3\ntokens_column = "ids"\n[shards]\nthreshold = 0.5\n')
    args = parser.parse_args(["run", "--config", str(conf), "--controls", "60"])
    cfg, beam = config_from_args(args)
    assert (cfg.n_controls, cfg.min_rows, cfg.tokens_col, cfg.log) == (60, 3, "ids", "l")  # flag wins
    assert beam[0] == "--direct_num_workers=1"
    for bad, msg in (('[run]\ncontrolz = 5\n', "unknown setting 'controlz'"),
                     ('[run]\ncontrols = "many"\n', "controls: expected an integer"),
                     ('[run\n', "not a valid TOML")):
        conf.write_text(bad)
        with pytest.raises(UserError, match=msg):
            config_from_args(parser.parse_args(["run", "--config", str(conf), "--log", "l", "--manifest", "m",
                                                "--shards", "s", "--out", "o"]))
    conf.write_text("[run]\nlog = 'l'\n")
    assert main(["run", "--config", str(conf)]) == 2  # missing --manifest ...: a one-line error


# -- multi-run logs ---------------------------------------------------------------------------------------------

def _curve(seed, spike):
    rng = np.random.default_rng(seed)
    return [(s, 3 - s / 300 + rng.normal(0, 0.01) + (2.0 if s == spike else 0.0)) for s in range(1, 301)]


def test_tensorboard_logdir_with_run_subfolders_is_separate_runs_aligned_by_spikes(tmp_path, capsys):
    from tensorboardX import SummaryWriter

    for name, spike in (("run-a", 150), ("run-b", 150), ("run-c", 90)):
        w = SummaryWriter(str(tmp_path / "tb" / name))
        for s, v in _curve(hash(name) % 100, spike):
            w.add_scalar("train/loss", v, s)
        w.close()
    loss, report = api.read_log(tmp_path / "tb")
    assert sorted(set(loss.column("run").to_pylist())) == ["run-a", "run-b", "run-c"]
    assert report.n_replaced == 0 and report.n_values == 900  # nothing taken for a resume
    assert main(["spikes", str(tmp_path / "tb"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(a["step"], a["runs"]) for a in doc["aligned_spikes"]] == [(150, ["run-a", "run-b"])]


def test_wandb_csv_export_of_several_runs_is_separate_runs(tmp_path):
    rows = ["Step,a - train/loss,a - train/loss__MIN,a - train/loss__MAX,b - train/loss,b - train/loss__MAX"]
    ca, cb = dict(_curve(1, 120)), dict(_curve(2, 200))
    for s in range(1, 301):
        rows.append(f"{s},{ca[s]},{ca[s] - 1},{ca[s] + 1},{cb[s] if s % 3 else ''},{cb[s] + 1}")
    (tmp_path / "export.csv").write_text("\n".join(rows) + "\n")
    loss, report = api.read_log(tmp_path / "export.csv")
    runs = loss.column("run").to_pylist()
    assert sorted(set(runs)) == ["a", "b"] and runs.count("a") == 300 and runs.count("b") == 200
    a = loss.filter(np.array([r == "a" for r in runs]))
    assert np.allclose(a.column("value").to_numpy(), [ca[s] for s in a.column("step").to_pylist()])  # not __MIN/MAX
    spikes = api.detect_spikes(loss, metrics=("train_loss",))
    assert sorted(zip(spikes.column("run").to_pylist(), spikes.column("peak_step").to_pylist())) == [
        ("a", 120), ("b", 200)]
    # the spike audit needs one run: the manifest is one run's data order
    cfg = RunConfig(log=str(tmp_path / "export.csv"), manifest="m", shards="s", out="o")
    from spike_audit.pipelines.run.plan import read_loss_and_spikes

    with pytest.raises(UserError, match=r"holds 2 runs \(a, b\).*--run"):
        read_loss_and_spikes(cfg)
    loss_b, _, spikes_b = read_loss_and_spikes(RunConfig(**{**cfg.__dict__, "run": "b"}))
    assert set(loss_b.column("run").to_pylist()) == {"b"} and spikes_b.column("peak_step").to_pylist() == [200]


# -- dry runs, --json, metadata, the API (end to end on the demo and the corpus) ---------------------------------

@pytest.mark.slow
def test_run_dry_run_reads_no_shard_data_and_json_api_and_metadata(demo, tmp_path, capsys, monkeypatch):
    root, truth = demo
    run = root / "run"
    base = ["--log", run / "train.log", "--manifest", run / "manifest.parquet", "--shards", run / "shards"]
    import spike_audit.pipelines.shards.base as sbase

    def no_reads(*a, **k):
        raise AssertionError("a dry run read shard data")

    monkeypatch.setattr(sbase.ShardReader, "read", no_reads)
    assert main(["run", *map(str, base), "--out", str(tmp_path / "never"), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert not (tmp_path / "never").exists()
    planted = {int(s) for s in truth["injections"]}
    peaks = {s["peak_step"] for s in plan["spikes"]}
    assert planted <= peaks and plan["n_controls"] == len(plan["controls"]) > 20
    for e in plan["events"]:  # each event's window: from its start minus the lookback to its peak
        assert e["window"] and e["window"][-1] <= e["end"] and e["window"][0] >= e["start"] - 2
    assert plan["read"]["rows"] > 0 and 0 < plan["read"]["bytes_to_read"] <= plan["read"]["shard_bytes"]
    monkeypatch.undo()

    conf = tmp_path / "run.toml"
    conf.write_text(f'[run]\nlog = "{run / "train.log"}"\nmanifest = "{run / "manifest.parquet"}"\n'
                    f'shards = "{run / "shards"}"\ntokenizer = "{run / "tokenizer.json"}"\n')
    assert main(["run", "--config", str(conf), "--out", str(tmp_path / "cli"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert 1 <= len(doc["verdicts"]) <= doc["n_spikes"] and {v["verdict"] for v in doc["verdicts"]} <= {
        "data", "not_data", "inconclusive"}
    res = api.audit_run(config_file=str(conf), out=str(tmp_path / "api"))
    for name in ("verdicts", "batch_scores", "row_flags", "shard_scores"):
        assert (tmp_path / "cli" / f"{name}.parquet").read_bytes() == (tmp_path / "api" / f"{name}.parquet").read_bytes()
    loaded = api.load_results(tmp_path / "api")
    assert loaded["verdicts"].equals(pq.read_table(tmp_path / "api" / "verdicts.parquet"))
    assert loaded["summary"]["spikes"] == res.n_spikes and loaded["completion"]["files"]

    meta = json.loads((tmp_path / "cli" / "metadata.json").read_text())
    assert meta["tool"] == "spike-audit" and meta["command"] == "run" and meta["settings"]["n_controls"] == RunConfig.n_controls
    log_fp = [i for i in meta["inputs"] if i["what"] == "log"][0]
    assert log_fp["size"] == (run / "train.log").stat().st_size and log_fp["path"] == str(run / "train.log")
    done = json.loads((tmp_path / "cli" / "_SUCCESS").read_text())
    assert set(done["files"]) == {p.name for p in (tmp_path / "cli").iterdir() if not p.name.startswith(".")} - {"_SUCCESS"}
    # the saved config reproduces the run: same settings through --config
    saved = tomllib.loads((tmp_path / "cli" / "config.toml").read_text())["run"]
    assert api.load_config(tmp_path / "cli" / "config.toml", "run") == RunConfig(**{**saved, "out": ""})
    # an output without its marker is refused
    (tmp_path / "api" / "_SUCCESS").unlink()
    with pytest.raises(UserError, match="incomplete output"):
        api.load_results(tmp_path / "api")


