"""Atomic, deterministic writers. A failed run leaves no half-written table.

Every output goes to a temporary file in the destination directory and is renamed into place
(``os.replace`` is atomic on POSIX within one file system). Whole output directories are published in one
atomic step by :mod:`spike_audit.pipelines.outdir`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from spike_audit.schemas import TableSpec

log = logging.getLogger(__name__)

def _umask() -> int:
    """The process's umask now, read without changing it (``/proc/self/status``, Linux >= 4.7); elsewhere set
    and restored at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _tmp_path(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; published files get the usual mode
    return Path(tmp)


@contextlib.contextmanager
def _atomic(dest: str | os.PathLike):
    """Yield a temporary path beside ``dest``; on success rename it onto ``dest``, else delete it."""
    dest = Path(dest)
    tmp = _tmp_path(dest)
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_table(table: pa.Table, dest: str | os.PathLike, spec: TableSpec | None = None,
                metadata: dict[bytes, bytes] | None = None) -> Path:
    """Write ``table`` as Parquet atomically. With ``spec`` the table is conformed to the contract
    (exact schema with field docs and version metadata) and sorted deterministically. ``metadata``:
    extra schema metadata entries (added after conforming, which resets the schema)."""
    if spec is not None:
        table = spec.sorted(spec.conform(table, source=str(dest)))
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    with _atomic(dest) as tmp:
        # No timestamps or writer-dependent metadata beyond the schema: identical inputs give
        # byte-identical files.
        pq.write_table(table, tmp, compression="zstd", write_statistics=True)
    return Path(dest)


def write_text(text: str, dest: str | os.PathLike) -> Path:
    with _atomic(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(dest)


def write_json(obj: object, dest: str | os.PathLike) -> Path:
    return write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=False, default=_json_default) + "\n",
                      dest)


def _json_default(o):
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class RemoteOut:
    """An output directory at a URL (``s3://``, ``gs://``), with the interface of
    :class:`spike_audit.pipelines.outdir.OutDir` (``with RemoteOut(url) as out: files = out.stage() / "files";
    ...; out.publish(files)``). Object stores have no atomic rename: the files are written locally and uploaded
    by :func:`spike_audit.pipelines.fs.upload_dir`: the old completion marker (``_SUCCESS``) removed first, stale
    files deleted, the new marker uploaded last, so readers go by the marker. Local staging is removed on exit."""

    MARKER = "_SUCCESS"

    def __init__(self, url: str):
        self.raw = self.path = str(url)
        self._tmp: list[str] = []

    def __enter__(self) -> "RemoteOut":
        from spike_audit.pipelines import fs

        fs.check_reachable(self.raw)  # a missing s3fs/gcsfs, credentials or endpoint fail before any work
        return self

    def stage(self) -> Path:
        d = tempfile.mkdtemp(prefix=".spike-audit-upload-")
        self._tmp.append(d)
        return Path(d)

    def publish(self, files: Path) -> str:
        from spike_audit.pipelines import fs

        fs.upload_dir(str(files), self.raw, marker=self.MARKER)
        log.info("wrote %s", self.raw)
        return self.raw

    def __exit__(self, exc_type, exc, tb) -> bool:
        for d in self._tmp:
            shutil.rmtree(d, ignore_errors=True)
        return False

