"""Shard names and file access: a name joined to the shard root, and exists / size / open for a local path or a
URL (``fsspec``, imported only for URLs)."""

from __future__ import annotations

import os
import posixpath


def is_url(path: str) -> bool:
    return "://" in str(path)


def resolve(shard_root: str | None, shard: str) -> str:
    """Join ``shard`` to ``shard_root`` unless ``shard`` is absolute or a URL."""
    shard = str(shard)
    if shard_root is None or is_url(shard) or os.path.isabs(shard):
        return shard
    root = str(shard_root)
    if is_url(root):
        return posixpath.join(root.rstrip("/"), shard)
    return os.path.join(root, shard)


def _exists(path: str) -> bool:
    if is_url(path):
        import fsspec

        fs, p = fsspec.core.url_to_fs(path)
        return fs.exists(p)
    return os.path.exists(path)


def _isdir(path: str) -> bool:
    if is_url(path):
        import fsspec

        fs, p = fsspec.core.url_to_fs(path)
        return fs.isdir(p)
    return os.path.isdir(path)


def _size(path: str) -> int:
    if is_url(path):
        import fsspec

        fs, p = fsspec.core.url_to_fs(path)
        return int(fs.size(p))
    return os.path.getsize(path)


def _open(path: str):
    """Binary file object for a local path or a URL (fsspec)."""
    if is_url(path):
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path, "rb")
