"""Output directories (pipelines/outdir.py): refused where they would destroy something, locked, published in one
atomic step, left-overs cleaned, normal permissions."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.io import write_text
from spike_audit.pipelines.outdir import CURRENT, LOCK, MARKER, OutDir, check_apart

NAMES = ("a.txt", "b.txt", "c.txt")


def _publish(out, text: str, kind: str = "run", names=NAMES):
    with OutDir(out, kind) as o:
        files = o.stage() / "files"
        files.mkdir()
        for n in names:
            write_text(f"{n}:{text}", files / n)
        o.publish(files)


def _read(out) -> dict:
    return {n: (out / n).read_text() for n in NAMES}


def test_publish_replaces_every_file_at_once_and_keeps_only_the_current_version(tmp_path):
    out = tmp_path / "out"
    _publish(out, "1")
    assert _read(out) == {n: f"{n}:1" for n in NAMES}
    _publish(out, "2")
    assert _read(out) == {n: f"{n}:2" for n in NAMES}
    entries = sorted(os.listdir(out))
    assert entries == sorted([CURRENT, MARKER, LOCK, ".v-000002", *NAMES]), entries
    assert all(os.readlink(out / n) == f"{CURRENT}/{n}" for n in NAMES)
    assert os.readlink(out / CURRENT) == ".v-000002"


def test_names_a_new_version_no_longer_has_are_removed_and_foreign_files_kept(tmp_path):
    out = tmp_path / "out"
    _publish(out, "1")
    (out / "my-notes.txt").write_text("mine")
    _publish(out, "2", names=("a.txt",))
    assert not os.path.lexists(out / "b.txt")
    assert (out / "a.txt").read_text() == "a.txt:2" and (out / "my-notes.txt").read_text() == "mine"


def test_permissions_follow_the_umask_not_0700(tmp_path):
    old = os.umask(0o022)
    try:
        _publish(tmp_path / "out", "1")
    finally:
        os.umask(old)
    out = tmp_path / "out"
    for d in (out, out / ".v-000001"):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o755, d
    assert stat.S_IMODE(os.stat(out / "a.txt").st_mode) == 0o644


@pytest.mark.parametrize("fail_at", range(12))
def test_a_failure_at_any_step_of_publishing_leaves_a_complete_output(tmp_path, monkeypatch, fail_at):
    """Every rename/symlink/unlink of the publish step fails in turn (what a kill between two system calls
    leaves): the output is then entirely the old or entirely the new version, and the next run cleans up."""
    out = tmp_path / "out"
    _publish(out, "old")
    calls = []

    def failing(real):
        def f(*a, **k):
            calls.append(real.__name__)
            if len(calls) == fail_at + 1:
                raise KeyboardInterrupt  # like a signal arriving between two system calls
            return real(*a, **k)
        return f

    for name in ("rename", "replace", "symlink", "unlink"):
        monkeypatch.setattr(os, name, failing(getattr(os, name)))
    try:
        _publish(out, "new")
        completed = True
    except KeyboardInterrupt:
        completed = False
    monkeypatch.undo()
    got = _read(out)
    assert got in ({n: f"{n}:old" for n in NAMES}, {n: f"{n}:new" for n in NAMES}), (fail_at, calls, got)
    if fail_at >= len(calls):
        assert completed
    _publish(out, "next")  # the next run cleans whatever was left and publishes
    assert _read(out) == {n: f"{n}:next" for n in NAMES}
    assert not [e for e in os.listdir(out) if e.startswith((".staging-", f"{CURRENT}.tmp"))]
    assert [e for e in os.listdir(out) if e.startswith(".v-")] == [os.readlink(out / CURRENT)]


def test_a_regular_file_is_refused(tmp_path):
    f = tmp_path / "report.txt"
    f.write_text("keep me")
    with pytest.raises(UserError, match=r"report\.txt: --out exists and is not a directory"):
        _publish(f, "1")
    assert f.read_text() == "keep me"


def test_a_directory_that_is_not_a_spike_audit_output_is_refused(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "train.log").write_text("precious")
    with pytest.raises(UserError, match=r"data: --out exists, is not empty and is not a spike-audit output"):
        _publish(d, "1")
    assert sorted(os.listdir(d)) == ["train.log"]


def test_an_empty_directory_or_a_fresh_mount_point_is_adopted(tmp_path):
    d = tmp_path / "mnt"
    (d / "lost+found").mkdir(parents=True)
    _publish(d, "1")
    assert _read(d)["a.txt"] == "a.txt:1" and (d / "lost+found").is_dir()


def test_outputs_and_state_directories_never_replace_each_other(tmp_path):
    _publish(tmp_path / "state", "1", kind="run-state")
    with pytest.raises(UserError, match="is a spike-audit run state directory"):
        _publish(tmp_path / "state", "2", kind="run")
    with pytest.raises(UserError, match="expected a spike-audit shard-audit state"):
        _publish(tmp_path / "state", "2", kind="shards-state")
    _publish(tmp_path / "out", "1", kind="shards")
    _publish(tmp_path / "out", "2", kind="shards")  # an output replaces an output of its own command
    with pytest.raises(UserError, match="holds the output of `spike-audit shards`, not of `spike-audit run`"):
        _publish(tmp_path / "out", "3", kind="run")  # never another command's (a run audit's verdicts)
    with pytest.raises(UserError, match="is a spike-audit output directory"):
        _publish(tmp_path / "out", "3", kind="run-state")


def test_a_second_writer_gets_a_one_line_error_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    with OutDir(out, "run"):
        with pytest.raises(UserError, match=rf"another spike-audit run \(pid {os.getpid()}\) is writing") as err:
            with OutDir(out, "run"):
                pass
        assert "\n" not in str(err.value)
    # another process too (flock is per open file, and across processes)
    with OutDir(out, "run"):
        code = ("import sys; from spike_audit.pipelines.outdir import OutDir\n"
                "from spike_audit.pipelines.errors import UserError\n"
                f"try:\n    OutDir({str(out)!r}, 'run').__enter__()\nexcept UserError as e:\n"
                "    print(e); sys.exit(2)\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "another spike-audit run" in r.stdout, r


def test_staging_of_a_killed_run_is_removed_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    _publish(out, "1")
    code = ("import os; from spike_audit.pipelines.outdir import OutDir\n"
            f"o = OutDir({str(out)!r}, 'run').__enter__(); d = o.stage(); (d / 'half').write_text('x')\n"
            "os._exit(9)  # killed: no cleanup\n")
    subprocess.run([sys.executable, "-c", code], timeout=120)
    assert [e for e in os.listdir(out) if e.startswith(".staging-")]
    _publish(out, "2")
    assert not [e for e in os.listdir(out) if e.startswith(".staging-")]


def test_a_failed_first_run_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with OutDir(out, "run") as o:
            (o.stage() / "x").write_text("half")
            raise RuntimeError("boom")
    assert not out.exists()


@pytest.mark.parametrize("url", ["s3://bucket/audit", "gs://bucket/audit", "file:///tmp/x"])
def test_a_url_is_refused_and_never_becomes_a_local_folder(tmp_path, monkeypatch, url):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="must be a local directory"):
        _publish(url, "1")
    assert list(tmp_path.iterdir()) == []


def test_out_equal_inside_or_containing_an_input_is_refused(tmp_path):
    (tmp_path / "run" / "shards").mkdir(parents=True)
    log = tmp_path / "run" / "train.log"
    log.write_text("x")
    inputs = [("log", str(log)), ("shard root", str(tmp_path / "run" / "shards"))]
    for out, rel in ((log, "the same path as"), (tmp_path / "run" / "shards", "the same path as"),
                     (tmp_path / "run" / "shards" / "audit", "inside"), (tmp_path / "run", "a directory containing"),
                     (tmp_path, "a directory containing")):
        with pytest.raises(UserError, match=f"is {rel} the"):
            check_apart(str(out), inputs)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "run" / "shards")
    with pytest.raises(UserError, match="is the same path as the shard root"):
        check_apart(str(link), inputs)
    check_apart(str(tmp_path / "audit"), inputs)  # a sibling is fine
    check_apart(str(tmp_path / "run-audit"), inputs)  # a name sharing a prefix is not inside


def test_a_directory_another_run_is_just_creating_is_reported_as_locked(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    import fcntl

    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT)  # a run that has locked but not yet marked the directory
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"4242\n")
    try:
        with pytest.raises(UserError, match=r"another spike-audit run \(pid 4242\)"):
            _publish(out, "1")
    finally:
        os.close(fd)
    _publish(out, "1")
    assert _read(out)["a.txt"] == "a.txt:1"
