"""Shard names and file access: THE rule for where a shard name may point, and exists / size / open for a
local path or a URL (``fsspec``, imported only for URLs).

The confinement rule (:func:`resolve`, used by every reader through ``open_shard``, so by ``batch``, ``run``,
``replay``, the manifest checks and ``shards``): a shard name read from a manifest is resolved against the shard
root and must stay inside it.

* A relative name is joined to the root; after following symlinks (``realpath``) it must be the root or below
  it. ``../x``, an absolute path outside the root and a symlink that resolves out of the root are refused with
  ``UserError("shard '../x': outside the shard root ROOT (resolves to ...); pass --allow-outside-root ...")``
  unless the root allows it (:class:`ShardRoot` ``allow_outside_root``). An absolute name inside the root is
  fine.
* A URL name (any ``scheme://``, ``file://`` included, or an fsspec chain with ``::``) is read only when the root
  itself is a URL and the name lies under it, or when the root allows URLs (``allow_urls``, ``--allow-urls``).
  Nothing touches the network unless the user gave a URL (a URL root, a URL input, or ``--allow-urls``).
* Under a URL root, a relative name must not climb out of it (``..``) and an absolute local name is outside it.
* A root of ``None`` means the names are the caller's own paths (the inputs of ``spike-audit shards``, a
  builder's ``--data-files``): nothing to confine them to. Names from a manifest always get a root (``batch``
  without ``--shards`` uses the current directory).

Local files are opened through :mod:`spike_audit.pipelines.files`: regular files only (a FIFO or a device is
refused at once), OS errors as one-line UserErrors.
"""

from __future__ import annotations

import os
import posixpath
import re

from spike_audit.pipelines import fs
from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.files import check_regular, open_regular, os_error


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class ShardRoot(str):
    """A shard root (a path or a URL) that carries what its manifest's names may do beyond it. A plain ``str``
    root allows neither. It is a ``str``, so it passes unchanged through configs and Beam DoFns (picklable)."""

    allow_outside_root: bool
    allow_urls: bool

    def __new__(cls, root, allow_outside_root: bool = False, allow_urls: bool = False):
        self = super().__new__(cls, str(root))
        self.allow_outside_root = bool(allow_outside_root or getattr(root, "allow_outside_root", False))
        self.allow_urls = bool(allow_urls or getattr(root, "allow_urls", False))
        return self

    def __reduce__(self):
        return (ShardRoot, (str(self), self.allow_outside_root, self.allow_urls))

    def __repr__(self) -> str:
        return f"ShardRoot({str(self)!r}, allow_outside_root={self.allow_outside_root}, allow_urls={self.allow_urls})"


def is_url(path: str) -> bool:
    """A URL or an fsspec URL chain (anything that fsspec, not the local file system, would open)."""
    p = str(path)
    return "://" in p or "::" in p


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _outside(shard: str, root: str, where: str) -> UserError:
    return UserError(f"shard '{shard}': outside the shard root {root} ({where}); pass --allow-outside-root to "
                     f"read files outside the root (names a manifest gives, links found in a directory)")


def resolve(shard_root: str | None, shard: str) -> str:
    """The path or URL of ``shard`` under ``shard_root``, by the confinement rule (module docstring)."""
    shard = str(shard)
    if shard_root is None:
        return shard
    root = str(shard_root)
    allow_outside = getattr(shard_root, "allow_outside_root", False)
    allow_urls = getattr(shard_root, "allow_urls", False)
    if not shard:
        raise UserError("shard '': an empty shard name; expected a path relative to the shard root")
    if "\x00" in shard:
        raise UserError(f"shard {shard!r}: a NUL byte in the name; expected a path relative to the shard root")
    if is_url(shard):
        if allow_urls or (is_url(root) and _under(shard, root)):
            return shard
        raise UserError(f"shard '{shard}': a URL{' outside the shard root ' + root if is_url(root) else ''}; "
                        f"pass --allow-urls to read URLs the manifest names")
    if is_url(root):
        if os.path.isabs(shard) or shard.startswith("/"):
            if allow_outside:
                return shard
            raise _outside(shard, root, "an absolute local path under a URL root")
        norm = posixpath.normpath(shard)
        if norm == ".." or norm.startswith("../"):
            if not allow_outside:
                raise _outside(shard, root, f"climbs to {norm}")
        return posixpath.join(root.rstrip("/"), shard)
    joined = shard if os.path.isabs(shard) else os.path.join(root, shard)
    if allow_outside:
        return joined
    real_root = os.path.realpath(root)
    real = os.path.realpath(joined)
    if not _inside(real, real_root):
        raise _outside(shard, root, f"resolves to {real}")
    return joined


def trusted_root(shard_root: str | None) -> ShardRoot | None:
    """A root for paths the user typed (a builder's ``--data-files``, ``manifest --check`` of the manifest just
    built from them): not confined, the user pointed there. A manifest naming such paths is confined again when
    ``run`` or ``batch`` reads it."""
    return None if shard_root is None else ShardRoot(shard_root, allow_outside_root=True, allow_urls=True)


def user_path(shard_root: str | None, name: str) -> str:
    """A path the user typed, joined to the root (see :func:`trusted_root`)."""
    return resolve(trusted_root(shard_root), name)


def _under(url: str, root: str) -> bool:
    a, b = _norm_url(url), _norm_url(root)
    return a is not None and b is not None and (a == b or a.startswith(b.rstrip("/") + "/"))


def _norm_url(url: str) -> str | None:
    """``scheme://netloc/path`` with the path normalised, or None when it climbs above the netloc."""
    m = _SCHEME.match(url)
    if not m:
        return None
    scheme, rest = url[: m.end()], url[m.end():]
    netloc, _, path = rest.partition("/")
    norm = posixpath.normpath("/" + path) if path else "/"
    if ".." in path.split("/"):
        return None
    return scheme.lower() + netloc + (norm if norm != "/" else "")


def confine_tree(shard_root: str | None, shard: str, path: str) -> None:
    """For a directory shard (a ``datasets`` directory, an MDS dataset): every file in it must be a regular
    file and, under a local root that does not allow it, resolve inside the root (a planted symlink is refused)."""
    if shard_root is None or is_url(path) or not os.path.isdir(path):
        return
    allow_outside = getattr(shard_root, "allow_outside_root", False)
    real_root = os.path.realpath(str(shard_root)) if not is_url(str(shard_root)) else None
    for dirpath, dirnames, filenames in os.walk(path):
        for name in sorted(filenames) + sorted(d for d in dirnames if os.path.islink(os.path.join(dirpath, d))):
            full = os.path.join(dirpath, name)
            real = os.path.realpath(full)
            if real_root is not None and not allow_outside and not _inside(real, real_root):
                raise _outside(shard, str(shard_root), f"{os.path.relpath(full, path)} resolves to {real}")
            if name in filenames:
                check_regular(full, "shard file")


def _exists(path: str) -> bool:
    return fs.exists(path)


def _isdir(path: str) -> bool:
    return fs.isdir(path)


def _size(path: str) -> int:
    if is_url(path):
        return int(fs.size(path))
    return int(check_regular(path, "shard file").st_size)


def _open(path: str):
    """Binary file object for a local regular file or a URL (the one filesystem layer,
    :mod:`spike_audit.pipelines.fs`)."""
    if is_url(path):
        try:
            return fs.open(path, "rb")
        except (OSError, ValueError) as err:
            raise UserError(f"{path}: cannot open ({err})") from None
    return open_regular(path, "shard file")


def _memmap(path: str, dtype, offset: int = 0, shape=None):
    """``np.memmap`` of a local regular file, OS errors as UserErrors."""
    import numpy as np

    check_regular(path, "shard file")
    try:
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    except OSError as err:
        raise os_error(path, err, "shard file") from None
