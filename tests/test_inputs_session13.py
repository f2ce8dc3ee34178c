"""Inputs found in session 13's campaigns, through the command line: what a user's files hold, read right or
refused with one line (exit 2, no traceback)."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spike_audit.pipelines.cli.main import main


def _refused(capsys, argv, pattern):
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, (rc, err)
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert re.search(pattern, err), (pattern, err)


def _texts(seed: int, n: int = 200) -> list[str]:
    rng = np.random.default_rng(seed)
    out = [" ".join(f"w{int(x)}" for x in rng.integers(0, 400, size=50)) for _ in range(n)]
    out[3] = "=" * 300  # a row the audit flags, so the tables hold more than zeros
    return out


def test_text_stored_as_bytes_is_read_as_its_strings(tmp_path, capsys):
    """A text column written as binary (Spark without binaryAsString, other writers) holds the same UTF-8
    bytes as a string column: the same audit, not a refusal."""
    for kind, typ in (("str", pa.string()), ("bin", pa.binary()), ("lbin", pa.large_binary())):
        d = tmp_path / kind
        d.mkdir()
        for s in range(3):
            texts = _texts(s)
            col = pa.array([t.encode() for t in texts] if typ != pa.string() else texts, typ)
            pq.write_table(pa.table({"text": col}), d / f"part-{s}.parquet")
        assert main(["shards", str(d), "--out", str(tmp_path / f"out-{kind}"), "-q"]) == 0
    tables = {k: pq.read_table(tmp_path / f"out-{k}" / "shard_scores.parquet").drop_columns(["fingerprint"])
              for k in ("str", "bin", "lbin")}
    assert tables["str"].num_rows == 3
    assert tables["bin"].equals(tables["str"]) and tables["lbin"].equals(tables["str"])
    flags = {k: pq.read_table(tmp_path / f"out-{k}" / "row_flags.parquet") for k in ("str", "bin")}
    assert flags["str"].num_rows > 0 and flags["bin"].equals(flags["str"])


def test_bytes_that_are_not_utf8_in_a_binary_text_column(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    texts = [t.encode() for t in _texts(0, 40)]
    texts[17] = b"fine so far \xff\xfe then not"
    pq.write_table(pa.table({"text": pa.array(texts, pa.large_binary())}), tmp_path / "r" / "s.parquet")
    _refused(capsys, ["shards", str(tmp_path / "r"), "--out", str(tmp_path / "out")],
             r"s\.parquet: row 17: 'text' is not valid UTF-8 text")


def test_run_state_is_found_from_another_directory(demo, tmp_path, monkeypatch, capsys, caplog):
    """A scheduled job runs from another directory than the first run, or names the inputs by other paths: the
    same inputs are the same state (it audited everything again when the paths were spelled otherwise)."""
    import logging

    root, _ = demo
    run = root / "run"
    out, state = tmp_path / "out", tmp_path / "state"
    args = ["--tokenizer", "tokenizer.json", "--out", str(out), "--state", str(state), "-q"]
    monkeypatch.chdir(run)
    assert main(["run", "--log", "train.log", "--manifest", "manifest.parquet", "--shards", "shards", *args]) == 0
    elsewhere = tmp_path / "cron"
    elsewhere.mkdir()
    (elsewhere / "data").symlink_to(run)
    monkeypatch.chdir(elsewhere)
    for shards in (str(run / "shards"), "data/shards"):
        capsys.readouterr()
        with caplog.at_level(logging.WARNING):
            caplog.clear()
            rc = main(["run", "--log", str(run / "train.log"), "--manifest", "data/manifest.parquet", "--shards",
                       shards, "--tokenizer", str(run / "tokenizer.json"), "--out", str(out), "--state", str(state),
                       "--dry-run"])
        printed = capsys.readouterr().out
        assert rc == 0
        assert not any("auditing everything again" in r.getMessage() for r in caplog.records), shards
        assert re.search(r"\b0 to audit\b", printed), printed


def _modded_log(path, n=80):
    path.write_text("".join(f"step:{i}/{n} train_loss:{3.0 + 0.01 * (i % 5):.4f} train_time:{i}ms step_avg:1.00ms\n"
                            for i in range(1, n)) + "step:40/80 val_loss:3.5 train_time:40ms step_avg:1.00ms\n")
    return path


def test_spikes_on_a_metric_the_log_does_not_have(tmp_path, capsys):
    """It printed "0 spike event(s)" and exited 0 (and wrote outputs) for a misspelled --metric."""
    log = _modded_log(tmp_path / "train.log")
    _refused(capsys, ["spikes", str(log), "--metric", "train_los", "--out", str(tmp_path / "o")],
             r"train\.log: no 'train_los' values \(metrics found: train_loss, val_loss\)")
    assert not (tmp_path / "o").exists()
    only_val = tmp_path / "val.log"
    only_val.write_text("step:40/80 val_loss:3.5 train_time:40ms step_avg:1.00ms\n")
    _refused(capsys, ["spikes", str(only_val)], r"no train_loss or grad_norm values \(metrics found: val_loss\)")
    assert main(["spikes", str(log), "--metric", "val_loss"]) == 0


def test_log_options_that_the_format_does_not_read(tmp_path, capsys):
    """--value-key on a text log, --tag on JSONL: silently ignored before, auditing another metric than asked."""
    log = _modded_log(tmp_path / "train.log")
    _refused(capsys, ["spikes", str(log), "--value-key", "val_loss"],
             r"--value-key 'val_loss' applies to jsonl and csv logs; this log is read as modded-nanogpt")
    j = tmp_path / "m.jsonl"
    j.write_text("".join(f'{{"step": {i}, "loss": 3.0}}\n' for i in range(50)))
    _refused(capsys, ["spikes", str(j), "--tag", "train/loss"], r"--tag 'train/loss' applies to tensorboard logs")
    assert main(["spikes", str(j), "--value-key", "loss"]) == 0
