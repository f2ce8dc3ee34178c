"""Regressions from the hostile-input campaign against the installed command line (session 5): each case once
gave a traceback, a misleading message, or silently dropped or shifted data. Every one is now a one-line error
naming the file and the row or line, exit code 2 (or, where the input is valid, the right reading)."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spike_audit.pipelines.cli.main import main
from spike_audit.pipelines.manifest import manifest_from_arrays, write_manifest


def _one_line_error(capsys, pattern):
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if " INFO " not in ln and " WARNING " not in ln]
    assert len(err) == 1 and re.search(pattern, err[0]), err
    return err[0]


@pytest.fixture()
def root(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(pa.table({"tokens": pa.array([[1, 2, 3, 4]] * 8, pa.list_(pa.int64()))}), shards / "a.parquet")
    return tmp_path


def _manifest(root, **replace_cols):
    m = manifest_from_arrays([0, 1, 2, 3], ["a.parquet"] * 4, [0, 2, 4, 6], [2, 4, 6, 8])
    for name, arr in replace_cols.items():
        m = m.set_column(m.schema.get_field_index(name), name, arr)
    path = root / "manifest.parquet"
    write_manifest(m, path) if not replace_cols else pq.write_table(m, path)
    return path


def _batch(root, man, step=1):
    return main(["batch", "--manifest", str(man), "--shards", str(root / "shards"), "--step", str(step)])


def test_uint64_step_beyond_int64_is_a_one_line_error_naming_the_row(root, capsys):
    man = _manifest(root, step=pa.array([0, 1, 2 ** 64 - 1, 3], pa.uint64()))
    assert _batch(root, man) == 2
    _one_line_error(capsys, r"manifest\.parquet: row 2: column 'step' value 18446744073709551615 does not fit int64")


def test_rank_beyond_int32_is_a_one_line_error(root, capsys):
    man = _manifest(root, rank=pa.array([0, 2 ** 40, 0, 0], pa.int64()))
    assert _batch(root, man) == 2
    _one_line_error(capsys, r"manifest\.parquet: row 1: column 'rank' value 1099511627776 does not fit int32")


def test_negative_step_in_a_manifest_is_refused(root, capsys):
    man = _manifest(root, step=pa.array([0, 1, -3, 3], pa.int64()))
    assert _batch(root, man) == 2
    _one_line_error(capsys, r"manifest\.parquet: row 2: step -3, expected a non-negative batch index")


def _with_meta(path, raw: bytes | None = None, version: bytes | None = None):
    t = pq.read_table(path)
    md = dict(t.schema.metadata)
    if raw is not None:
        md[b"spike_audit.manifest"] = raw
    if version is not None:
        md[b"spike_audit.version"] = version
    pq.write_table(t.replace_schema_metadata(md), path)
    return path


@pytest.mark.parametrize("raw, pattern", [
    (b'{"step_convention": "batch_index", "trainer": "megatron"', r"run description .* is not valid JSON"),
    (b'[1, 2]', r"run description .* is a list, expected a JSON object"),
    (json.dumps({"step_convention": "batch_index", "samples_per_step": "abc"}).encode(),
     r"samples_per_step = 'abc', expected a non-negative integer"),
    (json.dumps({"token_dtype": "float99"}).encode(), r"token_dtype = 'float99', expected an integer dtype"),
    (json.dumps({"token_dtype": "float32"}).encode(), r"token_dtype = 'float32', expected an integer dtype"),
    # names NumPy cannot parse raise ValueError, not TypeError, inside np.dtype: they were a traceback
    (json.dumps({"token_dtype": "1e-320"}).encode(), r"token_dtype = '1e-320', expected an integer dtype"),
    (json.dumps({"token_dtype": "u2,u2"}).encode(), r"token_dtype = 'u2,u2', expected an integer dtype"),
    (json.dumps({"flat_rows": {"kind": "windows", "seq_len": -1}}).encode(), r"flat_rows = .*seq_len"),
    (json.dumps({"first_step": -5}).encode(), r"first_step = -5, expected a non-negative integer"),
    # a divisor of the step join at 0, a count past int64: were an OverflowError traceback in `run`
    (json.dumps({"samples_per_step": 0}).encode(), r"samples_per_step = 0, expected a positive integer"),
    (json.dumps({"tokens_per_step": 0}).encode(), r"tokens_per_step = 0, expected a positive integer"),
    (json.dumps({"samples_before_first_step": 2 ** 70}).encode(),
     r"samples_before_first_step = 1180591620717411303424, expected a non-negative integer \(at most 2\^63 - 1\)"),
])
def test_damaged_manifest_metadata_is_an_error_never_dropped(root, capsys, raw, pattern):
    """A damaged run description was dropped silently: the join then ran on the log's own step numbers (a shift
    of one batch for a Megatron log) and raw token files were read with the default dtype."""
    man = _with_meta(_manifest(root), raw=raw)
    assert _batch(root, man) == 2
    _one_line_error(capsys, r"^spike-audit batch: error: \S*/manifest\.parquet: (manifest metadata )?(the )?" + pattern)


def test_non_integer_table_version_is_a_one_line_error(root, capsys):
    man = _with_meta(_manifest(root), version=b"abc")
    assert _batch(root, man) == 2
    _one_line_error(capsys, r"manifest\.parquet: table version 'abc' in its metadata, expected an integer")


# ------------------------------------------------------------------------------------ two records on one line

_RECORDS = {
    "megatron": lambda s, v: f" iteration {s:8d}/     400 | consumed samples: {16 * s:8d} | lm loss: {v:E} |",
    "modded-nanogpt": lambda s, v: f"step:{s}/400 train_loss:{v:.4f} train_time:{s}ms step_avg:1.0ms",
    "llmc": lambda s, v: f"s:{s} trl:{v:.4f} lr:0.0001 norm:0.5",
    "nanogpt": lambda s, v: f"iter {s}: loss {v:.4f}, time 10.00ms, mfu 1.00%",
    "torchtitan": lambda s, v: f"[rank0]: step: {s:3d}  loss: {v:.4f}  memory: 1.0GiB(1.0%)  tps: 100",
}


@pytest.mark.parametrize("fmt", sorted(_RECORDS))
def test_two_records_on_one_line_are_malformed_never_merged(tmp_path, fmt):
    """Two ranks writing to one stdout without a newline between them put two records on a line: the Megatron
    reader took the first record's step with the second's loss (a value shifted by one step) and dropped the
    second step silently."""
    from spike_audit.pipelines.logs.read import read_log

    render = _RECORDS[fmt]
    lines = [render(s, 3.0 + s / 100) for s in range(1, 31)]
    cut = lines[9][: len(lines[9]) // 2]  # step 10's line cut off by step 11's
    lines[9:11] = [cut + lines[10]]
    p = tmp_path / "run.log"
    p.write_text("\n".join(lines) + "\n")
    table, rep = read_log(p, format=fmt)
    loss = table.filter(pa.compute.equal(table["metric"], "train_loss"))
    steps = loss["step"].to_pylist()
    assert 10 not in steps and 11 not in steps, steps
    assert rep.n_malformed == 1 and rep.malformed_lines == [10]
    assert dict(zip(steps, loss["value"].to_pylist()))[12] == pytest.approx(3.12)


# --------------------------------------------------------------------------- settings out of range, usage errors

_RUN = ["run", "--log", "x.log", "--manifest", "m.parquet", "--shards", "s", "--out", "o", "--dry-run"]


@pytest.mark.parametrize("flags, pattern", [
    (["--alpha", "2"], r"--alpha must be > 0\.0 and < 1\.0, got 2\.0"),
    (["--alpha", "nan"], r"--alpha must be > 0\.0 and < 1\.0, got nan"),
    (["--seed", "-1"], r"--seed must be >= 0 and <= 18446744073709551615, got -1"),
    (["--step-offset", str(10 ** 20)], r"--step-offset must be >= -\d+ and <= \d+, got 100000000000000000000"),
    (["--eos-id", "-1"], r"--eos-id must be >= 0 and <= 16777215, got -1"),
    (["--pad-id", str(2 ** 40)], r"--pad-id must be >= 0 and <= 16777215, got 1099511627776"),
    (["--dtype", "float32"], r"--dtype must be an integer token dtype .*, got 'float32'"),
    (["--dtype", "garbage"], r"--dtype must be an integer token dtype .*, got 'garbage'"),
])
def test_run_settings_out_of_range_are_one_line_errors(tmp_path, monkeypatch, capsys, flags, pattern):
    """--alpha 2 / nan and --seed -1 and a huge --step-offset were tracebacks; a negative --eos-id, a pad id beyond
    any vocabulary and a float or unknown --dtype were accepted silently."""
    monkeypatch.chdir(tmp_path)
    assert main(_RUN + flags) == 2
    _one_line_error(capsys, r"^spike-audit run: error: " + pattern)


def test_settings_out_of_range_in_a_config_file_name_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.toml").write_text("[run]\nseed = -4\ndtype = 'float64'\n")
    assert main(_RUN + ["--config", "c.toml"]) == 2
    _one_line_error(capsys, r"^spike-audit run: error: c\.toml: --seed must be >= 0")
    assert main(_RUN + ["--config", "c.toml", "--seed", "1"]) == 2
    _one_line_error(capsys, r"^spike-audit run: error: c\.toml: --dtype must be an integer token dtype")


@pytest.mark.parametrize("flags, pattern", [
    (["--fail-on", "bogus"], r"^spike-audit run: error: argument --fail-on: invalid choice: 'bogus'"),
    (["--controls", "x"], r"^spike-audit run: error: argument --controls: invalid int value: 'x'"),
    (["--direct_num_workers", "abc"], r"^spike-audit run: error: Beam option: argument --direct_num_workers: "
                                      r"invalid int value: 'abc'"),
])
def test_usage_mistakes_are_one_line(tmp_path, monkeypatch, capsys, flags, pattern):
    """argparse printed its whole usage block first (for a Beam option, ~150 lines of Beam's usage)."""
    monkeypatch.chdir(tmp_path)
    try:
        rc = main(_RUN + flags)  # a Beam option is refused when the pipeline options are checked
    except SystemExit as exc:  # argparse's own mistakes exit from the parser
        rc = exc.code
    assert rc == 2
    _one_line_error(capsys, pattern)


def test_usage_mistakes_are_one_line_for_the_command_too(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bogus"])
    assert exc.value.code == 2
    _one_line_error(capsys, r"^spike-audit: error: argument COMMAND: invalid choice: 'bogus'")


def test_config_file_that_is_a_fifo_or_a_symlink_loop_is_refused_at_once(tmp_path, monkeypatch, capsys):
    """A FIFO as --config blocked for ever; a symlink loop was an OSError traceback."""
    import os

    monkeypatch.chdir(tmp_path)
    os.mkfifo("fifo.toml")
    os.symlink("b.toml", "a.toml")
    os.symlink("a.toml", "b.toml")
    assert main(_RUN + ["--config", "fifo.toml"]) == 2
    _one_line_error(capsys, r"^spike-audit run: error: fifo\.toml: not a regular file \(a FIFO\); expected a file")
    assert main(_RUN + ["--config", "a.toml"]) == 2
    _one_line_error(capsys, r"^spike-audit run: error: a\.toml: cannot read \(Too many levels of symbolic links\)")


# ------------------------------------------------------------------ run reads the manifest its own way (push-down)

def _run_dry(root, man):
    log = root / "train.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 3.0}) + "\n" for s in range(4)))
    return main(["run", "--log", str(log), "--manifest", str(man), "--shards", str(root / "shards"), "--out",
                 str(root / "out"), "--log-trainer", "batch-index", "--dry-run", "-q"])


@pytest.mark.parametrize("col, arr, pattern", [
    ("step", pa.array(["0", "1", "2", "3"]), r"column 'step' has type string, expected int64"),
    ("step", pa.array([0, 1, -3, 3], pa.int64()), r"row 2: step -3, expected a non-negative batch index"),
    ("step", pa.array([0, 1, 2 ** 64 - 1, 3], pa.uint64()), r"row 2: step 18446744073709551615, expected a non-neg"),
])
def test_run_checks_the_manifest_step_column(root, capsys, col, arr, pattern):
    """`run` compared a string step column as text (its steps "0".."99") and took uint64 and negative steps."""
    assert _run_dry(root, _manifest(root, **{col: arr})) == 2
    _one_line_error(capsys, r"manifest\.parquet: " + pattern)


def test_run_with_a_manifest_of_no_rows_or_a_fifo(root, capsys):
    """A manifest with no rows was a TypeError traceback; a FIFO as the manifest blocked `run` for ever."""
    import os

    empty = manifest_from_arrays([], [], [], [])
    write_manifest(empty, root / "manifest.parquet")
    assert _run_dry(root, root / "manifest.parquet") == 2
    _one_line_error(capsys, r"manifest\.parquet: the manifest has no rows")
    os.mkfifo(root / "fifo.parquet")
    assert _run_dry(root, root / "fifo.parquet") == 2
    _one_line_error(capsys, r"fifo\.parquet: not a regular file \(a FIFO\); expected a Parquet manifest")


# ------------------------------------------------------------------------------ outputs / state of a newer layout

@pytest.mark.parametrize("layout", [2, 999, "x", None])
def test_an_output_or_state_of_another_layout_is_never_written_over(tmp_path, capsys, layout):
    """A state directory whose marker says a newer layout was written over (its files then read by this version)."""
    from spike_audit.pipelines.outdir import MARKER, OutDir

    with OutDir(tmp_path / "state", "shard-state") as o:
        (o.path / "keep.txt").write_text("newer data")
    marker = tmp_path / "state" / MARKER
    m = json.loads(marker.read_text())
    m["layout"] = layout
    marker.write_text(json.dumps(m))
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(pa.table({"tokens": pa.array([[1, 2, 3]] * 4, pa.list_(pa.int64()))}), shards / "a.parquet")
    assert main(["shards", str(shards), "--out", str(tmp_path / "out"), "--state", str(tmp_path / "state")]) == 2
    _one_line_error(capsys, r"state: --state was written by (a newer spike-audit|an unknown writer) \(\.spike-audit\.json "
                            r"layout .*; this version reads and writes layout 1\)")
    assert json.loads(marker.read_text())["layout"] == layout
    assert (tmp_path / "state" / "keep.txt").read_text() == "newer data"


# ------------------------------------------------------------------------------------------ replay's arguments

@pytest.mark.parametrize("flags, pattern", [
    (["--steps", "0:99999999999999999999"], r"--steps: '0:99999999999999999999': expected step numbers in \[0, 2\^62\]"),
    (["--steps", "0:1000000000000"], r"--steps: '0:1000000000000' names more than 1,000,000 steps"),
    (["--steps", "-3"], r"--steps: '-3': expected step numbers in \[0, 2\^62\]"),
    (["--steps", "1", "--seed", "-1"], r"--seed must be >= 0"),
    (["--steps", "1", "--step-offset", str(10 ** 20)], r"--step-offset must be >= "),
    (["--steps", "1", "--max-length", "0"], r"--max-length must be positive, got 0"),
])
def test_replay_arguments_are_checked_before_any_work(root, capsys, flags, pattern):
    """A huge --steps range was an OverflowError or a MemoryError; --seed -1 and a huge --step-offset tracebacks."""
    man = _manifest(root)
    rc = main(["replay", "--model", str(root), "--manifest", str(man), "--shards", str(root / "shards"),
               "--out", str(root / "losses.parquet")] + flags)
    assert rc == 2
    _one_line_error(capsys, r"^spike-audit replay: error: " + pattern)
    assert not (root / "losses.parquet").exists()


# ---------------------------------------------------------------------------------------------- manifest builders

@pytest.fixture()
def data(tmp_path):
    import numpy as np

    h = np.zeros(256, np.int32)
    h[:3] = (20240520, 1, 5000)
    (tmp_path / "d_000.bin").write_bytes(h.tobytes() + np.arange(5000, dtype=np.uint16).tobytes())
    np.save(tmp_path / "idx.npy", np.arange(1000, dtype=np.uint32))
    np.arange(4000, dtype=np.uint16).tofile(tmp_path / "tok.bin")
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(40)]}), tmp_path / "rows.parquet")
    return tmp_path


def _seq(data, *flags):
    return main(["manifest", "sequential", "--shards", str(data), "-B", "2", "-T", "8", "--num-steps", "5",
                 "--out", str(data / "m.parquet"), *flags])


@pytest.mark.parametrize("build, pattern", [
    (lambda d: _seq(d, "--data-files", "d_000.bin", "--num-steps", str(10 ** 12)),
     r"1,000,000,000,000 steps x 1 micro-batches x 1 ranks are more than the 2,147,483,648 slices"),
    (lambda d: _seq(d, "--data-files", "d_000.bin", "--first-step", "-1"),
     r"--first-step must be a 0-based batch index \(>= 0\), got -1"),
    (lambda d: main(["manifest", "olmo", "--global-indices", str(d / "idx.npy"), "--data-files", "tok.bin",
                     "--shards", str(d), "--seq-len", "4", "--global-batch-size", "0", "--out", str(d / "m.parquet")]),
     r"--global-batch-size must be positive, got 0"),
    (lambda d: main(["manifest", "olmo", "--global-indices", str(d / "idx.npy"), "--data-files", "tok.bin",
                     "--shards", str(d), "--seq-len", "4", "--global-batch-size", "8", "--dtype", "float32",
                     "--out", str(d / "m.parquet")]),
     r"--dtype must be an integer token dtype .*, got 'float32'"),
    (lambda d: main(["manifest", "hf", "--data", "rows.parquet", "--shards", str(d), "--per-device-train-batch-size",
                     "4", "--num-train-epochs", "-1", "--out", str(d / "m.parquet")]),
     r"no training steps: --num-train-epochs -1\.0 and --max-steps -1 give none"),
    (lambda d: main(["manifest", "hf", "--data", "rows.parquet", "--shards", str(d), "--per-device-train-batch-size",
                     "4", "--max-steps", str(10 ** 11), "--out", str(d / "m.parquet")]),
     r"100,000,000,000 steps of 4 rows are more than the 2,147,483,648 fed rows"),
    (lambda d: main(["manifest", "hf", "--data", "rows.parquet", "--shards", str(d), "--per-device-train-batch-size",
                     "4", "--steps", "5:2", "--out", str(d / "m.parquet")]),
     r"--steps: expected FIRST:LAST with 0 <= FIRST <= LAST < 2\^62"),
])
def test_builder_numbers_are_checked(data, capsys, build, pattern):
    """A MemoryError and a ZeroDivisionError traceback, a run for ever (--max-steps 1e11), an empty manifest
    (--num-train-epochs -1), a manifest of negative steps (--first-step -1), float token ids (--dtype float32)."""
    assert build(data) == 2
    _one_line_error(capsys, r"^spike-audit manifest: error: " + pattern)
    assert not (data / "m.parquet").exists()


def test_builder_data_list_that_is_binary_or_a_fifo(data, capsys):
    """A --data-list of non-UTF-8 bytes was a UnicodeDecodeError traceback; a FIFO blocked for ever."""
    import os

    (data / "list.txt").write_bytes(b"\xff\xfe\x00d_000.bin\n")
    assert _seq(data, "--data-list", str(data / "list.txt")) == 2
    _one_line_error(capsys, r"list\.txt: byte 0: not UTF-8 text; expected a list of data files")
    os.mkfifo(data / "fifo.txt")
    assert _seq(data, "--data-list", str(data / "fifo.txt")) == 2
    _one_line_error(capsys, r"fifo\.txt: not a regular file \(a FIFO\)")
    (data / "list.txt").write_text("d_000.bin\n")
    assert _seq(data, "--data-list", str(data / "list.txt")) == 0


# ------------------------------------------------------------------------------------------- shard columns

def test_a_column_asked_for_by_name_is_never_silently_absent(root, capsys):
    """--tokens-column nosuch read every row as text only (0 tokens) without a word."""
    man = _manifest(root)
    assert main(["batch", "--manifest", str(man), "--shards", str(root / "shards"), "--step", "1",
                 "--tokens-column", "nosuch"]) == 2
    _one_line_error(capsys, r"a\.parquet: has no column 'nosuch' \(--tokens-column\); columns: tokens")


def test_a_dictionary_encoded_text_column_is_read(root, capsys):
    """A dictionary-encoded text column (a pandas categorical written to Parquet) was refused as 'not string'."""
    pq.write_table(pa.table({"text": pa.array(["alpha beta", "gamma"] * 4).dictionary_encode()}),
                   root / "shards" / "a.parquet")
    man = _manifest(root)
    assert main(["batch", "--manifest", str(man), "--shards", str(root / "shards"), "--step", "1", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert "alpha beta" in json.dumps(rep) and "gamma" in json.dumps(rep)


# -------------------------------------------------------------------------------------------------------- demo

def test_demo_never_writes_into_a_users_directory(tmp_path, capsys):
    """`demo --dir /` wrote the demo run's files into the system's /run; a --dir that is a file was a
    NotADirectoryError traceback."""
    (tmp_path / "f.txt").write_text("x")
    assert main(["demo", "--dir", str(tmp_path / "f.txt")]) == 2
    _one_line_error(capsys, r"f\.txt: --dir exists and is not a directory")
    assert main(["demo", "--dir", str(tmp_path / "f.txt" / "sub")]) == 2
    _one_line_error(capsys, r"f\.txt/sub: cannot use as --dir \(Not a directory\)")
    (tmp_path / "mine" / "run").mkdir(parents=True)
    (tmp_path / "mine" / "run" / "train.log").write_text("my own log")
    assert main(["demo", "--dir", str(tmp_path / "mine")]) == 2
    _one_line_error(capsys, r"mine/run: exists and is not a spike-audit demo run")
    assert (tmp_path / "mine" / "run" / "train.log").read_text() == "my own log"
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["run"]


# -------------------------------------------------------------------------------- dangling symlinks and loops

def test_dangling_symlinks_and_loops_say_so(root, capsys):
    """A symlink loop or a dangling symlink was reported as 'no such file or directory' / 'manifest not found'."""
    import os

    os.symlink("b.log", root / "a.log")
    os.symlink("a.log", root / "b.log")
    os.symlink("/nonexistent-target", root / "gone.parquet")
    assert main(["spikes", str(root / "a.log")]) == 2
    _one_line_error(capsys, r"a\.log: a symlink loop \(it resolves to itself\)")
    assert main(["batch", "--manifest", str(root / "gone.parquet"), "--step", "0"]) == 2
    _one_line_error(capsys, r"gone\.parquet: a dangling symlink \(to '/nonexistent-target', which does not exist\)")
    assert main(["shards", str(root / "gone.parquet"), "--out", str(root / "out")]) == 2
    _one_line_error(capsys, r"gone\.parquet: a dangling symlink")
    assert main(["spikes", str(root / "missing.log")]) == 2
    _one_line_error(capsys, r"missing\.log: no such file or directory")


def test_a_shuffled_log_read_as_resumes_warns(tmp_path, caplog):
    """A log whose steps are out of order keeps only the values no later line supersedes (the resume rule): 192 of
    200 values went with an INFO line only."""
    import logging

    from spike_audit.pipelines.logs.read import read_log

    p = tmp_path / "shuffled.jsonl"
    p.write_text("".join(json.dumps({"step": (i * 37) % 200, "loss": 3.0}) + "\n" for i in range(200)))
    with caplog.at_level(logging.WARNING):
        table, rep = read_log(p)
    assert rep.n_replaced == 192 and table.num_rows == 8
    assert any("192 values were replaced" in r.getMessage() and "sorted by step" in r.getMessage()
               for r in caplog.records)


def test_out_of_memory_is_one_line(monkeypatch, capsys):
    import spike_audit.pipelines.cli.spikes as spikes_cli

    def boom(args):
        raise MemoryError("Unable to allocate 7.28 TiB for an array")

    monkeypatch.setattr(spikes_cli, "run", boom)  # register() binds it when the parser is built
    assert main(["spikes", "x.log"]) == 2
    _one_line_error(capsys, r"^spike-audit spikes: error: out of memory \(Unable to allocate 7\.28 TiB")


def test_golden_values_with_a_list_of_values_name_the_metric(tmp_path, capsys):
    """A golden-values file whose 'values' is a list said '1 malformed (first at line 0)'."""
    p = tmp_path / "golden.json"
    p.write_text(json.dumps({"lm loss": {"start_step": 1, "end_step": 50, "step_interval": 1, "values": [3.0] * 50}}))
    assert main(["spikes", str(p), "--format", "megatron-golden"]) == 2
    _one_line_error(capsys, r"golden\.json: metric 'lm loss': expected 'values' to be an object \{\"<step>\": "
                            r"<float>\} \(golden values with their step numbers\), got list")


# ------------------------------------------------------------------------------ one key twice (JSONL, CSV)

def test_a_jsonl_object_naming_the_step_twice_is_malformed_and_a_csv_header_with_a_metric_twice_is_refused(
        tmp_path):
    """An object with "step" twice was read with its last value (json.loads keeps the last), and a CSV with two
    train/loss columns with its first: either is a guess about which value is the record's."""
    from spike_audit.pipelines.errors import UserError
    from spike_audit.pipelines.logs.read import read_log

    p = tmp_path / "run.jsonl"
    p.write_text('{"step": 1, "train_loss": 3.0}\n{"step": 2, "step": 9, "train_loss": 2.9}\n'
                 '{"step": 3, "train_loss": 2.8, "cfg": {"a": 1, "a": 2}}\n')
    table, rep = read_log(p)
    assert sorted(table["step"].to_pylist()) == [1, 3]  # a repeated key inside an unrelated object is harmless
    assert rep.n_malformed == 1 and rep.malformed_lines == [2]
    c = tmp_path / "run.csv"
    c.write_text("step,train/loss,train/loss\n1,3.0,9.0\n2,2.9,9.1\n")
    with pytest.raises(UserError, match=r"run.csv:1: the CSV header names column 'train/loss' twice"):
        read_log(c)
    c.write_text("step,train/loss,lr,lr\n1,3.0,0.1,0.2\n2,2.9,0.1,0.2\n")  # an unread column twice: fine
    table, _ = read_log(c)
    assert table["step"].to_pylist() == [1, 2]


def test_one_key_twice_at_the_command_line_is_one_line_and_exit_2(tmp_path, capsys):
    from spike_audit.pipelines.cli.main import main

    c = tmp_path / "run.csv"
    c.write_text("step,train/loss,train/loss\n1,3.0,9.0\n2,2.9,9.1\n")
    assert main(["spikes", str(c)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "names column 'train/loss' twice" in err, err
    j = tmp_path / "run.jsonl"
    j.write_text('{"step": 1, "train_loss": 3.0}\n{"step": 2, "step": 9, "train_loss": 2.9}\n')
    assert main(["spikes", str(j), "--strict"]) == 2  # --strict: the ambiguous line is refused, naming it
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{j}:2:" in err, err


@pytest.mark.parametrize("cut_at", range(0, 8))
@pytest.mark.parametrize("keep", [0.3, 0.5, 0.8])
def test_olmo_lines_cut_and_merged_never_pair_a_step_with_another_steps_value(tmp_path, capsys, cut_at, keep):
    """OLMo prints a ``[step=N/M]`` header line and its metrics on the lines after it, so the two-records check of
    the one-line formats does not apply: whichever line is cut off by the next one, every (step, loss) read is
    one the run logged (a record may be lost, never shifted to another step)."""
    from spike_audit.pipelines.logs.read import read_log

    truth = {s: 3.0 + s / 100 for s in range(1, 5)}
    lines = []
    for s, v in truth.items():
        lines += [f"2025-01-01 10:00:00.000 host:0 olmo_core.train:123 INFO [step={s}/100000,epoch=1]",
                  f"    train/CE loss={v:.4f}", "    train/PPL=12.5"]
    i = 3 + cut_at  # a line of steps 2-4 (step 1's header stays whole)
    cut = lines[i]
    fragment = cut[: max(1, int(len(cut) * keep))]
    lines[i:i + 2] = [fragment + lines[i + 1]]
    p = tmp_path / "run.log"
    p.write_text("\n".join(lines) + "\n")
    table, rep = read_log(p, format="olmo")
    loss = table.filter(pa.compute.equal(table["metric"], "train_loss"))
    got = dict(zip(loss["step"].to_pylist(), loss["value"].to_pylist()))
    assert got and all(got[s] == pytest.approx(truth[s]) for s in got), got
    if len(got) < len(truth) and rep.n_malformed == 0:
        # the known limit (as in every format): a loss line cut before its '=' leaves a fragment that names no
        # value ('    train/C'), so the merged line reads as the unrelated line that follows it
        assert "=" not in fragment and "loss=" in cut, (fragment, cut)
    elif len(got) < len(truth):  # otherwise a lost record is never silent: its line is counted malformed ...
        # ... and --strict refuses it at the command line in one line naming the file and the line
        assert main(["spikes", str(p), "--format", "olmo", "--strict"]) == 2
        err = capsys.readouterr().err  # (the quoted line holds OLMo's own " INFO ": not _one_line_error's filter)
        assert err.count("\n") <= 1 and err.startswith(f"spike-audit spikes: error: {p}:{rep.malformed_lines[0]}: "), err


def test_another_spike_audit_table_given_as_the_manifest_is_named(root, capsys):
    """A step manifest's columns with another table's name in its metadata (a renamed output, the wrong file): the
    file's own kind is named, not read as a manifest of that version."""
    man = _manifest(root)
    t = pq.read_table(man)
    pq.write_table(t.replace_schema_metadata({**t.schema.metadata, b"spike_audit.table": b"shard_scores"}), man)
    assert _batch(root, man) == 2
    _one_line_error(capsys, r"manifest\.parquet: is a spike-audit 'shard_scores' table, expected a step_manifest table")
