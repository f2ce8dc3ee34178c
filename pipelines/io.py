"""Atomic, deterministic writers. A failed run leaves no half-written table.

Every output goes to a temporary file in the destination directory and is renamed into place
(``os.replace`` is atomic on POSIX within one file system). A whole output directory can be staged
with :class:`AtomicDir`: files are written into ``DIR.tmp-XXXX`` and the directory is swapped in at
the end, so readers never see a mix of old and new tables.
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

_UMASK = os.umask(0)
os.umask(_UMASK)


def _tmp_path(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; published files get the usual mode
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


def write_table(table: pa.Table, dest: str | os.PathLike, spec: TableSpec | None = None) -> Path:
    """Write ``table`` as Parquet atomically. With ``spec`` the table is conformed to the contract
    (exact schema with field docs and version metadata) and sorted deterministically."""
    if spec is not None:
        table = spec.sorted(spec.conform(table, source=str(dest)))
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


class AtomicDir:
    """Stage a whole output directory and swap it in on success::

        with AtomicDir(out) as stage:
            write_table(t, stage / "spikes.parquet", SPIKES)
        # out/ now holds exactly the new files; on an exception out/ is untouched.

    Files already in ``out`` that this run does not write are kept only if ``keep`` names them
    (e.g. a state directory living inside ``out``).
    """

    def __init__(self, dest: str | os.PathLike, keep: tuple[str, ...] = ()):
        self.dest = Path(dest)
        self.keep = keep
        self.stage: Path | None = None

    def __enter__(self) -> Path:
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.stage = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.tmp-", dir=self.dest.parent))
        return self.stage

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self.stage is not None
        if exc_type is not None:
            shutil.rmtree(self.stage, ignore_errors=True)
            return False
        if self.dest.exists():
            for name in self.keep:
                src = self.dest / name
                if src.exists() and not (self.stage / name).exists():
                    os.replace(src, self.stage / name)
            old = self.dest.with_name(f".{self.dest.name}.old-{os.getpid()}")
            os.replace(self.dest, old)
            os.replace(self.stage, self.dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.stage, self.dest)
        log.info("wrote %s", self.dest)
        return False
