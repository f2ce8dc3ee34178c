"""``spike-audit spikes``: table output, JSON, parquet outputs, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from spike_audit.pipelines.cli.main import main
from spike_audit.schemas import ALIGNED_SPIKES, LOSS_SERIES, SPIKES, validate

FIX = Path(__file__).parent / "fixtures" / "logs"
SOAP = next((FIX / "modded-nanogpt").glob("2024-10-09_SOAP__*.log.gz"))
MODERN = next((FIX / "modded-nanogpt").glob("2024-10-14_ModernArch__*.log.gz"))


def test_table_output_with_aligned_spikes(capsys):
    assert main(["-q", "spikes", str(SOAP), str(MODERN)]) == 0
    out = capsys.readouterr().out
    assert "[modded-nanogpt]" in out and "replaced by resume" in out
    assert "peak_value" in out and "severity" in out
    assert "aligned spikes on train_loss" in out
    assert "step 919: 2 runs" in out and "step 947: 2 runs" in out


def test_json_output(capsys):
    assert main(["-q", "spikes", str(FIX / "megatron" / "bigscience-chronicles-iterations.log"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["config"]["method"] == "robust"
    assert doc["logs"][0]["malformed_lines"] == [42, 43, 44, 45, 46]
    ids = [s["spike_id"] for s in doc["spikes"]]
    assert "bigscience-chronicles-iterations@311541/train_loss/29060" in ids
    assert any(s["severity"] == "inf" for s in doc["spikes"])  # zero grad-norm baseline: JSON-safe
    assert doc["aligned_spikes"] == []  # three different runs, none spiking together


def test_out_dir_writes_valid_tables(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["-q", "spikes", str(SOAP), str(MODERN), "--out", str(out), "--method", "olmo"]) == 0
    spikes = pq.read_table(out / "spikes.parquet")
    validate(spikes, SPIKES)
    assert set(spikes.column("detector").to_pylist()) == {"olmo"}
    validate(pq.read_table(out / "loss_series.parquet"), LOSS_SERIES)
    aligned = pq.read_table(out / "aligned_spikes.parquet")
    validate(aligned, ALIGNED_SPIKES)
    assert {919, 947} <= set(aligned.column("step").to_pylist())
    # the files a user reads (the dot entries are the output's marker, lock and current version)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "aligned_spikes.parquet", "loss_series.parquet", "spikes.parquet"]


def test_pattern_metric_and_same_stem(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    lines = [f"it {i} obj {4.0 + (3.0 if i == 300 else 0.01 * (i % 7))}" for i in range(500)]
    for d in (a, b):
        (d / "run.txt").write_text("\n".join(lines) + "\n")
    rc = main(["-q", "spikes", str(a / "run.txt"), str(b / "run.txt"), "--pattern",
               r"it (?P<step>\d+) obj (?P<value>\S+)", "--metric", "objective", "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert sorted({s["run"] for s in doc["spikes"]}) == ["run", "run#1"]
    assert {s["metric"] for s in doc["spikes"]} == {"objective"}
    assert doc["aligned_spikes"][0]["step"] == 300


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["spikes", str(tmp_path / "missing.log")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.log: no such file" in err
    bad = tmp_path / "bad.log"
    bad.write_text("step:1/10 train_loss:3.0 x\nstep:2/10 train_lo\n")
    assert main(["spikes", str(bad), "--strict"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: expected 'step:<int>/<int> train_loss:<float>'" in err and "Traceback" not in err
