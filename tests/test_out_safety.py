"""`--out` and `--state` through the command line: never destroy an input or a foreign directory, one-line errors
(exit 2) for concurrent runs, full disks and denied permissions with the previous output intact, staging cleaned on
SIGTERM/SIGINT, a mount point as --out, byte-identical reruns."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spike_audit.pipelines.cli.main import main
from spike_audit.pipelines.outdir import OutDir


def _tree_digest(path: Path) -> dict:
    """Every file under ``path`` (following the output's links) -> sha256: what "intact" means (the lock file
    holds the pid of the last run that took it)."""
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.name != ".spike-audit.lock":
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _visible(out: Path) -> dict:
    """Every file a user sees, but the completion marker (_SUCCESS holds the time it completed)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if not p.name.startswith(".") and p.name != "_SUCCESS"}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from spike_audit.pipelines.demo import make_shard_corpus

    root = tmp_path_factory.mktemp("small")
    make_shard_corpus(root / "shards", n_clean=6, rows_per_shard=40)
    return root


def _shards(small, out, *extra):
    return ["-q", "shards", str(small / "shards"), "--out", str(out), *extra]


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


# -- refusals -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where, said", [
    ("shards", "is the same path as the input"),
    (".", "a directory containing the input"),
    ("shards/shard-00001.parquet", "inside the input"),
    ("shards/audit", "inside the input"),
])
def test_shards_out_on_an_input_is_refused_and_the_input_kept(small, capsys, where, said):
    before = _tree_digest(small)
    assert main(_shards(small, small / where)) == 2
    _one_line_error(capsys, said)
    assert _tree_digest(small) == before


def test_shards_state_on_an_input_or_the_out_is_refused(small, tmp_path, capsys):
    before = _tree_digest(small)
    assert main(_shards(small, tmp_path / "o", "--state", str(small / "shards"))) == 2
    _one_line_error(capsys, "--state is the same path as the input")
    assert main(_shards(small, tmp_path / "o", "--state", str(tmp_path / "o"))) == 2
    _one_line_error(capsys, "the same path as the state directory")
    assert main(_shards(small, tmp_path / "o", "--state", str(tmp_path / "o" / "st"))) == 2
    _one_line_error(capsys, "a directory containing the state directory")
    assert _tree_digest(small) == before and not (tmp_path / "o").exists()


@pytest.mark.parametrize("where, said", [
    ("run/shards", "is the same path as the shard root"),
    ("run", "a directory containing the log"),
    ("run/train.log", "is the same path as the log"),
    ("run/manifest.parquet", "is the same path as the manifest"),
    ("run/shards/audit", "inside the shard root"),
])
def test_run_out_on_an_input_is_refused_and_the_input_kept(demo, capsys, where, said):
    root, _ = demo
    run = root / "run"
    before = _tree_digest(run)
    argv = ["-q", "run", "--log", str(run / "train.log"), "--manifest", str(run / "manifest.parquet"),
            "--shards", str(run / "shards"), "--out", str(root / where)]
    assert main(argv) == 2
    _one_line_error(capsys, said)
    assert _tree_digest(run) == before


def test_run_state_on_an_input_or_the_out_is_refused(demo, tmp_path, capsys):
    root, _ = demo
    run = root / "run"
    base = ["-q", "run", "--log", str(run / "train.log"), "--manifest", str(run / "manifest.parquet"),
            "--shards", str(run / "shards"), "--out", str(tmp_path / "out")]
    assert main(base + ["--state", str(run / "shards" / "state")]) == 2
    _one_line_error(capsys, "--state is inside the shard root")
    assert main(base + ["--state", str(tmp_path / "out")]) == 2
    _one_line_error(capsys, "is the same path as the state directory")
    assert not (tmp_path / "out").exists() and not (run / "shards" / "state").exists()


def test_a_foreign_directory_or_a_file_as_out_is_refused(small, tmp_path, capsys):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    assert main(_shards(small, d)) == 2
    _one_line_error(capsys, "is not empty and is not a spike-audit output", str(d))
    assert sorted(os.listdir(d)) == ["thesis.tex"]
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert main(_shards(small, f)) == 2
    _one_line_error(capsys, "exists and is not a directory")
    assert f.read_text() == "x"


def test_an_output_of_another_command_is_never_replaced(small, tmp_path, capsys):
    out = tmp_path / "audit"
    assert main(["-q", "spikes", str(_log(tmp_path)), "--out", str(out)]) == 0
    capsys.readouterr()
    before = sorted(os.listdir(out))
    assert main(_shards(small, out)) == 2  # a shards audit over the spikes output: refused, the output kept
    _one_line_error(capsys, "holds the output of `spike-audit spikes`, not of `spike-audit shards`", str(out))
    assert sorted(os.listdir(out)) == before and (out / "spikes.parquet").exists()
    assert main(["-q", "spikes", str(_log(tmp_path)), "--out", str(out)]) == 0  # its own command replaces it


def _log(tmp_path):
    p = tmp_path / "train.jsonl"
    if not p.exists():
        p.write_text("".join(f'{{"step": {i}, "train_loss": {3.0 - i / 1000 + (2.0 if i == 150 else 0.0)}}}\n'
                             for i in range(300)))
    return p


def test_a_foreign_state_directory_is_refused(small, tmp_path, capsys):
    st = tmp_path / "st"
    st.mkdir()
    (st / "state.json").write_text('{"something": "else"}')
    assert main(_shards(small, tmp_path / "o", "--state", str(st))) == 2
    _one_line_error(capsys, "is not a spike-audit state directory")
    assert sorted(os.listdir(st)) == ["state.json"]


def test_out_s3_url_unreachable_is_one_line_error_before_any_work_and_no_local_folder_is_made(
        small, tmp_path, capsys, monkeypatch):
    # a URL --out is uploaded (tests/test_cloud.py); one that cannot be reached fails first, as one line
    monkeypatch.chdir(tmp_path)
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert main(_shards(small, "s3://bucket/audit")) == 2
    _one_line_error(capsys, "s3://bucket/audit")
    assert list(tmp_path.iterdir()) == []


def test_a_refusal_is_exactly_one_line_on_stderr_of_the_installed_command(small, tmp_path):
    cmd = [sys.executable, "-m", "spike_audit.pipelines.cli", "shards", str(small / "shards"), "--out", str(small)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "a directory containing the input" in r.stderr, r.stderr


# -- concurrency ----------------------------------------------------------------------------------------------

def test_two_runs_on_one_out_or_state_get_a_one_line_error(small, tmp_path, capsys):
    out = tmp_path / "o"
    with OutDir(out, "shards"):  # another run holds the output
        assert main(_shards(small, out)) == 2
        _one_line_error(capsys, "another spike-audit run", "is writing this --out directory")
    st = tmp_path / "st"
    with OutDir(st, "shards-state", flag="--state"):
        assert main(_shards(small, tmp_path / "o2", "--state", str(st))) == 2
        _one_line_error(capsys, "is writing this --state directory")


# -- reruns ---------------------------------------------------------------------------------------------------

def test_shards_reruns_are_byte_identical_and_state_reruns_differ_only_in_the_scan_counts(small, tmp_path, capsys):
    """Identical inputs and settings give byte-identical files, every one of them (summary.json has no timings).
    From state, every table, the quarantine and the report are byte-identical to a full run; summary.json differs
    only in what was read now (scanned, from_state, tokens_scanned)."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    st = str(tmp_path / "st")
    assert main(_shards(small, a, "--state", st)) == 0
    assert main(_shards(small, b)) == 0
    assert main(_shards(small, c, "--state", st)) == 0
    va, vb, vc = _visible(a), _visible(b), _visible(c)
    assert sorted(va) == ["config.toml", "duplicates.parquet", "metadata.json", "quarantine.json", "report.html",
                          "row_flags.parquet", "shard_scores.parquet", "summary.json"]
    assert va == vb
    assert {k: v for k, v in vc.items() if k != "summary.json"} == {k: v for k, v in va.items() if k != "summary.json"}
    sa, sc = json.loads(va["summary.json"]), json.loads(vc["summary.json"])
    assert "seconds" not in sa
    assert {k for k in sa if sa[k] != sc[k]} == {"scanned", "from_state", "tokens_scanned"}
    assert sc["scanned"] == 0 and sc["from_state"] == sa["scanned"]
    # rerunning into the same --out replaces it: still one version, same bytes
    assert main(_shards(small, a)) == 0
    assert _visible(a) == vb and len([e for e in os.listdir(a) if e.startswith(".v-")]) == 1


# -- disk full, permissions, mount points -------------------------------------------------------------------

def test_disk_full_is_a_one_line_error_and_the_previous_output_stays(small, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    assert main(_shards(small, out)) == 0
    before = _tree_digest(out)
    import pyarrow.parquet as pq

    real = pq.write_table

    def full(table, where, *a, **k):
        real(table, where, *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", full)
    assert main(_shards(small, out)) == 2
    _one_line_error(capsys, "no space left on device", "the previous output is intact")
    monkeypatch.undo()
    assert _tree_digest(out) == before
    assert not [e for e in os.listdir(out) if e.startswith(".staging-")]


def test_permission_denied_on_out_is_a_one_line_error(small, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    assert main(_shards(small, out)) == 0
    before = _tree_digest(out)
    if os.geteuid() != 0:
        os.chmod(out, 0o555)
    else:  # root ignores mode bits: deny what a non-root user would be denied
        real = Path.mkdir

        def denied(self, *a, **k):
            if self.parent == out:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real(self, *a, **k)

        monkeypatch.setattr(Path, "mkdir", denied)
    try:
        assert main(_shards(small, out)) == 2
    finally:
        os.chmod(out, 0o755)
    _one_line_error(capsys, str(out), "Permission denied")
    monkeypatch.undo()
    assert _tree_digest(out) == before


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    return r.returncode == 0


def test_out_on_a_mount_point_and_a_real_full_disk(small, tmp_path, capsys):
    mnt = tmp_path / "mnt"
    if not _mount_tmpfs(mnt, "4m"):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        assert main(_shards(small, mnt)) == 0  # the mount point itself is --out: never renamed
        assert main(_shards(small, mnt)) == 0
        before = _tree_digest(mnt)
        assert os.path.ismount(mnt)
        st = os.statvfs(mnt)
        with open(mnt / "filler", "wb") as f:  # leave a few KiB: the next output cannot fit
            f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - 8192))
        assert main(_shards(small, mnt)) == 2
        _one_line_error(capsys, "no space left on device")
        (mnt / "filler").unlink()
        assert _tree_digest(mnt) == before
        assert not [e for e in os.listdir(mnt) if e.startswith(".staging-")]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# -- signals --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_cleans_staging_and_keeps_the_previous_output(small, tmp_path, sig, code):
    out = tmp_path / "o"
    assert main(_shards(small, out)) == 0
    before = _tree_digest(out)
    cmd = [sys.executable, "-m", "spike_audit.pipelines.cli", *_shards(small, out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 120
    while not [e for e in os.listdir(out) if e.startswith(".staging-")]:
        assert proc.poll() is None and time.time() < deadline, "the run ended before it staged anything"
        time.sleep(0.01)
    time.sleep(0.3)  # inside the pipeline
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived (machine too fast for this probe)")
    assert proc.returncode == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and ("terminated" in lines[0] or "interrupted" in lines[0]), err
    assert not [e for e in os.listdir(out) if e.startswith(".staging-")]
    assert _tree_digest(out) == before


def test_a_kill_leaves_the_previous_output_and_the_next_run_removes_its_staging(small, tmp_path):
    """SIGKILL (no handler runs: the OOM killer, a preempted node) at a random moment while the run is writing:
    --out still holds the previous complete output; the next run removes the left-over staging and publishes."""
    out = tmp_path / "o"
    assert main(_shards(small, out)) == 0
    before, visible = _tree_digest(out), _visible(out)
    cmd = [sys.executable, "-m", "spike_audit.pipelines.cli", *_shards(small, out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    deadline = time.time() + 120
    while not [e for e in os.listdir(out) if e.startswith(".staging-")]:
        assert proc.poll() is None and time.time() < deadline, "the run ended before it staged anything"
        time.sleep(0.01)
    time.sleep(0.5)
    proc.kill()
    proc.wait(timeout=60)
    assert _tree_digest(out) == before  # every visible file is the previous version's
    assert main(_shards(small, out)) == 0
    assert not [e for e in os.listdir(out) if e.startswith(".staging-")]
    assert len([e for e in os.listdir(out) if e.startswith(".v-")]) == 1
    assert _visible(out) == visible


def test_output_and_state_directories_follow_the_umask(small, tmp_path):
    """Directories and files a run creates get the modes the user's umask gives (never a private 0700)."""
    import stat

    old = os.umask(0o027)
    try:
        assert main(_shards(small, tmp_path / "o", "--state", str(tmp_path / "st"))) == 0
    finally:
        os.umask(old)
    seen = 0
    for d in (tmp_path / "o", tmp_path / "st"):
        for p in [d, *d.rglob("*")]:
            if p.is_symlink():
                continue
            seen += 1
            assert stat.S_IMODE(os.stat(p).st_mode) == (0o750 if p.is_dir() else 0o640), p
    assert seen > 10


# -- exit codes for schedulers --------------------------------------------------------------------------------

def test_shards_fail_on_quarantine_exits_3_and_still_writes(small, tmp_path, capsys):
    assert main(_shards(small, tmp_path / "a")) == 0
    capsys.readouterr()
    assert main(_shards(small, tmp_path / "b", "--fail-on", "quarantine")) == 3
    err = capsys.readouterr().err
    assert "exit 3 (--fail-on quarantine): 4 shard(s) quarantined" in err
    assert _visible(tmp_path / "a") == _visible(tmp_path / "b")


# -- state is data ------------------------------------------------------------------------------------------


def _evil_pickle(flag: Path) -> bytes:
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {flag}",))

    return pickle.dumps([Evil()])


def test_a_planted_pickle_in_shards_state_is_never_run(small, tmp_path, capsys):
    st = tmp_path / "st"
    assert main(_shards(small, tmp_path / "o", "--state", str(st))) == 0
    (run,) = (st / "runs").iterdir()
    flag = tmp_path / "PWNED"
    # a pickle beside the parts, and one in the place of a part
    (run / "state_accs" / "part-00000.pkl").write_bytes(_evil_pickle(flag))
    assert main(_shards(small, tmp_path / "o", "--state", str(st))) == 0
    assert not flag.exists()
    part = sorted((run / "state_keys").iterdir())[0]
    part.write_bytes(_evil_pickle(flag))
    capsys.readouterr()
    assert main(_shards(small, tmp_path / "o", "--state", str(st))) == 2
    _one_line_error(capsys, str(part), "not a readable spike-audit records file")
    assert not flag.exists()


def test_a_state_record_with_float_bits_that_do_not_fit_is_a_one_line_error(small, tmp_path, capsys):
    # records store a NaN scalar by its bits ($nb); bits that do not fit their dtype in a state part are refused
    import pyarrow as pa
    import pyarrow.parquet as pq

    st = tmp_path / "st"
    assert main(_shards(small, tmp_path / "o", "--state", str(st))) == 0
    (run,) = (st / "runs").iterdir()
    part = sorted((run / "state_accs").iterdir())[0]
    table = pq.read_table(part)
    tree = pa.array(['{"$nb": ["<f4", "zz"]}'] + table.column("tree").to_pylist()[1:], pa.large_string())
    pq.write_table(table.set_column(0, table.schema.field(0), tree), part)
    capsys.readouterr()
    # an edited part no longer matches the index's listing of the run's parts (names and sizes)
    assert main(_shards(small, tmp_path / "o", "--state", str(st))) == 2
    _one_line_error(capsys, "the state's part files are not the ones its index lists (changed size ['part-")
    # the record itself is validated too: as if the damage had been there when the part was listed
    index = json.loads((st / "state.json").read_text())
    index["runs"][run.name]["state_accs"] = [[n, part.stat().st_size if n == part.name else sz]
                                             for n, sz in index["runs"][run.name]["state_accs"]]
    (st / "state.json").write_text(json.dumps(index))
    assert main(_shards(small, tmp_path / "o", "--state", str(st))) == 2
    _one_line_error(capsys, str(part), "row 0: not a valid record")


def test_old_pickled_or_corrupt_shards_state_is_refused_or_redone(small, tmp_path, capsys):
    st = tmp_path / "st"
    assert main(_shards(small, tmp_path / "o", "--state", str(st))) == 0
    index = json.loads((st / "state.json").read_text())
    (st / "state.json").write_text("{not json")
    capsys.readouterr()
    assert main(_shards(small, tmp_path / "o", "--state", str(st))) == 2
    _one_line_error(capsys, "state.json: not a spike-audit state index")
    bad = dict(index, shards={"x.parquet": {"fingerprint": "f", "run": "../../etc"}})
    (st / "state.json").write_text(json.dumps(bad))
    assert main(_shards(small, tmp_path / "o", "--state", str(st))) == 2
    _one_line_error(capsys, "expected {'fingerprint': str, 'run': 12 hex digits}")
    (st / "state.json").write_text(json.dumps(dict(index, version=1)))  # the pickle era: audited again
    assert main(_shards(small, tmp_path / "o", "--state", str(st))) == 0
    assert "10 read now, 0 from state" in capsys.readouterr().out


@pytest.mark.slow
def test_run_fail_on_data_and_a_corrupt_run_state(demo, tmp_path, capsys):
    root, _ = demo
    run = root / "run"
    out, st = tmp_path / "out", tmp_path / "state"
    argv = ["-q", "run", "--log", str(run / "train.log"), "--manifest", str(run / "manifest.parquet"),
            "--shards", str(run / "shards"), "--out", str(out), "--state", str(st)]
    assert main(argv + ["--fail-on", "data"]) == 3  # the demo's planted spikes are judged data
    assert "spike(s) judged data" in capsys.readouterr().err
    before = _tree_digest(out)
    good = (st / "state.json").read_text()
    for name, content, said in [
        ("state.json", "{broken", "state.json: not a spike-audit run state"),
        ("state.json", json.dumps(dict(json.loads(good), version=7)), "run state version 7, expected 1"),
        ("state.json", json.dumps(dict(json.loads(good), controls="all")), "expected fingerprint (string), controls"),
        ("verdicts.parquet", "PAR1 garbage", "verdicts.parquet: not a readable verdicts table"),
    ]:
        target = st / ".current" / name
        keep = target.read_bytes()
        target.write_bytes(content.encode())
        assert main(argv) == 2, name
        _one_line_error(capsys, said)
        target.write_bytes(keep)
        assert _tree_digest(out) == before
    capsys.readouterr()
    assert main(argv) == 0  # the repaired state: nothing new to audit
    assert "(0 audited now)" in capsys.readouterr().out


# -- manifest --out (a single file) ---------------------------------------------------------------------------

def test_manifest_out_never_replaces_an_input_or_a_foreign_file(tmp_path, capsys, monkeypatch):
    import numpy as np

    monkeypatch.chdir(tmp_path)
    header = np.zeros(256, np.int32)
    header[:3] = (20240520, 1, 5000)
    data = tmp_path / "tok_000.bin"
    data.write_bytes(header.tobytes() + np.arange(5000, dtype=np.uint16).tobytes())
    keep = data.read_bytes()
    base = ["-q", "manifest", "sequential", "--shards", str(tmp_path), "--data-files", "tok_*.bin", "-B", "2",
            "-T", "32", "--num-steps", "3", "--out"]
    assert main(base + [str(data)]) == 2
    _one_line_error(capsys, "is the same path as the data file")
    assert data.read_bytes() == keep
    notes = tmp_path / "notes.parquet"
    notes.write_bytes(b"my own file")
    assert main(base + [str(notes)]) == 2
    _one_line_error(capsys, "exists and is not a spike-audit step_manifest file")
    assert notes.read_bytes() == b"my own file"
    assert main(base + [str(tmp_path / "sub")]) == 0 and main(base + [str(tmp_path / "sub")]) == 0  # replaces its own
    (tmp_path / "d").mkdir()
    assert main(base + [str(tmp_path / "d")]) == 2
    _one_line_error(capsys, "is a directory")
    assert main(base + ["s3://bucket/m.parquet"]) == 2
    _one_line_error(capsys, "must be a local file path")
    assert not (tmp_path / "s3:").exists()


def test_replay_out_never_replaces_an_input_or_a_foreign_file(demo, tmp_path, capsys):
    root, _ = demo
    run = root / "run"
    before = _tree_digest(run)
    base = ["-q", "replay", "--model", str(tmp_path / "ckpt"), "--manifest", str(run / "manifest.parquet"),
            "--shards", str(run / "shards"), "--steps", "1", "--out"]
    assert main(base + [str(run / "manifest.parquet")]) == 2  # refused before any model is loaded
    _one_line_error(capsys, "is the same path as the manifest")
    assert main(base + [str(run / "shards" / "losses.parquet")]) == 2
    _one_line_error(capsys, "inside the shard root")
    mine = tmp_path / "metrics.jsonl"
    mine.write_text('{"step": 1, "lr": 0.1}\n')
    assert main(base + [str(mine)]) == 2
    _one_line_error(capsys, "is not a per-row losses JSONL file")
    assert mine.read_text() == '{"step": 1, "lr": 0.1}\n' and _tree_digest(run) == before


@pytest.mark.parametrize("damage", ["remove", "copy", "overwrite"])
def test_a_shards_state_part_removed_copied_or_replaced_is_refused(small, tmp_path, capsys, damage):
    """A part file deleted, copied under a new name or over another silently dropped or doubled shards' records
    (the rerun said "N from state" and left a shard out of shard_scores, or judged one against its own copy)."""
    st = tmp_path / "st"
    assert main(_shards(small, tmp_path / "o", "--state", str(st))) == 0
    (run,) = (st / "runs").iterdir()
    parts = sorted((run / "state_accs").iterdir())
    if damage == "remove":
        parts[0].unlink()
        needle = "missing ['" + parts[0].name
    elif damage == "copy":
        shutil.copy(parts[0], run / "state_accs" / "part-00999.records.parquet")
        needle = "not written by spike-audit ['part-00999"
    else:
        big = max(parts, key=lambda q: q.stat().st_size)
        small_part = min(parts, key=lambda q: q.stat().st_size)
        shutil.copy(big, small_part)
        needle = "changed size ['" + small_part.name
    capsys.readouterr()
    assert main(_shards(small, tmp_path / "o", "--state", str(st))) == 2
    _one_line_error(capsys, "the state's part files are not the ones its index lists", needle)
