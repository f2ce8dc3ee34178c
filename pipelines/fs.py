"""The one filesystem layer: local paths through the OS, URLs (``s3://``, ``gs://``, ``memory://``, any fsspec
protocol) through fsspec, so logs, manifests, shards, config files and outputs accept the same paths.

Nothing here touches the network unless a URL was given. A URL whose protocol needs a package that is not
installed (``s3fs`` for ``s3://``, ``gcsfs`` for ``gs://``) is a one-line :class:`UserError` saying which, never
an ImportError; a missing object is ``UserError("URL: not found")``. Endpoints and credentials come from the
usual places (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``..., ``FSSPEC_S3_ENDPOINT_URL``, gcloud's defaults).

May import: :mod:`spike_audit.pipelines.errors` only.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
from pathlib import Path

from spike_audit.pipelines.errors import UserError

_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
             "hf": "huggingface_hub"}


def is_url(path) -> bool:
    return "://" in str(path)


def protocol(path) -> str:
    return str(path).split("://", 1)[0].lower() if is_url(path) else "file"


def url_fs(url: str):
    """(fsspec filesystem, path without protocol) for a URL; UserError if its package is missing."""
    import fsspec

    try:
        fs, p = fsspec.core.url_to_fs(str(url))
    except ImportError:
        pkg = _PACKAGES.get(protocol(url))
        if pkg is None:
            raise UserError(f"{url}: reading {protocol(url)}:// needs an fsspec implementation of it, which is not "
                            f"installed") from None
        raise UserError(f"{url}: reading {protocol(url)}:// needs the {pkg} package (pip install {pkg})") from None
    except ValueError as err:
        raise UserError(f"{url}: not a usable URL ({err})") from None
    except Exception as err:  # the filesystem's own start-up: a missing JVM (hdfs), a refused connection (ftp, ...)
        from spike_audit.pipelines.errors import reason

        raise UserError(f"{url}: cannot open {protocol(url)}:// ({type(err).__name__}: {reason(err, 200)})") from None
    return fs, p


def _unstrip(fs, url: str, p: str) -> str:
    proto = protocol(url)
    if p.startswith(proto + "://"):
        return p
    if proto in ("memory", "file", "local"):  # their paths are absolute: file:///abs, not the relative file://abs
        return f"{proto}://{p}"
    return f"{proto}://{p.lstrip('/')}"


def join(root: str, *names: str) -> str:
    if is_url(root):
        return posixpath.join(str(root).rstrip("/"), *names)
    return os.path.join(root, *names)


def exists(path) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    fs, p = url_fs(path)
    try:
        return bool(fs.exists(p))
    except PermissionError as err:
        raise UserError(f"{path}: permission denied ({err})") from None


def isdir(path) -> bool:
    if not is_url(path):
        return os.path.isdir(path)
    fs, p = url_fs(path)
    return bool(fs.isdir(p))


def _mtime(info: dict) -> float:
    for k in ("mtime", "LastModified", "last_modified", "updated", "mtime_ns", "created"):
        v = info.get(k)
        if v is None:
            continue
        if hasattr(v, "timestamp"):
            return float(v.timestamp())
        if isinstance(v, str):
            import datetime

            try:
                return datetime.datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
        return float(v) / (1e9 if k == "mtime_ns" else 1.0)
    return 0.0


def stat(path) -> tuple[int, float]:
    """(size in bytes, modification time) of a file; UserError if it does not exist."""
    if not is_url(path):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise UserError(f"{path}: not found") from None
        return st.st_size, st.st_mtime
    fs, p = url_fs(path)
    try:
        info = fs.info(p)
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    return int(info.get("size") or 0), _mtime(info)


def size(path) -> int:
    return stat(path)[0]


def list_files(path) -> list[tuple[str, int, float]]:
    """Every file under a directory (recursive), sorted: (path or URL, size, mtime)."""
    if not is_url(path):
        out = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            for f in sorted(filenames):
                full = os.path.join(dirpath, f)
                st = os.stat(full)
                out.append((full, st.st_size, st.st_mtime))
        return out
    fs, p = url_fs(path)
    try:
        found = fs.find(p, detail=True)
    except (ValueError, OSError) as err:  # a bucket-less s3://, a listing the store refuses
        from spike_audit.pipelines.errors import reason

        raise UserError(f"{path}: cannot list the files under it ({reason(err, 200)})") from None
    return sorted((_unstrip(fs, str(path), k), int(v.get("size") or 0), _mtime(v)) for k, v in found.items()
                  if v.get("type", "file") == "file")


def list_files_or_file(path) -> list[tuple[str, int, float]]:
    """:func:`list_files` of a directory, or the one file ``path`` is: (path or URL, size, mtime)."""
    if isdir(path):
        return list_files(path)
    if not is_url(path):
        st = os.stat(path)
        return [(str(path), st.st_size, st.st_mtime)]
    fsys, p = url_fs(path)
    info = fsys.info(p)
    return [(str(path), int(info.get("size") or 0), _mtime(info))]


def list_dir(path) -> dict[str, str]:
    """The files directly in a directory (following links): name -> path or URL."""
    if not is_url(path):
        return {e.name: e.path for e in sorted(os.scandir(path), key=lambda e: e.name) if e.is_file()}
    fsys, p = url_fs(path)
    out = {}
    for info in fsys.ls(p, detail=True):
        if info.get("type", "file") == "file":
            name = posixpath.basename(info["name"].rstrip("/"))
            out[name] = _unstrip(fsys, str(path), info["name"])
    return dict(sorted(out.items()))


def stat_tree(path) -> tuple[int, float]:
    """(size, mtime) of a file, or of a directory: its files' sizes summed and the newest mtime."""
    if isdir(path):
        files = list_files(path)
        return sum(s for _, s, _ in files), max((m for _, _, m in files), default=0.0)
    return stat(path)


def glob(pattern: str) -> list[tuple[str, int, float]]:
    """Files matching a glob (``**`` recursive), local or URL: (path, size, mtime), sorted."""
    if not is_url(pattern):
        import glob as _glob

        out = []
        for p in sorted(_glob.glob(pattern, recursive=True)):
            if os.path.isfile(p):
                st = os.stat(p)
                out.append((p, st.st_size, st.st_mtime))
        return out
    fs, p = url_fs(pattern)
    found = fs.glob(p, detail=True)
    return sorted((_unstrip(fs, pattern, k), int(v.get("size") or 0), _mtime(v)) for k, v in found.items()
                  if v.get("type", "file") == "file")


def has_magic(path: str) -> bool:
    return any(c in str(path) for c in "*?[")


def open(path, mode: str = "rb"):  # noqa: A001 - the one open of this layer
    """A file object for a local path or a URL."""
    if not is_url(path):
        import builtins

        return builtins.open(path, mode)
    fs, p = url_fs(path)
    try:
        return fs.open(p, mode)
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None


def read_bytes(path) -> bytes:
    """A small file's bytes (a config file, a JSON record). Local: a regular file only (a FIFO would block, a
    device never end); a missing file, a symlink loop or a permission error is a one-line UserError."""
    if not is_url(path):
        import stat as _stat

        try:
            st = os.stat(path)
            if _stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError
            if not _stat.S_ISREG(st.st_mode):
                kind = ("a FIFO" if _stat.S_ISFIFO(st.st_mode) else "a socket" if _stat.S_ISSOCK(st.st_mode)
                        else "a device")
                raise UserError(f"{path}: not a regular file ({kind}); expected a file")
            return Path(path).read_bytes()
        except FileNotFoundError:
            raise UserError(f"{path}: not found") from None
        except IsADirectoryError:
            raise UserError(f"{path}: is a directory, expected a file") from None
        except OSError as err:
            raise UserError(f"{path}: cannot read ({err.strerror or err}); expected a readable file") from None
    with open(path, "rb") as f:
        return f.read()


@contextlib.contextmanager
def local_copy(path):
    """A local path holding ``path``'s content: the path itself when local; for a URL, a temporary copy of the
    file or directory (removed afterwards). For small inputs read whole (logs, config files)."""
    if not is_url(path):
        yield str(path)
        return
    fs, p = url_fs(path)
    if not fs.exists(p):
        raise UserError(f"{path}: not found")
    tmp = tempfile.mkdtemp(prefix=".spike-audit-fetch-")
    try:
        name = posixpath.basename(p.rstrip("/")) or "object"
        dest = os.path.join(tmp, name)
        if fs.isdir(p):
            for url, _, _ in list_files(path):
                rel = posixpath.relpath(url_fs(url)[1], p)
                os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
                fs.get(url_fs(url)[1], os.path.join(dest, rel))
        else:
            fs.get(p, dest)
        yield dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def arrow_fs(path):
    """(pyarrow FileSystem or None, path) to give pyarrow readers (datasets with predicate push-down)."""
    if not is_url(path):
        return None, str(path)
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, p = url_fs(path)
    return PyFileSystem(FSSpecHandler(fs)), p


def check_reachable(url: str) -> None:
    """UserError (one line) unless the store behind ``url`` answers (credentials, endpoint, bucket)."""
    fsys, p = url_fs(url)
    try:
        fsys.exists(p)
        bucket = p.split("/", 1)[0]
        if protocol(url) in ("s3", "s3a", "gs", "gcs") and bucket and not fsys.exists(bucket):
            raise UserError(f"{url}: bucket {bucket!r} not found")
    except UserError:
        raise
    except Exception as err:  # botocore / google-auth errors: no credentials, no endpoint, access denied
        msg = " ".join(str(err).split())[:200]
        raise UserError(f"{url}: cannot reach the object store ({type(err).__name__}: {msg})") from None


def upload_dir(local: str, url: str, marker: str | None = None) -> None:
    """Publish a local output directory at ``url`` (object stores have no atomic rename): the old completion
    marker is removed first (so a reader never takes a half-replaced output for complete), every file is
    copied, files of the previous output that this one does not have are deleted, and ``marker`` (a file
    name inside ``local``) is copied last."""
    fs, base = url_fs(url)
    base = base.rstrip("/")
    if marker and fs.exists(f"{base}/{marker}"):
        fs.rm(f"{base}/{marker}")
    new = set()
    for dirpath, _, filenames in os.walk(local):
        for f in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, f), local).replace(os.sep, "/")
            if rel == marker:
                continue
            new.add(rel)
            fs.put_file(os.path.join(dirpath, f), f"{base}/{rel}")
    if fs.exists(base):
        for k in fs.find(base):
            rel = posixpath.relpath(k, base)
            if rel not in new and rel != marker:
                fs.rm(k)
    if marker and os.path.exists(os.path.join(local, marker)):
        fs.put_file(os.path.join(local, marker), f"{base}/{marker}")
