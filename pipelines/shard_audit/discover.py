"""The driver's small work: expand the inputs to shards, fingerprint them (path, size, modification time), and
open each new or changed shard once to check it is readable and has a ``tokens`` or ``text`` column."""

from __future__ import annotations

import glob
import logging
import os
import numpy as np

from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.progress import tick
from spike_audit.pipelines.shard_audit.config import Shard, ShardAuditConfig


log = logging.getLogger(__name__)


SHARD_SUFFIXES = (".parquet", ".pq", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".jsonl.zstd", ".ndjson", ".json.gz",
                  ".arrow", ".npy", ".bin")


def _is_hf_dir(path: str) -> bool:
    """A dataset directory read as one shard: a Hugging Face ``datasets`` directory, or a mosaicml-streaming
    MDS dataset (``index.json`` beside its ``shard.NNNNN.mds[.zstd]`` files)."""
    return os.path.isdir(path) and (os.path.exists(os.path.join(path, "dataset_info.json"))
                                    or os.path.exists(os.path.join(path, "state.json"))
                                    or os.path.isfile(os.path.join(path, "index.json")))


def _is_shard_file(path: str) -> bool:
    return path.endswith(SHARD_SUFFIXES) and not os.path.basename(path).startswith(".")


def _glob_base(pattern: str) -> str:
    """The directory part of a glob before its first wildcard."""
    parts = []
    for part in pattern.split(os.sep):
        if glob.has_magic(part):
            break
        parts.append(part)
    return os.sep.join(parts) or "."


def _confined(path: str, base: str, allow_outside: bool) -> None:
    """A file found by walking a directory (or matching a glob) under ``base`` must resolve inside it: a planted
    symlink to /etc/passwd is refused (the one rule, :mod:`spike_audit.pipelines.shards.paths`)."""
    from spike_audit.pipelines.shards.paths import ShardRoot, resolve

    resolve(ShardRoot(base, allow_outside_root=allow_outside), os.path.relpath(path, base))


def discover(inputs: tuple[str, ...], root: str | None = None, allow_outside_root: bool = False) -> list[Shard]:
    """Expand paths, directories and globs (local, or URLs through the one filesystem layer) into shards. A
    local path given itself is the user's; a file found inside a given directory or by a glob must resolve
    inside that directory (or the glob's base) unless ``allow_outside_root``. Only regular files (and datasets
    directories) are shards: a FIFO or a device in a directory is refused at once."""
    from spike_audit.pipelines import fs
    from spike_audit.pipelines.files import check_regular

    found: dict[str, tuple[int, float]] = {}
    for inp in inputs:
        if fs.is_url(inp):  # through the one filesystem layer (fsspec): s3://, gs://, ...
            if fs.has_magic(inp):
                res = fs.glob(inp)
            elif fs.isdir(inp):
                if fs.exists(fs.join(inp, "dataset_info.json")) or fs.exists(fs.join(inp, "state.json")):
                    found[inp.rstrip("/")] = fs.stat_tree(inp)
                    continue
                res = fs.list_files(inp)
            elif fs.exists(inp):
                res = [(inp, *fs.stat(inp))]
            else:
                raise UserError(f"{inp}: not found")
            res = [r for r in res if _is_shard_file(r[0])]
            if not res:
                raise UserError(f"{inp}: matches no shard file")
            for path, size, mtime in res:
                found[path] = (size, float(mtime))
            continue
        magic = glob.has_magic(inp)
        paths = sorted(glob.glob(inp, recursive=True)) if magic else [inp]
        if not paths:
            raise UserError(f"{inp}: matches no file")
        for p in paths:
            if not os.path.exists(p):
                from spike_audit.pipelines.files import missing

                raise missing(p, f"{p}: no such file or directory")
            if magic:
                _confined(p, _glob_base(inp), allow_outside_root)
            if _is_hf_dir(p):
                found[os.path.abspath(p)] = _dir_stat(p)
            elif os.path.isdir(p):
                seen_dirs = {os.path.realpath(p)}
                for dirpath, dirnames, filenames in os.walk(p, followlinks=allow_outside_root):
                    dirnames.sort()
                    for d in list(dirnames):  # a linked directory: refused out of the root, never skipped silently
                        full = os.path.join(dirpath, d)
                        real = os.path.realpath(full)
                        if os.path.islink(full):
                            _confined(full, p, allow_outside_root)
                            if not allow_outside_root:  # it resolves inside the root: walked where it is
                                dirnames.remove(d)
                                continue
                        if real in seen_dirs:  # a link loop, or a second way to one directory
                            dirnames.remove(d)
                        else:
                            seen_dirs.add(real)
                    if _is_hf_dir(dirpath):
                        found[os.path.abspath(dirpath)] = _dir_stat(dirpath)
                        dirnames[:] = []
                        continue
                    for f in sorted(filenames):
                        full = os.path.join(dirpath, f)
                        if _is_shard_file(full):
                            _confined(full, p, allow_outside_root)
                            st = check_regular(full, "shard file")
                            found[os.path.abspath(full)] = (st.st_size, st.st_mtime)
            else:
                st = check_regular(p, "shard file")
                found[os.path.abspath(p)] = (st.st_size, st.st_mtime)
    if not found:
        raise UserError(f"no shards found in {', '.join(inputs)} (looked for {', '.join(SHARD_SUFFIXES)})")
    for path in found:  # a file name whose bytes are not UTF-8 cannot be named in the outputs and state
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            shown = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise UserError(f"{shown}: a shard whose file name is not UTF-8 text; rename it") from None
    paths = sorted(found)
    urls = [p for p in paths if "://" in p]
    if urls and len(urls) < len(paths):
        raise UserError("mix of local paths and URLs: audit them in one place (give all local or all URLs)")
    if urls:
        return _url_shards(paths, found, root)
    if root is None:
        root = os.path.commonpath(paths)
        if len(paths) == 1 or os.path.isfile(root):
            root = os.path.dirname(root)
    shards = []
    for p in paths:
        name = os.path.relpath(p, root) if root else p
        shards.append(Shard(name, p, found[p][0], found[p][1]))
    return shards


def _url_shards(paths: list[str], found: dict, root: str | None) -> list[Shard]:
    """Shards at URLs, named relative to ``root`` or to the URLs' common directory (as local shards are)."""
    import posixpath

    protos = {p.split("://", 1)[0] for p in paths}
    if len(protos) > 1:
        raise UserError(f"shards under several protocols ({', '.join(sorted(protos))}): audit them separately")
    proto = protos.pop()
    bare = [p.split("://", 1)[1] for p in paths]
    if root is None:
        base = posixpath.commonpath(bare) if len(bare) > 1 else posixpath.dirname(bare[0])
        if base in bare:  # one shard given by its own path
            base = posixpath.dirname(base)
    else:
        base = root.split("://", 1)[1] if "://" in root else root
    base = base.rstrip("/")
    shards = []
    for p, b in zip(paths, bare):
        name = posixpath.relpath(b, base) if base and b.startswith(base + "/") else p
        shards.append(Shard(name, f"{proto}://{b}", found[p][0], found[p][1]))
    return shards


def _dir_stat(path: str) -> tuple[int, float]:
    size, mtime = 0, 0.0
    for dirpath, _, filenames in os.walk(path):
        for f in filenames:
            st = os.stat(os.path.join(dirpath, f))
            size += st.st_size
            mtime = max(mtime, st.st_mtime)
    return size, mtime


def check_shards(shards: list[Shard], cfg: ShardAuditConfig) -> tuple[list[tuple[Shard, int | None, str]], list[dict]]:
    """Open each shard once: (shard, rows, how) for the good ones, and a list of the bad ones. ``how`` is
    ``row``, or ``documents`` for a flat token file whose rows are EOS-delimited documents: those are
    counted by the pipeline's workers as they cut the file into chunks (rows None here), never by a scan
    on the driver."""
    from spike_audit.pipelines.shards.read import open_shard
    from spike_audit.pipelines.shards.rows import HOW

    good, bad = [], []
    text_only: list[tuple[str, list[str]]] = []  # shards whose token ids are probably under another column
    for k, s in enumerate(shards):
        try:
            reader = open_shard(None, s.path, tokens_col=cfg.tokens_col, text_col=cfg.text_col, dtype=cfg.dtype,
                                rows=cfg.flat_rows)
            close = getattr(reader, "close", None)
            try:
                other = getattr(reader, "token_id_columns", lambda: [])()
                if other:
                    text_only.append((s.name, other))
                if "row" not in reader.units:
                    raise UserError(f"a flat token file: its rows need a definition, {HOW}")
                rows = getattr(reader, "rows", None)
                if rows is not None and rows.kind == "documents" and not getattr(reader, "own_rows", False):
                    if reader.length("token"):
                        reader.read(np.array([[0, 1]]), unit="token")
                    good.append((s, None, "documents"))
                    continue
                n = reader.length("row")
                if n:
                    reader.read(np.array([[0, 1]]), unit="row")
            finally:
                if close:
                    close()
            good.append((s, n, "row"))
        except UserError as err:
            bad.append({"shard": s.name, "error": str(err)})
        except Exception as err:  # unreadable file: report it, do not crash on the first one
            msg = f"{type(err).__name__}: {err}".strip().splitlines()
            bad.append({"shard": s.name, "error": msg[0] if msg else type(err).__name__})
        tick("check", shards=1)
        if (k + 1) % 100 == 0:
            log.debug("checked %d/%d shards", k + 1, len(shards))
    if text_only:
        name, cols = text_only[0]
        log.warning("%d shard(s) have no %r column and are read as text only, although they hold integer lists "
                    "(%s: %s): if those are the token ids, give --tokens-column %s", len(text_only), cfg.tokens_col,
                    name, ", ".join(cols), cols[0])
    return good, bad
