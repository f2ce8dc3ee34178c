"""Numeric settings outside the values they accept are one-line errors before any work (``--alpha 0`` was a
ZeroDivisionError traceback; ``--max-window 0``, ``--controls -3``, ``--k 0`` were accepted), and the control
draw reaches ``p <= alpha / --p-resolution`` over the longest window."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spike_audit.pipelines.cli.main import main
from spike_audit.pipelines.run.plan import MAX_CONTROLS, needed_controls


def _run_args(demo, out):
    root, _ = demo
    run = root / "run"
    return ["run", "--log", str(run / "train.log"), "--manifest", str(run / "manifest.parquet"),
            "--shards", str(run / "shards"), "--out", str(out)]


def _one_line(capsys, *needles):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


@pytest.mark.parametrize("flag,value,expect", [
    ("--alpha", "0", "--alpha must be > 0.0 and < 1.0, got 0.0"),
    ("--alpha", "1.5", "--alpha must be > 0.0 and < 1.0"),
    ("--alpha", "nan", "--alpha must be > 0.0 and < 1.0, got nan"),
    ("--controls", "-3", "--controls must be >= 0, got -3"),
    ("--max-window", "0", "--max-window must be >= 1, got 0"),
    ("--lookback", "-1", "--lookback must be >= 0"),
    ("--min-rows", "0", "--min-rows must be >= 1"),
    ("--p-resolution", "0", "--p-resolution must be >= 1"),
])
def test_run_refuses_a_value_out_of_range_in_one_line_before_any_work(demo, tmp_path, capsys, flag, value, expect):
    out = tmp_path / "o"
    assert main([*_run_args(demo, out), flag, value, "--dry-run"]) == 2
    _one_line(capsys, expect)
    assert not out.exists()


def test_a_config_file_value_out_of_range_names_the_file(demo, tmp_path, capsys):
    conf = tmp_path / "run.toml"
    conf.write_text("[run]\nalpha = 0\n")
    assert main([*_run_args(demo, tmp_path / "o"), "--config", str(conf), "--dry-run"]) == 2
    _one_line(capsys, str(conf), "--alpha must be > 0.0")
    # the flag overrides the file: a good flag over a bad file value is fine, and the error never blames the file
    conf.write_text("[run]\nmin_rows = 3\n")
    assert main([*_run_args(demo, tmp_path / "o"), "--config", str(conf), "--alpha", "2", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "--alpha must be" in err and str(conf) not in err


def test_shards_and_spikes_refuse_values_out_of_range(demo, tmp_path, capsys):
    root, _ = demo
    out = tmp_path / "o"
    assert main(["shards", str(root / "run" / "shards"), "--out", str(out), "--threshold", "0"]) == 2
    _one_line(capsys, "--threshold must be > 0.0 and <= 1.0, got 0.0")
    assert not out.exists()
    for args, expect in ((["--k", "0"], "k must be a positive number"), (["--k", "nan"], "k must be a positive"),
                         (["--align-tolerance", "-2"], "--align-tolerance must be >= 0")):
        assert main(["spikes", str(root / "run" / "train.log"), *args]) == 2
        _one_line(capsys, expect)


def test_controls_reach_alpha_over_p_resolution_or_take_every_normal_step(demo, tmp_path, capsys):
    counts, m = {}, 0
    for res in (1, 4, 64):
        assert main([*_run_args(demo, tmp_path / "o"), "--p-resolution", str(res), "--controls", "20", "--dry-run",
                     "--json"]) == 0
        plan = json.loads(capsys.readouterr().out)
        m = max(len(e["window"]) for e in plan["events"])
        counts[res] = plan["n_controls"]
        assert len(set(plan["controls"])) == plan["n_controls"]
    floor = lambda n: 1 - (1 - 1 / (n + 1)) ** m  # noqa: E731  (the smallest p over an m-step window)
    assert counts[1] >= needed_controls(m, 0.05) and floor(counts[1]) <= 0.05
    assert counts[1] < counts[4] <= counts[64]
    # more controls than resolution 1 draws; alpha / 4 reached, or every normal step taken (then 64 takes no more)
    assert floor(counts[4]) <= 0.05 / 4 or counts[4] == counts[64]


def test_batch_negative_excerpt_length_or_limit_and_a_baseline_that_is_a_file(demo, tmp_path, capsys):
    root, _ = demo
    run = root / "run"
    for flag in ("--max-chars", "--limit"):
        assert main(["batch", "--manifest", str(run / "manifest.parquet"), "--shards", str(run / "shards"),
                     "--step", "120", flag, "-5"]) == 2
        _one_line(capsys, f"{flag} must be >= 0, got -5")
    f = tmp_path / "baseline.txt"
    f.write_text("not a baseline")
    assert main([*_run_args(demo, tmp_path / "o"), "--baseline", str(f), "--dry-run"]) == 2
    _one_line(capsys, str(f), "is a file, not a directory saved by spike-audit shards --save-baseline")
    assert main([*_run_args(demo, tmp_path / "o"), "--baseline", str(tmp_path / "none"), "--dry-run"]) == 2
    _one_line(capsys, "not found: expected a directory")


@pytest.mark.parametrize("value", ["1e-320", "abc", "u2,u2", "(2,)u2", "float32"])
def test_a_dtype_that_is_no_integer_dtype_is_one_line_in_every_command(demo, tmp_path, capsys, value):
    """``--dtype 1e-320`` was a ValueError traceback from NumPy's dtype parser in run, shards and the manifest
    builders, and ``batch`` took any --dtype silently until a raw token file was read with it."""
    root, _ = demo
    run = root / "run"
    out = tmp_path / "o"
    commands = [
        [*_run_args(demo, out), "--dry-run"],
        ["shards", str(run / "shards"), "--out", str(out)],
        ["batch", "--manifest", str(run / "manifest.parquet"), "--shards", str(run / "shards"), "--step", "120"],
        ["manifest", "sequential", "--data-files", str(tmp_path / "a.bin"), "--out", str(tmp_path / "m.parquet"),
         "-B", "2", "-T", "8", "--num-steps", "3"],
    ]
    for argv in commands:
        assert main([*argv, "--dtype", value]) == 2, argv
        _one_line(capsys, "dtype must be an integer token dtype", repr(value))
    assert not out.exists() and not (tmp_path / "m.parquet").exists()


def test_a_config_files_name_setting_outside_its_choices_names_the_file(demo, tmp_path, capsys):
    """``method = "x"`` in a config file skipped the command line's choices and was a ValueError traceback."""
    conf = tmp_path / "run.toml"
    for key, value in (("method", "x"), ("dup_reference", "all"), ("loss_baseline", "")):
        conf.write_text(f"[run]\n{key} = {json.dumps(value)}\n")
        assert main([*_run_args(demo, tmp_path / "o"), "--config", str(conf), "--dry-run"]) == 2
        _one_line(capsys, str(conf), f"--{key.replace('_', '-')} must be one of", repr(value))


@pytest.mark.parametrize("flag,value", [("--alpha", "1e-300"), ("--p-resolution", str(10 ** 20)),
                                        ("--guard", str(10 ** 20)), ("--guard", str(10 ** 12))])
def test_extreme_but_valid_settings_plan_without_a_traceback(demo, tmp_path, capsys, flag, value):
    """``--alpha 1e-320`` and ``--p-resolution 1e20`` divided by zero computing the controls needed, and
    ``--guard 1e20`` listed every guarded step (numpy: "Maximum allowed size exceeded"; 1e12 would have asked
    for terabytes). A tiny alpha takes every eligible step; a huge guard leaves no control step."""
    assert main([*_run_args(demo, tmp_path / "o"), "--controls", str(10 ** 6), "--dry-run", "--json"]) == 0
    every = json.loads(capsys.readouterr().out)["controls"]  # every eligible step
    assert main([*_run_args(demo, tmp_path / "o"), flag, value, "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    if flag == "--guard":
        assert plan["n_controls"] == 0 and plan["controls"] == []
    else:
        assert plan["controls"] == every and plan["n_controls"] == len(every) > 200


@settings(max_examples=300, deadline=None)
@given(m=st.integers(1, 400), alpha=st.floats(1e-12, 0.9))
def test_needed_controls_is_the_smallest_count_that_reaches_alpha(m, alpha):
    n = needed_controls(m, alpha)

    def floor(k):  # 1 - (1 - 1/(k+1))**m, stably (1 for k = 0)
        with np.errstate(divide="ignore"):
            return -np.expm1(m * np.log1p(-1.0 / (k + 1)))

    assert 0 < n < MAX_CONTROLS
    assert floor(n) <= alpha * (1 + 1e-9)
    assert floor(n - 1) > alpha * (1 - 1e-9)


def test_needed_controls_of_an_alpha_no_double_resolves_is_capped():
    assert needed_controls(12, 1e-320) == MAX_CONTROLS and needed_controls(12, 0.0) == MAX_CONTROLS


def _olmo_inputs(tmp_path):
    (tmp_path / "olmo").mkdir()
    np.arange(1, 64 * 16 + 1, dtype=np.uint16).tofile(tmp_path / "olmo" / "part-0.npy")
    np.save(tmp_path / "gi.npy", np.arange(16, dtype=np.uint32))
    return ["manifest", "olmo", "--global-indices", str(tmp_path / "gi.npy"), "--data-files",
            str(tmp_path / "olmo" / "part-0.npy"), "--seq-len", "64", "--global-batch-size", "4", "--shards",
            str(tmp_path / "olmo"), "--out", str(tmp_path / "m.parquet")]


def _streaming_inputs(tmp_path):
    from pathlib import Path

    mds = Path(__file__).parent / "fixtures" / "mds"
    return ["manifest", "streaming", "--data", str(mds / "mixed_zstd"), "--batch-size", "4", "--shards", str(mds),
            "--out", str(tmp_path / "m.parquet")]


@pytest.mark.parametrize("builder,flag,value,expect", [
    (_olmo_inputs, "--seq-len", str(10 ** 20), "--seq-len must be below 2^62"),  # numpy OverflowError traceback
    (_olmo_inputs, "--epoch", str(10 ** 20), "--epoch must be below 2^62"),
    (_streaming_inputs, "--shuffle-seed", "-1", "--shuffle-seed must be >= 0"),  # numpy ValueError traceback
    (_streaming_inputs, "--num-canonical-nodes", "-1", "--num-canonical-nodes must be positive"),  # IndexError
])
def test_manifest_builders_refuse_counts_out_of_range_in_one_line(tmp_path, capsys, builder, flag, value, expect):
    """Found by a sweep of hostile values over every builder option."""
    argv = builder(tmp_path)
    assert main([*argv, "--check"]) == 0  # the inputs are good: only the value is refused
    capsys.readouterr()
    (tmp_path / "m.parquet").unlink()
    assert main([*argv, flag, value]) == 2
    _one_line(capsys, expect, value)
    assert not (tmp_path / "m.parquet").exists()


def test_shards_with_an_alpha_no_double_divides_writes_finite_thresholds(demo, tmp_path, capsys):
    """``shards --alpha 1e-320``: the quarantine threshold log10(n * F * cuts / alpha) overflowed to inf and
    writing quarantine.json was a ValueError traceback. The thresholds are computed in logs there."""
    from spike_audit.auditors.verdict import contamination_threshold
    from spike_audit.pipelines.shard_audit.outputs import quarantine_threshold

    root, _ = demo
    out = tmp_path / "o"
    assert main(["shards", str(root / "run" / "shards"), "--out", str(out), "-q", "--alpha", "1e-320"]) == 0
    q = json.loads((out / "quarantine.json").read_text())
    assert 320 < q["threshold_evidence"] < 340 and q["shards"] == []  # nothing reaches a bar that high
    for n in (1, 16, 10 ** 6):
        for f in (quarantine_threshold, lambda k, a: contamination_threshold(k, 60, a)):
            t, t_ok = f(n, 1e-320), f(n, 1e-300)
            assert np.isfinite(t) and t > t_ok and abs((t - t_ok) - 20) < 1e-3  # 20 decades (1e-320 is subnormal: 4 digits)


@pytest.mark.parametrize("name, text", [("c.toml", 'alpha = 0.01\n[run]\nlookback = 3\n'),
                                        ("c.json", '{"alpha": 0.01, "run": {"lookback": 3}}')])
def test_a_config_file_with_a_utf8_bom_reads_as_without(tmp_path, name, text):
    """Editors on Windows start UTF-8 files with a byte-order mark; the TOML parser refused it at line 1, column 1."""
    from spike_audit.pipelines.settings import read_config_file

    plain, bom = tmp_path / name, tmp_path / f"bom-{name}"
    plain.write_text(text, encoding="utf-8")
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert read_config_file(str(bom), "run") == read_config_file(str(plain), "run")
    assert read_config_file(str(bom), "run")[0] == {"alpha": 0.01, "lookback": 3}


@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF, blacklist_categories=("Cs",)),
               max_size=40))
def test_every_string_setting_round_trips_through_the_written_config(text):
    """config.toml holds the run's paths and names; DEL (0x7f) and the C1 controls were written raw, which TOML
    forbids, so the output's own config file did not read back."""
    import tomllib

    from spike_audit.pipelines.settings import _toml_value

    assert tomllib.loads("x = " + _toml_value(text))["x"] == text
