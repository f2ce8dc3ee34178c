"""Token files: ``.npy`` (with a NumPy header), raw token memmaps (``.bin``, header-less ``.npy``; the modded-nanogpt /
llm.c 256 x int32 header is detected and skipped) and Megatron ``X.bin`` + ``X.idx`` (``MMIDIDX``) indexed datasets."""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
import numpy as np

from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.shards.base import ShardReader
from spike_audit.pipelines.shards.paths import _exists, _memmap, _open, _size, is_url
from spike_audit.pipelines.shards.rows import RowDef
from spike_audit.pipelines.shards.slices import _batch, _list_array, check_token_ids, coalesce, expand_rows


log = logging.getLogger(__name__)


MODDED_MAGIC = 20240520


MODDED_HEADER_BYTES = 256 * 4


# llm.c's data_common.HEADERS_INFO: (magic, version) -> token dtype. modded-nanogpt uses the first.
_HEADER_DTYPES = {(20240520, 1): np.dtype(np.uint16), (20240801, 7): np.dtype(np.uint32)}


_HEADER_MAGICS = {m for m, _ in _HEADER_DTYPES}


MEGATRON_MAGIC = b"MMIDIDX\x00\x00"


# Megatron-LM's DType codes in the .idx header.
MEGATRON_DTYPES = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}


_NPY_MAGIC = b"\x93NUMPY"


@dataclass
class TokenFile:
    """A flat array of tokens at byte ``offset`` of ``path`` (raw memmap, .npy body, Megatron .bin)."""

    path: str
    offset: int
    dtype: np.dtype
    n_tokens: int

    def gather(self, slices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of each ``[start, end)`` slice as (values, offsets), reading only those ranges."""
        lengths = slices[:, 1] - slices[:, 0]
        offsets = np.zeros(len(slices) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if offsets[-1] == 0:
            return np.zeros(0, self.dtype), offsets
        if not is_url(self.path):
            mm = _memmap(self.path, self.dtype, self.offset, (self.n_tokens,))
            values = np.asarray(mm[expand_rows(slices)])
            del mm
            return values, offsets
        # Remote: one ranged read per coalesced range, then a vectorised gather from the buffer.
        ranges = coalesce(slices)
        size = self.dtype.itemsize
        parts = []
        with _open(self.path) as f:
            for a, b in ranges:
                f.seek(self.offset + int(a) * size)
                parts.append(np.frombuffer(f.read(int(b - a) * size), dtype=self.dtype))
        buf = np.concatenate(parts)
        range_len = ranges[:, 1] - ranges[:, 0]
        buf_start = np.concatenate([[0], np.cumsum(range_len)[:-1]])
        which = np.searchsorted(ranges[:, 0], slices[:, 0], side="right") - 1
        local = slices.copy()
        local[:, 0] = slices[:, 0] - ranges[which, 0] + buf_start[which]
        local[:, 1] = local[:, 0] + lengths
        return buf[expand_rows(local)], offsets

    def read_range(self, start: int, end: int) -> np.ndarray:
        """Tokens ``[start, end)`` as one array (a memmap slice locally, one ranged read for a URL)."""
        start, end = max(0, int(start)), min(self.n_tokens, int(end))
        if end <= start:
            return np.zeros(0, self.dtype)
        if not is_url(self.path):
            mm = _memmap(self.path, self.dtype, self.offset, (self.n_tokens,))
            out = np.array(mm[start:end])
            del mm
            return out
        size = self.dtype.itemsize
        with _open(self.path) as f:
            f.seek(self.offset + start * size)
            return np.frombuffer(f.read((end - start) * size), dtype=self.dtype)


#: tokens scanned at a time when looking for EOS tokens (bounded memory: one block, 32 MiB of uint16)
DOC_SCAN_BLOCK = 1 << 24


def eos_positions(tf: TokenFile, eos_id: int, block: int = DOC_SCAN_BLOCK):
    """Absolute positions of ``eos_id`` in the file, one array per block scanned (vectorised)."""
    for a in range(0, tf.n_tokens, block):
        vals = tf.read_range(a, a + block)
        yield np.flatnonzero(vals == eos_id).astype(np.int64) + a


def document_bounds(tf: TokenFile, eos_id: int, max_docs: int | None = None) -> tuple[np.ndarray, bool]:
    """Token offsets of EOS-delimited documents: row ``i`` is ``[b[i], b[i + 1])``, each ending in its EOS
    (tokens after the last EOS are one more row); ``n_docs + 1`` int64. One pass over the file, or only as
    far as the first ``max_docs`` documents. Returns ``(b, complete)``."""
    if max_docs is not None and max_docs <= 0:  # nothing asked for: no scan
        return np.zeros(1, np.int64), False
    parts, found = [], 0
    for p in eos_positions(tf, eos_id):
        parts.append(p + 1)
        found += len(p)
        if max_docs is not None and found >= max_docs:
            ends = np.concatenate(parts)
            if not (len(ends) == max_docs and ends[-1] == tf.n_tokens):  # else the scan is complete anyway
                return np.concatenate([[0], ends[:max_docs]]).astype(np.int64), False
    ends = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if tf.n_tokens and (not len(ends) or ends[-1] != tf.n_tokens):
        ends = np.concatenate([ends, [tf.n_tokens]])
    return np.concatenate([[0], ends]).astype(np.int64), True


def document_chunks(tf: TokenFile, eos_id: int, rows_per_chunk: int):
    """Stream the file once and cut it into chunks of ``rows_per_chunk`` documents without holding all the
    document offsets: yields ``(row_start, row_end, token_start, token_end, is_last)``. Memory: one scan
    block plus one chunk's offsets."""
    pending = np.zeros(0, np.int64)  # document ends not yet in a chunk
    row0, tok0 = 0, 0
    held = None

    def cut(ends):
        nonlocal row0, tok0
        out = []
        for k in range(0, len(ends) - len(ends) % rows_per_chunk, rows_per_chunk):
            seg = ends[k:k + rows_per_chunk]
            out.append((row0, row0 + len(seg), tok0, int(seg[-1])))
            row0, tok0 = row0 + len(seg), int(seg[-1])
        return out, ends[len(ends) - len(ends) % rows_per_chunk:]

    for pos in eos_positions(tf, eos_id):
        done, pending = cut(np.concatenate([pending, pos + 1]))
        for c in done:
            if held is not None:
                yield (*held, False)
            held = c
    if tf.n_tokens and tok0 < tf.n_tokens and (not len(pending) or pending[-1] != tf.n_tokens):
        pending = np.concatenate([pending, [tf.n_tokens]])
    if len(pending):
        if held is not None:
            yield (*held, False)
        held = (row0, row0 + len(pending), tok0, int(pending[-1]))
    if held is not None:
        yield (*held, True)


def split_documents(values: np.ndarray, eos_id: int) -> np.ndarray:
    """List offsets of the EOS-delimited documents in ``values`` (a run of whole documents), vectorised."""
    ends = np.flatnonzero(values == eos_id) + 1
    if len(values) and (not len(ends) or ends[-1] != len(values)):
        ends = np.concatenate([ends, [len(values)]])
    return np.concatenate([[0], ends]).astype(np.int64)


def _read_modded_header(path: str) -> tuple[int, int, int] | None:
    """(magic, version, ntok) if ``path`` starts with a modded-nanogpt / llm.c header, else None."""
    with _open(path) as f:
        head = f.read(MODDED_HEADER_BYTES)
    if len(head) < MODDED_HEADER_BYTES:
        return None
    header = np.frombuffer(head, dtype="<i4")
    if int(header[0]) not in _HEADER_MAGICS:
        return None
    return int(header[0]), int(header[1]), int(header[2])


def _refuse_unknown_header(path: str, size: int) -> None:
    """A file laid out as a modded-nanogpt / llm.c shard (a 256 x int32 header whose token count, its third value,
    matches the file's size for 2- or 4-byte tokens) but with a magic we do not know: read header-less, every
    offset would shift by 512 tokens. (A header-less file matches by chance with probability about 2^-31.)"""
    if size < MODDED_HEADER_BYTES:
        return
    with _open(path) as f:
        head = np.frombuffer(f.read(12), dtype="<i4")
    magic, version, ntok = (int(x) for x in head)
    if ntok > 0 and size in (MODDED_HEADER_BYTES + 2 * ntok, MODDED_HEADER_BYTES + 4 * ntok):
        raise UserError(f"{path}: starts with a 1,024-byte token header ({ntok} tokens, which matches the file's size) "
                        f"whose magic {magic} (version {version}) is not known: expected 20240520 (modded-nanogpt, "
                        f"llm.c uint16) or 20240801 (llm.c uint32); a damaged or other trainer's shard?")


def open_token_file(path: str, dtype=None) -> TokenFile:
    """A raw token memmap, skipping a modded-nanogpt / llm.c header when present."""
    size = _size(path)
    hdr = _read_modded_header(path)
    if hdr is not None:
        magic, version, ntok = hdr
        dt = np.dtype(dtype) if dtype is not None else _HEADER_DTYPES.get((magic, version))
        if dt is None:
            raise UserError(f"{path}: token header magic {magic} version {version} is not known (expected "
                            f"20240520/1 = uint16 or 20240801/7 = uint32); pass a dtype")
        expected = MODDED_HEADER_BYTES + ntok * dt.itemsize
        if size != expected:
            raise UserError(f"{path}: header says {ntok} tokens ({expected} bytes with the header), "
                            f"file has {size} bytes")
        return TokenFile(path, MODDED_HEADER_BYTES, dt, ntok)
    _refuse_unknown_header(path, size)
    dt = np.dtype(dtype) if dtype is not None else np.dtype(np.uint16)
    if size % dt.itemsize:  # a writer killed mid-token, or another dtype: never read a silent prefix
        raise UserError(f"{path}: {size} bytes is not a whole number of {dt.name} tokens ({dt.itemsize} bytes each): "
                        f"truncated, or written with another dtype (--dtype)")
    return TokenFile(path, 0, dt, size // dt.itemsize)


def _read_npy_header(path: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    with _open(path) as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dt = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dt = np.lib.format.read_array_header_2_0(f)
        except Exception as err:  # numpy parses the header with ast/tokenize: anything can come out of garbage
            raise UserError(f"{path}: not a readable .npy file ({str(err).splitlines()[0][:200] if str(err) else type(err).__name__})") from None
        return shape, fortran, dt, f.tell()


@dataclass
class MegatronIndex:
    """The arrays of a Megatron ``.idx`` file (``MMIDIDX`` format, version 1)."""

    dtype: np.dtype
    sequence_lengths: np.ndarray  # int32 per sequence
    sequence_pointers: np.ndarray  # int64 byte offset per sequence into the .bin
    document_indices: np.ndarray  # int64, sequence-index boundaries of documents


def read_megatron_index(idx_path: str) -> MegatronIndex:
    with _open(idx_path) as f:
        head = f.read(9 + 8 + 1 + 8 + 8)
    if head[:9] != MEGATRON_MAGIC or len(head) < 34:
        raise UserError(f"{idx_path}: not a Megatron index (expected header {MEGATRON_MAGIC!r}, got {head[:9]!r})")
    (version,) = struct.unpack("<Q", head[9:17])
    (code,) = struct.unpack("<B", head[17:18])
    seq_count, doc_count = struct.unpack("<QQ", head[18:34])
    if version != 1:
        raise UserError(f"{idx_path}: Megatron index version {version} is not supported (expected 1)")
    if code not in MEGATRON_DTYPES:
        raise UserError(f"{idx_path}: unknown Megatron dtype code {code} (expected 1-8)")
    if np.dtype(MEGATRON_DTYPES[code]).kind not in "iu":
        raise UserError(f"{idx_path}: Megatron dtype code {code} is {np.dtype(MEGATRON_DTYPES[code]).name}, expected "
                        f"integer token ids (codes 1-5, 8)")
    off = 34
    need = off + seq_count * 12 + doc_count * 8
    size = _size(idx_path)
    if size < need:
        raise UserError(f"{idx_path}: the index says {seq_count} sequences and {doc_count} documents ({need} bytes), "
                        f"the file has {size} bytes")
    if is_url(idx_path):
        with _open(idx_path) as f:
            f.seek(off)
            body = f.read(seq_count * 12 + doc_count * 8)
        lengths = np.frombuffer(body, "<i4", seq_count, 0)
        pointers = np.frombuffer(body, "<i8", seq_count, seq_count * 4)
        docs = np.frombuffer(body, "<i8", doc_count, seq_count * 12)
    else:
        lengths = _memmap(idx_path, "<i4", off, (seq_count,)) if seq_count else np.zeros(0, "<i4")
        pointers = _memmap(idx_path, "<i8", off + seq_count * 4, (seq_count,)) if seq_count else np.zeros(0, "<i8")
        docs = _memmap(idx_path, "<i8", off + seq_count * 12, (doc_count,)) if doc_count else np.zeros(0, "<i8")
    return MegatronIndex(MEGATRON_DTYPES[code], lengths, pointers, docs)


def megatron_paths(path: str) -> tuple[str, str]:
    """(bin, idx) from either file of the pair or their common prefix."""
    p = str(path)
    if p.endswith(".bin") or p.endswith(".idx"):
        p = p[:-4]
    return p + ".bin", p + ".idx"


class FlatReader(ShardReader):
    """Flat token files: raw/modded .bin, header-less .npy memmaps, .npy (1-D or 2-D). A 1-D file has rows
    only under a row definition (:mod:`pipelines.shards.rows`): fixed windows or EOS-delimited documents."""

    def __init__(self, path, name, token_file: TokenFile, row_width: int | None = None, fmt="bin",
                 rows: RowDef | None = None):
        super().__init__(path, name)
        self.tf = token_file
        self.row_width = row_width  # 2-D .npy: tokens per row
        self.fmt = fmt
        if rows is not None and row_width:
            if rows.kind == "windows" and rows.seq_len != row_width:
                raise UserError(f"{name}: a 2-D .npy of rows of {row_width} tokens, but rows are asked as "
                                f"{rows.describe()}")
            if rows.kind == "documents":
                raise UserError(f"{name}: a 2-D .npy has rows of its own ({row_width} tokens); rows as "
                                f"{rows.describe()} do not apply to it")
            rows = None
        if rows is not None and rows.kind == "idx" and fmt != "megatron":
            raise UserError(f"{name}: rows as Megatron .idx sequences, but there is no {megatron_paths(path)[1]} "
                            f"next to it")
        self.rows = rows
        self._bounds, self._complete = None, False
        self.units = ("row", "token") if (row_width or rows is not None) else ("token",)

    def _doc_bounds(self, need: int | None = None) -> np.ndarray:
        """Document offsets: all of them, or at least the first ``need`` documents' (a scan that stops early)."""
        have = None if self._bounds is None else len(self._bounds) - 1
        if not self._complete and (have is None or need is None or have < need):
            log.debug("%s: scanning %d tokens for EOS id %d", self.name, self.tf.n_tokens, self.rows.eos_id)
            self._bounds, self._complete = document_bounds(self.tf, self.rows.eos_id, need)
        return self._bounds

    def length(self, unit="row"):
        self._unit_check(unit)
        if unit == "token":
            return self.tf.n_tokens
        if self.row_width:
            return self.tf.n_tokens // self.row_width
        if self.rows.kind == "windows":
            return self.tf.n_tokens // self.rows.seq_len
        return len(self._doc_bounds()) - 1

    def _limit(self, unit, slices):
        if unit == "row" and not self.row_width and self.rows is not None and self.rows.kind == "documents" \
                and getattr(self, "own_rows", False) is False and len(slices):
            need = int(slices[:, 1].max())
            b = self._doc_bounds(need)
            return len(b) - 1
        return self.length(unit)

    def _row_slices(self, rows):
        width = self.row_width or (self.rows.seq_len if self.rows.kind == "windows" else None)
        if width:
            return np.stack([rows * width, (rows + 1) * width], axis=1)
        b = self._doc_bounds(int(rows.max()) + 1 if len(rows) else 0)
        return np.stack([b[rows], b[rows + 1]], axis=1)

    def _read_rows(self, rows):
        values, offsets = self.tf.gather(self._row_slices(rows))
        check_token_ids(values, offsets, lambda i: self.where(int(rows[i])))
        return _list_array(values, offsets), None

    def _read_tokens(self, slices):
        values, offsets = self.tf.gather(slices)
        check_token_ids(values, offsets, lambda i: f"{self.name}: tokens [{int(slices[i, 0])}, {int(slices[i, 1])})")
        return _batch(_list_array(values, offsets), None, self.name, slices[:, 0], slices[:, 1], "token")


class MegatronReader(FlatReader):
    """Megatron ``.bin``/``.idx``: ``row`` = sequence index, ``token`` = token offset in the ``.bin``."""

    def __init__(self, path, name, rows: RowDef | None = None):
        bin_path, idx_path = megatron_paths(path)
        if not _exists(idx_path):
            raise UserError(f"{name}: Megatron index {idx_path} not found next to the .bin")
        if not _exists(bin_path):
            raise UserError(f"{name}: Megatron data file {bin_path} not found next to the .idx")
        self.index = read_megatron_index(idx_path)
        dt = np.dtype(self.index.dtype)
        size = _size(bin_path)
        if size % dt.itemsize:  # as for a raw .bin: never read a silent prefix
            raise UserError(f"{name}: {bin_path}: {size} bytes is not a whole number of {dt.name} tokens "
                            f"({dt.itemsize} bytes each, as its .idx says): truncated, or not this index's data")
        tf = TokenFile(bin_path, 0, dt, size // dt.itemsize)
        # windows / documents asked for explicitly apply to the .bin's tokens; otherwise rows are the sequences
        super().__init__(bin_path, name, tf, None, fmt="megatron", rows=rows)
        self.own_rows = rows is None or rows.kind == "idx"
        self.units = ("row", "token")

    def length(self, unit="row"):
        if not self.own_rows:
            return super().length(unit)
        self._unit_check(unit)
        return self.tf.n_tokens if unit == "token" else len(self.index.sequence_lengths)

    def _row_slices(self, rows):
        if not self.own_rows:
            return super()._row_slices(rows)
        ptr = np.asarray(self.index.sequence_pointers)[rows].astype(np.int64)
        odd = np.flatnonzero(ptr % self.tf.dtype.itemsize)
        if len(odd):  # a byte offset inside a token: floored, it read other tokens than the index's
            i = int(odd[0])
            raise UserError(f"{self.where(int(rows[i]))}: the index puts this sequence at byte {int(ptr[i])}, not a "
                            f"multiple of the {self.tf.dtype.itemsize}-byte {self.tf.dtype.name} tokens of "
                            f"{self.tf.path} (a damaged index, or another dtype's)")
        start = ptr // self.tf.dtype.itemsize
        length = np.asarray(self.index.sequence_lengths)[rows].astype(np.int64)
        out = np.stack([start, start + length], axis=1)
        bad = np.flatnonzero((length < 0) | (start < 0) | (out[:, 1] > self.tf.n_tokens))
        if len(bad):
            i = int(bad[0])
            raise UserError(f"{self.where(int(rows[i]))}: the index puts this sequence at tokens [{out[i, 0]}, "
                            f"{out[i, 1]}), outside the {self.tf.n_tokens} tokens of {self.tf.path}")
        return out
