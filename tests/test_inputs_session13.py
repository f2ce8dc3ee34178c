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


def test_demo_seed_out_of_range_is_refused_before_any_work(tmp_path, capsys):
    for seed in ("-1", str(2 ** 64)):
        _refused(capsys, ["demo", "--dir", str(tmp_path / "d"), "--seed", seed], r"--seed .*expected an integer from 0")
    assert not (tmp_path / "d").exists()


def test_demo_is_one_at_a_time_per_dir(tmp_path, capsys):
    import fcntl
    import os

    d = tmp_path / "d"
    d.mkdir()
    fd = os.open(d / ".spike-audit-demo.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a demo running in this --dir
    try:
        _refused(capsys, ["demo", "--dir", str(d)], r"another spike-audit demo is using this --dir")
    finally:
        os.close(fd)
    assert not (d / "run").exists()


def test_demo_after_one_killed_while_building(tmp_path, capsys):
    """A demo killed while writing its run left a half-written run that the next demo refused as "not a
    spike-audit demo run"; now the run is built aside and moved in whole, and leftovers of a killed demo (its
    building directory; an older version's half-written run) are cleared."""
    d = tmp_path / "d"
    (d / ".run-building" / "shards").mkdir(parents=True)
    (d / ".run-building" / "shards" / "train-00000.parquet").write_bytes(b"half")
    (d / "run" / "shards").mkdir(parents=True)
    (d / "run" / "shards" / "train-00000.parquet").write_bytes(b"half")
    (d / "run" / "tokenizer.json").write_text("{")
    assert main(["demo", "--dir", str(d), "-q"]) == 0
    assert (d / "run" / "truth.json").exists() and not (d / ".run-building").exists()
    assert pq.read_metadata(d / "run" / "shards" / "train-00000.parquet").num_rows > 0
    (d / "run" / "notes.txt").write_text("a user's file")  # no longer only a demo's files: never written into
    _refused(capsys, ["demo", "--dir", str(d)], r"exists and is not a spike-audit demo run")


def test_spikes_window_too_small_to_estimate_noise(tmp_path, capsys):
    """--window 1 found 73 "spikes" in a log with 4 (a MAD of one value is 0)."""
    log = _modded_log(tmp_path / "train.log")
    for w in ("1", "2", "7"):
        _refused(capsys, ["spikes", str(log), "--window", w], rf"--window {w}: expected at least 8 logged values")
    assert main(["spikes", str(log), "--window", "8"]) == 0


def test_jsonl_loss_key_renamed_halfway(tmp_path, capsys, caplog):
    """A logger that renames ``loss`` to ``train/loss`` halfway: the second half was counted as "unrelated lines"
    and left out without a word, also under --strict (a spike there was never seen)."""
    import logging

    from spike_audit.pipelines.logs.read import read_log

    p = tmp_path / "m.jsonl"
    rows = [{"step": i, "loss": 3.0} for i in range(60)] + [{"step": i, "train/loss": 3.0} for i in range(60, 120)]
    rows += [{"step": i, "eval_acc": 0.5} for i in range(0, 120, 30)]  # records with no loss key: unrelated
    p.write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING):
        table, rep = read_log(p)
    assert table.num_rows == 60
    assert any("line 61: 60 records hold a step and 'train/loss' but not 'loss'" in r.getMessage()
               for r in caplog.records)
    _refused(capsys, ["spikes", str(p), "--strict"], r"m\.jsonl: line 61: 60 records .*--value-key train/loss")
    table, _ = read_log(p, value_key="train/loss")
    assert table.num_rows == 60


def test_csv_value_holding_a_newline_shifts_no_line_number(tmp_path, capsys):
    from spike_audit.pipelines.logs.read import read_log

    rows = [f'{i},"a,b",{3.0 + 0.001 * i}' for i in range(1, 60)]
    rows[9] = '10,"line one\nline two ""quoted""",3.01'
    rows[39] = '40.5,"a,b",3.04'  # malformed: physical line 42 (header, 39 rows before it, one of two lines)
    p = tmp_path / "export.csv"
    p.write_text("Step,note,train/loss\n" + "\n".join(rows) + "\n")
    table, rep = read_log(p)
    line_of = dict(zip(table.column("step").to_pylist(), table.column("source_line").to_pylist()))
    assert line_of[9] == 10 and line_of[10] == 11 and line_of[11] == 13 and line_of[59] == 61
    assert rep.malformed_lines == [42]
    _refused(capsys, ["spikes", str(p), "--strict"], r"export\.csv:42: expected .* got '40\.5,")


def test_not_a_log_and_an_empty_log_say_so(tmp_path, capsys):
    """A manifest given as the log was read as TensorBoard ("no scalar tag containing 'loss'"); an empty log with
    --format said "(expected )"."""
    m = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"step": [0, 1]}), m)
    _refused(capsys, ["spikes", str(m)], r"manifest\.parquet: is a Parquet file, not a training log")
    e = tmp_path / "empty.log"
    e.write_text("")
    for fmt in ("megatron", "csv", "olmo", "jsonl"):
        _refused(capsys, ["spikes", str(e), "--format", fmt], rf"empty\.log: the log is empty \(no {fmt} records")


def test_jsonl_holding_a_loss_line_of_another_format(tmp_path, capsys, caplog):
    """Two loss records written as modded-nanogpt lines into a JSONL log were "unrelated lines", also under
    --strict (the warning needed 10 such lines): in a JSONL or CSV log one is enough."""
    import logging

    from spike_audit.pipelines.logs.read import read_log

    rows = [__import__("json").dumps({"step": i, "loss": 3.0}) for i in range(1, 80)]
    rows[40] = "step:41/80 train_loss:9.5000 train_time:41ms step_avg:1.00ms"
    p = tmp_path / "m.jsonl"
    p.write_text("\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING):
        read_log(p)
    assert any("line 41: read as jsonl, but 1 lines look like modded-nanogpt records" in r.getMessage()
               for r in caplog.records)
    _refused(capsys, ["spikes", str(p), "--strict"], r"m\.jsonl: line 41: read as jsonl, but 1 lines look like")


def test_jsonl_with_the_loss_inside_a_nested_object(tmp_path, capsys):
    """{"train": {"loss": ...}}: the error listed the key 'train' without saying that nested keys are not read."""
    p = tmp_path / "nested.jsonl"
    p.write_text("".join(__import__("json").dumps({"step": i, "train": {"loss": 3.0}, "lr": 1e-3}) + "\n"
                         for i in range(30)))
    _refused(capsys, ["spikes", str(p)], r"nested\.jsonl: no loss key found .*the values of 'train' are JSON objects, "
                                         r"whose keys are not read")
