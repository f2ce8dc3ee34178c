"""Opening a user's local input file, the one way every reader does it.

* Regular files only: a FIFO, a character device (``/dev/zero``), a socket or a block device is refused at
  once with ``UserError("PATH: not a regular file (a FIFO)")``; nothing is opened that could block or never
  end. The check is made on the open descriptor (``O_NONBLOCK`` so opening a FIFO cannot block), not only
  on the name.
* OS errors (missing, permission denied, a directory, I/O errors) become one-line :class:`UserError` s naming
  the file, never a traceback.
* ``.gz`` and ``.zst`` content (recognised by its magic bytes, not its name) is decompressed as a stream in
  bounded memory: every gzip member and every zstd frame (skippable frames included) is read, and a stream
  that is truncated or corrupt raises ``UserError("PATH: truncated zstd stream ...")``: never a silent prefix.

May import: :mod:`spike_audit.pipelines.errors` only (shared by the ``logs`` and ``shards`` packages).
"""

from __future__ import annotations

import errno
import gzip
import os
import stat
import zlib
from typing import BinaryIO

import numpy as np

from spike_audit.pipelines.errors import UserError


GZIP_MAGIC = b"\x1f\x8b"


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


_READ = 1 << 20


# Compressed bytes fed to the zstd decompressor per call. zstd can expand ~32,000x (RLE blocks), so small
# feeds bound the memory one call can take (8 KiB -> at most ~256 MiB) whatever the input.
_ZSTD_FEED = 8 << 10


def _kind(mode: int) -> str | None:
    """None for a regular file, else what it is."""
    if stat.S_ISREG(mode):
        return None
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a file"


def missing(path, message: str) -> UserError:
    """The error for a path that does not exist: ``message``, or, when the path is a symlink, what is wrong with
    it (a dangling symlink names its target; a symlink loop says so) instead of a plain "not found"."""
    if os.path.islink(path):
        try:
            os.stat(path)
        except OSError as err:
            if err.errno == errno.ELOOP:
                return UserError(f"{path}: a symlink loop (it resolves to itself); expected a file")
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return UserError(f"{path}: a dangling symlink (to {target!r}, which does not exist)")
    return UserError(message)


def os_error(path, err: OSError, what: str = "file") -> UserError:
    """A one-line UserError for an OS error on ``path``."""
    if isinstance(err, FileNotFoundError):
        return UserError(f"{path}: no such {what}")
    if isinstance(err, PermissionError):
        return UserError(f"{path}: permission denied")
    if isinstance(err, IsADirectoryError):
        return UserError(f"{path}: is a directory, expected a {what}")
    reason = err.strerror or str(err) or type(err).__name__
    return UserError(f"{path}: cannot read ({reason})")


def check_regular(path, what: str = "file") -> os.stat_result:
    """``os.stat`` of ``path`` (following symlinks); UserError unless it is a regular file."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise os_error(path, err, what) from None
    kind = _kind(st.st_mode)
    if kind is not None:
        raise UserError(f"{path}: not a regular file ({kind}); expected a {what}")
    return st


def open_regular(path, what: str = "file") -> BinaryIO:
    """Open a local regular file for binary reading (see the module docstring)."""
    check_regular(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise os_error(path, err, what) from None
    try:
        kind = _kind(os.fstat(fd).st_mode)  # the object opened, not the name checked before
        if kind is not None:
            raise UserError(f"{path}: not a regular file ({kind}); expected a {what}")
        return _Reader(os.fdopen(fd, "rb"), str(path))
    except BaseException:
        try:
            os.close(fd)
        except OSError:
            pass
        raise


class _Reader:
    """A binary file whose read errors are one-line UserErrors naming the file."""

    def __init__(self, fh, name: str):
        self._fh = fh
        self.name = name

    def read(self, n: int = -1) -> bytes:
        try:
            return self._fh.read(n)
        except OSError as err:
            raise os_error(self.name, err) from None

    def readinto(self, b) -> int:
        try:
            return self._fh.readinto(b)
        except OSError as err:
            raise os_error(self.name, err) from None

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._fh.seek(pos, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fh.fileno()

    @property
    def closed(self) -> bool:
        return self._fh.closed

    def close(self) -> None:
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self):
        return iter(self._fh)


def compression_of(head: bytes) -> str | None:
    """``'gzip'``, ``'zstd'`` or None from a stream's first bytes."""
    if head[:2] == GZIP_MAGIC:
        return "gzip"
    if head[:4] == ZSTD_MAGIC or (len(head) >= 4 and head[1:4] == b"\x2a\x4d\x18" and head[0] & 0xF0 == 0x50):
        return "zstd"  # a zstd frame or a skippable frame (pzstd / seekable zstd start with one)
    return None


class _Gzip:
    def __init__(self, raw, name: str):
        self._raw = raw
        self.name = name
        self._gz = gzip.GzipFile(fileobj=raw, mode="rb")

    def read(self, n: int = -1) -> bytes:
        try:
            return self._gz.read(n)
        except EOFError:
            raise UserError(f"{self.name}: truncated gzip stream (the file ends before the end-of-stream "
                            f"marker); expected a complete .gz file") from None
        except (OSError, zlib.error) as err:
            raise UserError(f"{self.name}: corrupt gzip stream ({err}); expected a valid .gz file") from None

    def close(self) -> None:
        try:
            self._gz.close()
        finally:
            self._raw.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Zstd:
    """Every frame of a zstd stream, in bounded memory; a frame cut short is an error."""

    def __init__(self, raw, name: str):
        import zstandard

        self._zstd = zstandard
        self._raw = raw
        self.name = name
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = None  # decompressor of the frame in progress (None between frames)
        self._pending = memoryview(b"")  # compressed bytes not yet fed
        self._out = bytearray()
        self._done = False

    def _feed(self) -> bool:
        """Decompress some more into ``_out``; False at the clean end of the stream."""
        while True:
            if not len(self._pending):
                data = self._raw.read(_READ)
                if not data:
                    if self._obj is not None:
                        raise UserError(f"{self.name}: truncated zstd stream (the last frame is incomplete); "
                                        f"expected a complete .zst file")
                    return False
                self._pending = memoryview(data)
            if self._obj is None:
                self._obj = self._dctx.decompressobj()
            piece = self._pending[:_ZSTD_FEED]
            try:
                out = self._obj.decompress(piece)
            except self._zstd.ZstdError as err:
                raise UserError(f"{self.name}: corrupt zstd stream ({err}); expected a valid .zst file") from None
            if self._obj.eof:
                used = len(piece) - len(self._obj.unused_data)
                self._pending = self._pending[used:]
                self._obj = None
            else:
                self._pending = self._pending[len(piece):]
            if out:
                self._out += out
                return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            while self._feed():
                pass
            out, self._out = bytes(self._out), bytearray()
            return out
        while len(self._out) < n and not self._done:
            if not self._feed():
                self._done = True
        out = bytes(self._out[:n])
        del self._out[:n]
        return out

    def close(self) -> None:
        self._raw.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Peeked:
    """A stream with its first bytes already read (to sniff the compression)."""

    def __init__(self, head: bytes, raw):
        self._head = head
        self._raw = raw
        self.name = getattr(raw, "name", "")

    def read(self, n: int = -1) -> bytes:
        if self._head:
            if n is None or n < 0:
                out, self._head = self._head + self._raw.read(), b""
                return out
            out, self._head = self._head[:n], self._head[n:]
            if len(out) < n:
                out += self._raw.read(n - len(out))
            return out
        return self._raw.read(n)

    def close(self) -> None:
        self._raw.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def decompressed(raw, name: str | None = None):
    """A binary stream over ``raw`` with gzip / zstd content decompressed (detected from the first bytes)."""
    name = name or str(getattr(raw, "name", "input"))
    head = b""
    while len(head) < 4:
        more = raw.read(4 - len(head))
        if not more:
            break
        head += more
    kind = compression_of(head)
    peeked = _Peeked(head, raw)
    if kind == "gzip":
        return _Gzip(peeked, name)
    if kind == "zstd":
        return _Zstd(peeked, name)
    return peeked


def open_decompressed(path, what: str = "file"):
    """:func:`open_regular` then :func:`decompressed`."""
    raw = open_regular(path, what)
    try:
        return decompressed(raw, str(path))
    except BaseException:
        raw.close()
        raise


#: JSON's whitespace (RFC 8259): what may precede a line's first value
_JSON_WS = np.zeros(256, dtype=bool)
_JSON_WS[[9, 10, 13, 32]] = True


def first_non_object_line(stream, chunk: int = 8 << 20) -> int | None:
    """1-based number of the first non-blank line of a JSONL stream whose first non-whitespace byte is not ``{``,
    or None (a UTF-8 byte-order mark at the very start is allowed). Vectorised per chunk of ``chunk`` bytes.

    Arrow's JSON reader (pyarrow 25) crashes the process (a segmentation fault) when a block it parses starts
    with the value ``null``, and its blocks start at line starts, so a line holding ``null`` anywhere in a
    streamed file can kill a worker: readers hand Arrow only streams of which this returns None."""
    line_no, pending = 1, True
    head = b""
    while len(head) < 3:  # the first three bytes, for the byte-order mark
        more = stream.read(max(1, chunk))
        if not more:
            break
        head += more
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:]
    while True:
        b, head = (head, b"") if head else (stream.read(chunk), b"")
        if not b:
            return None
        a = np.frombuffer(b, dtype=np.uint8)
        nl = np.flatnonzero(a == 10)
        starts = np.concatenate([[0], nl + 1])
        ends = np.concatenate([nl, [len(a)]])
        first = _first_non_ws(a, starts, ends)
        seen = first < ends  # the line has a non-whitespace byte in this chunk
        check = seen.copy()
        check[0] &= pending  # the chunk's first piece continues a line whose first byte was already checked
        bad = check & (a[np.minimum(first, len(a) - 1)] != ord("{"))
        if bad.any():
            return line_no + int(np.argmax(bad))
        pending = not seen[-1] and (pending or len(nl) > 0)
        line_no += len(nl)


def _first_non_ws(a: np.ndarray, starts: np.ndarray, ends: np.ndarray, steps: int = 16) -> np.ndarray:
    """Per line ``[start, end)`` of ``a``: the position of its first non-whitespace byte, or ``end``. Vectorised over
    the lines' starts (most lines start with their first value): a few steps forward for lines that start with
    whitespace, then a search of only the lines still in whitespace (never an index of every byte)."""
    pos = starts.copy()
    for _ in range(steps):
        live = np.flatnonzero(pos < ends)
        live = live[_JSON_WS[a[pos[live]]]]
        if not len(live):
            return pos
        pos[live] += 1
    for i in np.flatnonzero((pos < ends) & _JSON_WS[a[np.minimum(pos, len(a) - 1)]]).tolist():  # long indents only
        nz = np.flatnonzero(~_JSON_WS[a[pos[i]:ends[i]]])
        pos[i] = pos[i] + nz[0] if len(nz) else ends[i]
    return pos
