"""Output and state directories that are never destroyed by mistake and are replaced in one atomic step.

A spike-audit output directory ``OUT`` looks like this::

    OUT/.spike-audit.json     marker: what wrote it (kind, tool version, layout); nothing else is ever replaced
    OUT/.spike-audit.lock     flock(2) lock held by the one run writing OUT
    OUT/.v-000007/            the complete current version (every file of one run)
    OUT/.current -> .v-000007 the single entry that is swapped
    OUT/report.html -> .current/report.html   (one stable link per output file: users read OUT/NAME)

Publishing a new version: its files are written and fsynced in ``OUT/.staging-PID-XXXX/``, the directory is
renamed to ``OUT/.v-N`` (not yet visible), missing ``OUT/NAME`` links are added, and then one ``rename(2)`` of a
symlink over ``OUT/.current`` switches every file at once. A kill at any moment leaves ``.current`` pointing at
a complete version, the old or the new one; ``OUT`` itself is never renamed, so it may be a mount point.
Left-overs (staging of a killed run, versions no longer current) are removed under the lock by the next run, and
by this run on SIGTERM or SIGINT.

Refused with a one-line error: ``OUT`` is a file; ``OUT`` exists, is not empty and has no marker (it is not a
spike-audit output); ``OUT`` is the output of another command (``shards`` over a ``run`` audit); ``OUT`` is, is inside, or contains one of the run's inputs; another run holds the lock; a
URL (object stores have no atomic rename: write locally and copy). State directories use the same marker and
lock (their kind says they hold state, so an output is never written over a state directory or back).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import signal
import threading
from pathlib import Path

from spike_audit.pipelines.errors import UserError

log = logging.getLogger(__name__)

MARKER = ".spike-audit.json"
LOCK = ".spike-audit.lock"
CURRENT = ".current"
LAYOUT = 1
OUTPUT_KINDS = ("run", "shards", "spikes", "replay-pack")  # output directories: each replaces only its own kind
STATE_KINDS = ("run-state", "shards-state", "baseline")  # "baseline": shards --save-baseline
_VERSION = re.compile(r"^\.v-(\d{6,})$")
_IGNORABLE = {"lost+found"}  # a fresh file system's mount point is "empty"


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like KeyboardInterrupt so staging is removed on the way out."""


def tool_version() -> str:
    try:
        from importlib.metadata import version

        return version("spike-audit")
    except Exception:  # running from a checkout that is not installed
        return "unknown"


def is_url(path: str) -> bool:
    return "://" in str(path)


def os_error(path, err: OSError, doing: str) -> UserError:
    what = err.strerror or str(err)
    if err.errno == errno.ENOSPC:
        what = "no space left on device"
    return UserError(f"{path}: {doing}: {what}")


def _relation(out: str, inp: str) -> str | None:
    if out == inp:
        return "the same path as"
    if out.startswith(inp.rstrip(os.sep) + os.sep):
        return "inside"
    if inp.startswith(out.rstrip(os.sep) + os.sep):
        return "a directory containing"
    return None


def check_apart(path: str, inputs, flag: str = "--out") -> None:
    """Refuse ``path`` if it is, is inside, or contains any input (``(what, path)`` pairs, URLs skipped).
    Paths are compared after resolving symlinks, so a link into an input is refused too."""
    if is_url(path):
        return
    real = os.path.realpath(path)
    for what, inp in inputs:
        if not inp or is_url(inp):
            continue
        rel = _relation(real, os.path.realpath(inp))
        if rel:
            raise UserError(f"{path}: {flag} is {rel} the {what} {inp}; refusing to write there "
                            f"(choose a {flag} outside the inputs)")


def check_file_output(path: str, inputs, table: str, flag: str = "--out") -> None:
    """Refuse writing the single table file ``path`` (e.g. a step manifest) over anything but an earlier
    spike-audit ``table`` file: a URL, a directory, an input, or an existing file of another kind."""
    if is_url(path):
        raise UserError(f"{path}: {flag} must be a local file path (a URL is never turned into a local folder)")
    check_apart(path, inputs, flag)
    if os.path.isdir(path):
        raise UserError(f"{path}: {flag} is a directory, expected the path of a {table} file")
    if os.path.lexists(path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            meta = pq.read_schema(path).metadata or {}
        except (OSError, pa.ArrowException):
            meta = {}
        if meta.get(b"spike_audit.table") != table.encode():
            raise UserError(f"{path}: {flag} exists and is not a spike-audit {table} file; refusing to replace it "
                            "(remove it or choose another path)")


def _install_sigterm() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return  # someone (a test runner, an embedding program) handles it already

    def _raise(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, _raise)


class OutDir:
    """``with OutDir(path, kind, inputs) as out:`` checks, creates, marks and locks ``path``; ``out.stage()``
    gives a fresh staging directory inside it, ``out.publish(stage_dir)`` makes it the current version.
    On exit every staging directory of this run is removed and the lock released; on an error or a signal
    the current version is untouched."""

    def __init__(self, path: str | os.PathLike, kind: str, inputs=(), flag: str = "--out"):
        self.raw = os.fspath(path)  # before Path() folds "s3://b" into "s3:/b"
        self.path = Path(path)
        self.kind = kind
        self.inputs = list(inputs)
        self.flag = flag
        self._lock_fd: int | None = None
        self._stages: list[Path] = []
        self._created = False

    # -- opening ---------------------------------------------------------------------------------------------
    def __enter__(self) -> "OutDir":
        p = self.raw
        if is_url(p):
            raise UserError(f"{p}: {self.flag} must be a local directory (object stores have no atomic rename, and "
                            "a URL is never turned into a local folder): write to a local directory and copy it")
        check_apart(p, self.inputs, self.flag)
        _install_sigterm()
        try:
            self._check_existing()
            self._created = not os.path.lexists(self.path)
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock()
            self._mark()
            self.clean()
        except OSError as err:
            self.__exit__(None, None, None)
            raise os_error(p, err, f"cannot use as {self.flag}") from None
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _check_existing(self) -> None:
        p = self.path
        if not os.path.lexists(p):
            return
        if not p.is_dir():
            raise UserError(f"{p}: {self.flag} exists and is not a directory (expected a directory of outputs); "
                            "refusing to replace it")
        marker = read_marker(p)
        if marker is None:
            # empty: nothing, a fresh mount point's lost+found, or what a run starting this moment made first
            left = {e.name for e in os.scandir(p)} - _IGNORABLE - {LOCK}
            if {n for n in left if not (n.startswith("." + MARKER) and n.endswith(".tmp"))}:
                raise UserError(f"{p}: {self.flag} exists, is not empty and is not a spike-audit "
                                f"{'output' if self.kind in OUTPUT_KINDS else 'state directory'} (no {MARKER}); "
                                "refusing to replace it: remove it or choose another directory")
            return
        layout = marker.get("layout", LAYOUT)
        if isinstance(layout, bool) or not isinstance(layout, int) or layout > LAYOUT:
            raise UserError(f"{p}: {self.flag} was written by {'a newer spike-audit' if isinstance(layout, int) else 'an unknown writer'} "
                            f"({MARKER} layout {layout!r}; this version reads and writes layout {LAYOUT}); refusing to "
                            "write over it: use that version, or choose another directory")
        have = marker.get("kind")
        same_family = (have in OUTPUT_KINDS) == (self.kind in OUTPUT_KINDS)
        if same_family and self.kind in OUTPUT_KINDS and have != self.kind:
            # another command's results (a run's verdicts under a shards audit's --out): a slip, never replaced
            raise UserError(f"{p}: {self.flag} holds the output of `spike-audit {have}`, not of `spike-audit "
                            f"{self.kind}`; refusing to replace it: remove it or choose another directory")
        if not same_family or (self.kind in STATE_KINDS and have != self.kind):
            raise UserError(f"{p}: {self.flag} is a spike-audit {_describe(have)}, expected "
                            f"{'an output directory' if self.kind in OUTPUT_KINDS else 'a spike-audit ' + _describe(self.kind)}; "
                            "refusing to write over it")

    def _lock(self) -> None:
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"{self.path}: another spike-audit run{f' (pid {holder})' if holder else ''} is "
                                f"writing this {self.flag} directory; wait for it or choose another") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            finally:
                os.close(self._lock_fd)
                self._lock_fd = None

    def _mark(self) -> None:
        from spike_audit.pipelines.io import write_json

        want = {"kind": self.kind, "tool": "spike-audit", "tool_version": tool_version(), "layout": LAYOUT}
        if read_marker(self.path) != want:
            write_json(want, self.path / MARKER)

    # -- staging and publishing ------------------------------------------------------------------------------
    def stage(self) -> Path:
        """A fresh, empty staging directory inside the output (same file system as the versions)."""
        d = self.path / f".staging-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            d.mkdir(0o777)  # the umask applies: normal permissions, not mkdtemp's 0700
        except OSError as err:
            raise os_error(self.path, err, "cannot create a staging directory") from None
        self._stages.append(d)
        return d

    def current(self) -> Path | None:
        """The current version's directory, or None before the first publish."""
        try:
            target = os.readlink(self.path / CURRENT)
        except OSError:
            return None
        return self.path / target if _VERSION.match(target) else None

    def publish(self, files: Path) -> Path:
        """Make the directory ``files`` (inside a stage) the current version, in one atomic step."""
        try:
            return self._publish(files)
        except OSError as err:
            raise os_error(self.path, err, "cannot publish the new output (the previous output is intact)") from None

    def _publish(self, files: Path) -> Path:
        names = sorted(e.name for e in os.scandir(files) if not e.name.startswith("."))
        for n in names:
            _fsync(files / n)
        _fsync(files)
        numbers = [int(m.group(1)) for e in os.scandir(self.path) if (m := _VERSION.match(e.name))]
        version = f".v-{max(numbers, default=0) + 1:06d}"
        os.rename(files, self.path / version)
        for n in names:  # stable links OUT/NAME -> .current/NAME (added before the swap: at worst dangling)
            link = self.path / n
            if os.path.islink(link) and os.readlink(link) == f"{CURRENT}/{n}":
                continue
            _symlink_replace(f"{CURRENT}/{n}", link)
        _symlink_replace(version, self.path / CURRENT)  # THE atomic step
        _fsync(self.path)
        for e in os.scandir(self.path):  # links of names the new version no longer has
            if e.is_symlink() and not e.name.startswith(".") and e.name not in names and \
                    os.readlink(e.path).startswith(CURRENT + "/"):
                os.unlink(e.path)
        self.clean()
        log.info("wrote %s", self.path)
        return self.path / version

    def clean(self) -> None:
        """Remove staging directories and versions that are not current (safe: we hold the lock)."""
        cur = self.current()
        for e in os.scandir(self.path):
            stale = e.name.startswith(".staging-") or (_VERSION.match(e.name) and (cur is None or e.name != cur.name))
            stale = stale or (e.name.startswith(CURRENT + ".tmp-") or (e.name.startswith(".") and e.name.endswith(".tmp")))
            if stale:
                _remove(Path(e.path))

    def __exit__(self, exc_type, exc, tb) -> bool:
        for d in self._stages:
            _remove(d)
        self._stages.clear()
        if self._created and self._lock_fd is not None and \
                {e.name for e in os.scandir(self.path)} <= {MARKER, LOCK}:
            # a run that failed before its first output leaves nothing behind
            for name in (MARKER, LOCK):
                (self.path / name).unlink(missing_ok=True)
            try:
                self.path.rmdir()
            except OSError:
                pass
        self._unlock()
        return False


def _describe(kind) -> str:
    return {"run-state": "run state directory (--state of spike-audit run)",
            "shards-state": "shard-audit state directory (--state of spike-audit shards)",
            "baseline": "baseline (--save-baseline of spike-audit shards)"}.get(
        kind, f"output directory ({kind})" if kind in OUTPUT_KINDS else f"directory of unknown kind {kind!r}")


def read_marker(path: Path) -> dict | None:
    try:
        m = json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("tool") == "spike-audit" else None


def _remove(p: Path) -> None:
    if p.is_symlink() or p.is_file():
        p.unlink(missing_ok=True)
    else:
        shutil.rmtree(p, ignore_errors=True)


def _symlink_replace(target: str, link: Path) -> None:
    tmp = link.with_name(f"{CURRENT}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EBADF):  # directories on some file systems
            raise
    finally:
        os.close(fd)
