"""What the command line prints (issue 11): training text never reaches the terminal raw, a closed pipe
(``| head``) is a quiet stop, and `run` refuses manifest names outside the shard root before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spike_audit.pipelines.cli.main import main
from spike_audit.pipelines.cli.terminal import json_printable, printable
from spike_audit.pipelines.manifest import manifest_from_arrays, write_manifest

HOSTILE = ["plain row", "title \x1b]0;pwned\x07 and colour \x1b[31mred\x1b[0m", "8-bit CSI \x9b2J clears",
           "bidi \u202eevil\u202c text", "bell \x07 nul \x00 del \x7f"]
RAW = ["\x1b", "\x9b", "\u202e", "\x07", "\x00", "\x7f"]


@pytest.fixture
def hostile_run(tmp_path):
    root = tmp_path / "shards"
    root.mkdir()
    pq.write_table(pa.table({"text": HOSTILE * 2000}), root / "t.parquet")
    (root / "evil\x1b[2Jname.parquet").write_bytes((root / "t.parquet").read_bytes())
    m = manifest_from_arrays([1, 1, 2], ["t.parquet", "evil\x1b[2Jname.parquet", "t.parquet"], [0, 0, 0],
                             [len(HOSTILE), 2, 10000])
    write_manifest(m, tmp_path / "manifest.parquet")
    return tmp_path, root


def test_batch_escapes_control_characters_in_text_and_json(hostile_run, capsys):
    tmp, root = hostile_run
    assert main(["batch", "--manifest", str(tmp / "manifest.parquet"), "--shards", str(root), "--step", "1"]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in RAW), [c for c in RAW if c in out]
    assert "\\x1b]0;pwned\\x07" in out and "\\x9b2J" in out and "\\u202eevil" in out and "evil\\x1b[2Jname" in out
    assert main(["batch", "--manifest", str(tmp / "manifest.parquet"), "--shards", str(root), "--step", "1",
                 "--json"]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in RAW)
    doc = json.loads(out)  # still valid JSON carrying the exact text
    excerpts = [q["excerpt"] for s in doc["slices"] for q in s["sequences"]]
    assert "title \x1b]0;pwned\x07 and colour \x1b[31mred\x1b[0m" in excerpts


def test_printable_keeps_ordinary_text():
    text = "naïve café 漢字 — tab\there"
    assert printable(text) == text and json_printable(json.dumps(text, ensure_ascii=False)) == json.dumps(
        text, ensure_ascii=False)


def test_closed_stdout_is_a_quiet_stop(hostile_run):
    tmp, root = hostile_run
    cmd = [sys.executable, "-m", "spike_audit.pipelines.cli", "batch", "--manifest", str(tmp / "manifest.parquet"),
           "--shards", str(root), "--step", "2", "--limit", "0"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = p.stdout.readline()
    p.stdout.close()  # `| head -1`
    err = p.stderr.read().decode()
    rc = p.wait(timeout=120)
    assert first.startswith(b"step 2:")
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert rc == 141


def _spiky_log(path, n=300, spike=200):
    rng = np.random.default_rng(0)
    v = 3.0 + 0.01 * rng.standard_normal(n)
    v[spike - 1] = 9.0
    path.write_text("".join(f"step:{i}/{n} train_loss:{v[i - 1]:.4f} train_time:{i}ms step_avg:1.00ms\n"
                            for i in range(1, n + 1)))


@pytest.mark.parametrize("bad", ["../secret.parquet", "file://{tmp}/secret.parquet"])
def test_run_refuses_a_manifest_name_outside_the_root_before_any_work(tmp_path, capsys, bad):
    root = tmp_path / "shards"
    root.mkdir()
    pq.write_table(pa.table({"text": [f"row {i} of ordinary text" for i in range(400)]}), root / "ok.parquet")
    pq.write_table(pa.table({"text": ["secret"] * 10}), tmp_path / "secret.parquet")
    _spiky_log(tmp_path / "train.log")
    bad = bad.format(tmp=tmp_path)
    steps = np.arange(0, 300)  # batch indices: modded-nanogpt logs batch b as step:b+1
    names = ["ok.parquet"] * 300
    names[199] = bad  # the spike's own batch (logged as step:200)
    write_manifest(manifest_from_arrays(steps, names, steps, steps + 1), tmp_path / "manifest.parquet")
    argv = ["run", "--log", str(tmp_path / "train.log"), "--manifest", str(tmp_path / "manifest.parquet"),
            "--shards", str(root), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"shard '{bad}'" in err[0] and ("--allow-outside-root" in err[0] or "--allow-urls" in err[0])
    assert not (tmp_path / "out").exists()


def test_log_lines_escape_control_characters_in_names(tmp_path):
    """A log (or shard) name holding a newline or an escape sequence is written escaped in the INFO lines too, so one
    record stays one line on the terminal and the name cannot drive it (error lines were escaped already)."""
    import subprocess
    import sys

    src = tmp_path / "train.log"
    src.write_text("".join(f" iteration {s:8d}/     100 | consumed samples: {16 * s:8d} | lm loss: {3.0 + (s % 5) / 10:E} |"
                           f" grad norm: 1.0 |\n" for s in range(1, 101)))
    odd = tmp_path / "a\nb\x1b[31m.log"
    odd.write_bytes(src.read_bytes())
    r = subprocess.run([sys.executable, "-m", "spike_audit.pipelines.cli", "spikes", str(odd), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines and all(ln[:4].isdigit() for ln in lines), r.stderr  # every line a record: "2026-... INFO ..."
    assert any("a\\nb\\x1b[31m.log" in ln for ln in lines), r.stderr


def test_names_from_the_data_are_escaped_on_stdout_too(tmp_path, capsys):
    """Shard, log and run names holding ESC, a right-to-left override or a newline were printed raw by the ranked
    shard list, the dry-run plan and the spikes summary (the log lines and errors escaped them already)."""
    odd = "e\x1b]0;t\x07\x1b[31m\u202e\nx"
    root = tmp_path / "s"
    root.mkdir()
    rows = pa.table({"tokens": [list(range(i, i + 20)) for i in range(30)], "text": [f"row {i}" for i in range(30)]})
    pq.write_table(rows, root / f"{odd}.parquet")
    pq.write_table(rows, root / "plain.parquet")
    log = tmp_path / f"{odd}.log"
    log.write_text("".join(f" iteration {s:8d}/     100 | lm loss: {3.0 + (s % 5) / 10:E} | grad norm: 1.0 |\n"
                           for s in range(1, 101)))
    for argv in (["shards", str(root), "--out", str(tmp_path / "o"), "-q"],
                 ["shards", str(root), "--out", str(tmp_path / "o2"), "--dry-run", "-q"],
                 ["spikes", str(log), "--out", str(tmp_path / "o3"), "-q"]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "\x1b" not in out and "\u202e" not in out and "\x07" not in out, (argv, out)
        assert not any(line.startswith("x") for line in out.splitlines()), (argv, out)  # the name's "\nx" folded
        assert "\\x1b" in out and "\\u202e" in out, (argv, out)


def test_file_names_that_are_not_utf8_are_one_line_errors(tmp_path, capsys):
    """A log, manifest or shard whose file name bytes are not UTF-8 was a UnicodeEncodeError traceback (writing the
    run name, the fingerprint or the Parquet index)."""
    raw = os.fsdecode(b"r\xff")
    log = tmp_path / f"{raw}.log"
    log.write_text("".join(f" iteration {s:8d}/     100 | lm loss: {3.0 + (s % 5) / 10:E} |\n" for s in range(1, 101)))
    assert main(["spikes", str(log), "--out", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "r\\xff.log: a path or name that is not UTF-8 text" in err, err
    d = tmp_path / "shards"
    d.mkdir()
    pq.write_table(pa.table({"tokens": [[1, 2, 3]] * 4}), d / "ok.parquet")
    import io

    buf = io.BytesIO()  # pyarrow takes no path that is not UTF-8: written by Python
    pq.write_table(pa.table({"tokens": [[1, 2, 3]] * 4}), buf)
    (d / f"{raw}.parquet").write_bytes(buf.getvalue())
    assert main(["shards", str(d), "--out", str(tmp_path / "o2"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "r\\xff.parquet: a shard whose file name is not UTF-8 text" in err, err
