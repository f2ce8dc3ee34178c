"""Text signals (where a text column exists): Gopher repetition, character classes, compression.

Gopher repetition follows the MassiveText/Gopher paper (Rae et al. 2021, Table A1) with the exact
arithmetic of datatrove's ``GopherRepetitionFilter`` (the filter thresholds aside: here the raw
fractions are reported), except that words are whitespace-separated (``str.split()``) instead of a
language-specific word tokenizer. Per document with text ``T`` (``|.|`` = length in characters):

* paragraphs = ``re.split(r"\\n{2,}", T.strip())``; lines = ``re.split(r"\\n+", T)``. An element is
  a duplicate when an equal element occurred earlier in the document.
  ``gopher_dup_para_frac`` = duplicate paragraphs / paragraphs, ``gopher_dup_para_char_frac`` =
  characters of duplicate paragraphs / ``|T|``; same for lines (``gopher_dup_line_frac``,
  ``gopher_dup_line_char_frac``).
* ``gopher_top{n}_char_frac`` (n = 2, 3, 4): the most frequent word n-gram (words joined by one
  space; ties go to the n-gram seen first) - its length times its count, over ``|T|``. 0 when the
  document has fewer than n words.
* ``gopher_dup{n}_char_frac`` (n = 5..10): scan word n-grams (words concatenated without spaces)
  left to right; an n-gram seen before adds its length and the scan jumps n words, otherwise it is
  remembered and the scan moves one word. Sum of lengths over ``|T|``.

Other per-document signals:

* ``non_alnum_frac``: characters that are neither letters (``\\p{L}``), numbers (``\\p{N}``) nor
  whitespace (RE2's ``\\s`` = ``[\\t\\n\\f\\r ]``), over all characters.
* ``mean_word_len``: non-whitespace characters / words, both with RE2's ``\\s``: a word is a
  maximal run of characters other than ``[\\t\\n\\f\\r ]`` (the regex ``\\S+``).
* ``compression_ratio``: UTF-8 bytes / zlib (level 6) compressed bytes; higher means more redundant.

Every signal reads at most the first ``MAX_DOC_CHARS`` (100,000) characters of a document.

Batch signals are means over documents with non-empty text (empty or missing text is skipped; a
document without words has ``mean_word_len`` skipped). NaN when no document has text.

Everything is computed for whole groups of documents at once (about ``CHUNK_BYTES`` of text per
group; no Python loop over documents or words except one zlib call per document), with values
identical to the per-document definitions above (``tests/test_auditors_text.py`` keeps the plain
per-document implementation as the reference and compares bit for bit):

* lines and paragraphs are the byte ranges between runs of newlines (found with numpy; the strip
  of ``T.strip()`` by Arrow's trim kernels, whose whitespace is Python's ``str.isspace``), read in
  place as ``binary_view`` arrays; Arrow's hash table (``dictionary_encode``, exact) gives equal
  pieces equal ids, and a piece is a duplicate when the previous piece with its id is in the same
  document.
* words come from Arrow's ``utf8_split_whitespace`` (``str.split()`` exactly, empty pieces
  dropped); their bytes are contiguous, so the n-gram at word ``i`` (words concatenated) is the
  byte range from the start of word ``i`` to the start of word ``i + n``.
* word tuples (``top{n}``; joined by spaces, equal strings are equal tuples) get exact ids level by
  level from int64 keys (id of the (n-1)-word tuple, id of the last word); a tuple can only repeat
  where both of its (n-1)-word tuples repeat, so each level only looks at those positions (and the
  2-grams only at those a 64-bit hash filter keeps).
* concatenated n-grams (``dup{n}``; equal strings may split differently into words) that may
  repeat in their document are found with a 64-bit polynomial hash of their bytes, composed from
  per-word hashes, and two bucket-count filters. The hashes only filter: the candidates'
  identities are decided exactly by Arrow's hash table on their bytes (``binary_view`` arrays
  pointing into the word bytes, no copy).
* ``top{n}``: per document, the repeated n-gram with the highest count, ties to the lowest first
  position (ids are numbered in order of first appearance); the first n-gram when none repeats.
* ``dup{n}`` (all n at once): the scan is a fixed point over the repeated positions. Given which
  positions the scan visits, a position is a duplicate when a visited position before it holds the
  same n-gram; given the duplicates, the scan's jumps are a chain (the first duplicate, then the
  first duplicate at least n words further, ...) found with searchsorted and binary lifting, and
  the chain says which positions are skipped. A position depends only on earlier ones, so each
  round is right on a longer prefix of every document; iterating until the first visited position
  of every n-gram of a document no longer changes gives exactly the sequential scan (real text:
  1-7 rounds, each on the documents still changing). Long documents are cut into windows of
  ``SCAN_WINDOW`` positions solved one after the other (state carried over), which keeps the rounds
  few on long repetitive documents.
* character classes are counted on the UTF-8 bytes with numpy comparisons; non-ASCII characters
  are decoded to code points and classified by RE2 itself (``[^\\p{L}\\p{N}]``), once per block of
  256 code points per process.

Arrow's ``utf8_split_whitespace`` (pyarrow 25) reads one character past a string that ends in
whitespace; the text is therefore copied into a buffer with zero padding after the last string
(otherwise the last word of a batch depends on uninitialised memory).
"""

from __future__ import annotations

import functools

import zlib
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spike_audit.auditors.base import TokenBatch

TOP_NS = (2, 3, 4)
DUP_NS = (5, 6, 7, 8, 9, 10)

SIGNALS = {
    "gopher_dup_line_frac": "Gopher: share of lines (split on runs of newlines) equal to an earlier line.",
    "gopher_dup_para_frac": "Gopher: share of paragraphs (split on 2+ newlines) equal to an earlier paragraph.",
    "gopher_dup_line_char_frac": "Gopher: characters in duplicate lines / characters.",
    "gopher_dup_para_char_frac": "Gopher: characters in duplicate paragraphs / characters.",
    **{f"gopher_top{n}_char_frac": f"Gopher: characters covered by the most frequent word {n}-gram "
       f"(length x count) / characters." for n in TOP_NS},
    **{f"gopher_dup{n}_char_frac": f"Gopher: characters in repeated word {n}-grams (datatrove scan) / characters."
       for n in DUP_NS},
    "non_alnum_frac": "Characters that are neither letters, numbers nor whitespace / characters.",
    "mean_word_len": "Non-whitespace characters / whitespace-separated words.",
    "compression_ratio": "UTF-8 bytes / zlib level-6 compressed bytes.",
}

_GOPHER = [k for k in SIGNALS if k.startswith("gopher_")] + ["compression_ratio"]
_BIG = np.iinfo(np.int64).max
_M64 = (1 << 64) - 1
_KEY_LIMIT = 2**62  # int64 keys (document, word, word) are used below this product, dense codes above


def _re2_space(data: np.ndarray) -> np.ndarray:
    """Bytes in RE2's ``\\s`` = ``[\\t\\n\\f\\r ]`` (ASCII only: UTF-8 lead and continuation bytes
    are never in it). Comparisons, not a lookup table: several times faster on byte arrays."""
    return (data == 32) | ((data - np.uint8(9) < 5) & (data != 11))


# ----------------------------------------------------------------------------- small helpers


#: Text signals read at most this many characters of a document (its beginning). Packed training
#: rows are far shorter; the bound keeps a pathological multi-MB run of repeats in a raw-text shard
#: from taking hundreds of MB to analyse (about 580x the text for pure repeats).
MAX_DOC_CHARS = 100_000


def _text_array(texts) -> pa.LargeStringArray:
    """The texts as a null-free ``large_string`` array (missing text becomes empty, documents cut
    to ``MAX_DOC_CHARS`` characters), with its own copy of the bytes followed by zero padding.

    The padding is needed for exactness: Arrow's ``utf8_split_whitespace`` (pyarrow 25) decodes one
    character past the end of a string that ends in whitespace, and when the bytes after the last
    string of the buffer are not valid UTF-8 (uninitialised padding) it keeps the trailing
    whitespace inside the last word."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks() if texts.num_chunks != 1 else texts.chunk(0)
    arr = texts if isinstance(texts, pa.Array) else pa.array(texts, type=pa.large_string())
    if arr.type != pa.large_string():
        arr = arr.cast(pa.large_string())
    if arr.null_count:
        arr = pc.fill_null(arr, "")
    if len(arr) and pc.max(pc.utf8_length(arr)).as_py() > MAX_DOC_CHARS:
        arr = pc.utf8_slice_codeunits(arr, 0, MAX_DOC_CHARS)
    data, off = _byte_view(arr)
    padded = np.zeros(len(data) + 16, dtype=np.uint8)
    padded[: len(data)] = data
    return pa.Array.from_buffers(pa.large_string(), len(arr), [None, pa.py_buffer(off), pa.py_buffer(padded)])


def _byte_view(arr: pa.LargeStringArray) -> tuple[np.ndarray, np.ndarray]:
    """(UTF-8 bytes of all documents, byte offsets of each document into them, from 0)."""
    off = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset: arr.offset + len(arr) + 1]
    buf = arr.buffers()[2]
    data = np.frombuffer(buf, dtype=np.uint8) if buf is not None else np.zeros(0, np.uint8)
    return data[off[0]: off[-1]], off - off[0]


def _seg_count(mask: np.ndarray, off: np.ndarray) -> np.ndarray:
    """Number of True in ``mask[off[i]:off[i+1]]`` for every segment ``i``."""
    return np.diff(np.searchsorted(np.flatnonzero(mask), off))


def _first_mask(ids: np.ndarray) -> np.ndarray:
    """True where an id (numbered in order of first appearance) appears for the first time."""
    if not len(ids):
        return np.zeros(0, dtype=bool)
    prev_max = np.empty_like(ids)
    prev_max[0] = -1
    np.maximum.accumulate(ids[:-1], out=prev_max[1:])
    return ids > prev_max


def _flat(lists: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """(flattened values, index of the document of every value) of a list array."""
    return pc.list_flatten(lists), pc.list_parent_indices(lists).to_numpy().astype(np.int64)


# ----------------------------------------------------------------------------- character classes


@functools.lru_cache(maxsize=None)
def _odd_block(block: int) -> np.ndarray:
    """Which of the 256 code points of ``block`` match RE2's ``[^\\p{L}\\p{N}]`` (a pure function of
    the block, memoised: the regex itself decides, so the Unicode tables are exactly RE2's)."""
    chars = [chr(c) if not 0xD800 <= c < 0xE000 else "." for c in range(block << 8, (block + 1) << 8)]
    return pc.count_substring_regex(pa.array(chars, pa.string()), r"[^\p{L}\p{N}]").to_numpy() > 0


def _odd_codepoints(cp: np.ndarray) -> np.ndarray:
    """Which code points match RE2's ``[^\\p{L}\\p{N}]``, looked up per block of 256 code points."""
    blocks = np.unique(cp >> 8)
    table = np.stack([_odd_block(int(b)) for b in blocks])
    return table[np.searchsorted(blocks, cp >> 8), cp & 0xFF]


def _char_classes(arr: pa.LargeStringArray, chars: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per document: characters matching ``[^\\p{L}\\p{N}\\s]``, characters matching ``\\S`` and
    matches of ``\\S+`` (RE2 classes), from the UTF-8 bytes."""
    data, off = _byte_view(arr)
    n = len(arr)
    if not len(data):
        z = np.zeros(n, dtype=np.int64)
        return z, z, z
    space = _re2_space(data)
    nonspace = chars - _seg_count(space, off)
    # a \S+ match starts at a non-space byte that follows a space byte or starts the document
    after_space = np.zeros(len(data), dtype=bool)
    np.greater(space[:-1], space[1:], out=after_space[1:])
    words = _seg_count(after_space, off)
    nonempty = off[:-1] < off[1:]
    first = off[:-1][nonempty]
    words[nonempty] += ~space[first] & ~after_space[first]
    letter = (data | np.uint8(0x20)) - np.uint8(97) < 26  # uint8 arithmetic wraps: [A-Za-z]
    digit = data - np.uint8(48) < 10  # [0-9]
    odd = _seg_count((data < 0x80) & ~letter & ~digit & ~space, off)  # ASCII [^\p{L}\p{N}\s]
    lead = np.flatnonzero(data >= 0xC0)  # first bytes of the non-ASCII characters
    if len(lead):  # decode those code points (the text is valid UTF-8) and classify them
        pad = np.zeros(len(data) + 3, dtype=np.int64)
        pad[: len(data)] = data
        b0, b1, b2, b3 = pad[lead], pad[lead + 1] & 0x3F, pad[lead + 2] & 0x3F, pad[lead + 3] & 0x3F
        cp = np.where(b0 < 0xE0, ((b0 & 0x1F) << 6) | b1,
                      np.where(b0 < 0xF0, ((b0 & 0x0F) << 12) | (b1 << 6) | b2,
                               ((b0 & 0x07) << 18) | (b1 << 12) | (b2 << 6) | b3))
        odd = odd + np.diff(np.searchsorted(lead[_odd_codepoints(np.minimum(cp, 0x10FFFF))], off))
    return odd, nonspace, words


# ----------------------------------------------------------------------------- Gopher pieces

_R = np.uint64(0x9E3779B97F4A7C15)  # odd multipliers of the 64-bit polynomial hashes (mod 2^64)
_C = np.uint64(0xBF58476D1CE4E5B9)
_D = np.uint64(0x94D049BB133111EB)
_S = (np.uint64(30), np.uint64(27), np.uint64(31))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (a bijection of uint64), vectorised."""
    x = x ^ (x >> _S[0])
    x *= _C
    x ^= x >> _S[1]
    x *= _D
    return x ^ (x >> _S[2])


def _dup_lines_paras(arr: pa.LargeStringArray) -> dict[str, np.ndarray]:
    """Per document: duplicate line and paragraph counts and characters (Gopher, datatrove).

    Lines are ``re.split(r"\\n+", T)``, paragraphs ``re.split(r"\\n{2,}", T.strip())``: both are the
    byte ranges between runs of newlines (of any length, resp. of 2+ inside the stripped text), read
    in place as ``binary_view`` arrays; equal ids (Arrow's hash table: exact) with the previous
    equal element in the same document mark the duplicates."""
    n = len(arr)
    data, off = _byte_view(arr)
    size = len(data)
    nl = np.flatnonzero(data == 10)
    nl_doc = np.searchsorted(off, nl, side="right") - 1
    brk = np.flatnonzero((nl[1:] != nl[:-1] + 1) | (nl_doc[1:] != nl_doc[:-1]))
    r_first = np.r_[0, brk + 1] if len(nl) else brk  # runs of newlines: [run_start, run_end), per document
    r_last = np.r_[brk, len(nl) - 1] if len(nl) else brk
    run_start, run_end, run_doc = nl[r_first], nl[r_last] + 1, nl_doc[r_first]
    docs = np.arange(n)
    # lines: from the document start or a run end, to the next run start or the document end
    l_start = np.insert(run_end, np.searchsorted(run_doc, docs, side="left"), off[:-1])
    l_end = np.insert(run_start, np.searchsorted(run_doc, docs, side="right"), off[1:])
    l_doc = np.insert(run_doc, np.searchsorted(run_doc, docs, side="right"), docs)
    # paragraphs: the same inside T.strip() (Python's whitespace: Arrow's trim kernels), runs of 2+
    t_start = off[1:] - pc.binary_length(pc.utf8_ltrim_whitespace(arr)).to_numpy()
    t_end = np.maximum(off[:-1] + pc.binary_length(pc.utf8_rtrim_whitespace(arr)).to_numpy(), t_start)
    sep = np.flatnonzero((run_end - run_start >= 2) & (run_start >= t_start[run_doc]) & (run_end <= t_end[run_doc]))
    p_start = np.insert(run_end[sep], np.searchsorted(run_doc[sep], docs, side="left"), t_start)
    p_end = np.insert(run_start[sep], np.searchsorted(run_doc[sep], docs, side="right"), t_end)
    p_doc = np.insert(run_doc[sep], np.searchsorted(run_doc[sep], docs, side="right"), docs)
    # lines and paragraphs together: "documents" 0..n-1 are lines, n..2n-1 paragraphs
    start, end, doc = np.r_[l_start, p_start], np.r_[l_end, p_end], np.r_[l_doc, p_doc + n]
    padded = np.zeros(size + 12, dtype=np.uint8)
    padded[:size] = data
    sid = pc.dictionary_encode(_views(pa.py_buffer(padded), padded, start, end - start)).indices.to_numpy()
    order = np.argsort(sid, kind="stable")  # equal pieces together, in document order
    a, b = order[:-1], order[1:]
    dup = b[(sid[a] == sid[b]) & (doc[a] == doc[b])]  # the previous equal piece is in the same document
    cont = np.flatnonzero((data & 0xC0) == 0x80)  # UTF-8 continuation bytes: characters = bytes - these
    chars = end[dup] - start[dup] - (np.searchsorted(cont, end[dup]) - np.searchsorted(cont, start[dup]))
    n_el = np.bincount(doc, minlength=2 * n)
    n_dup = np.bincount(doc[dup], minlength=2 * n)
    c_dup = np.bincount(doc[dup], weights=chars, minlength=2 * n)  # integers < 2^53: exact
    return {"gopher_dup_line_frac": n_dup[:n] / n_el[:n], "gopher_dup_para_frac": n_dup[n:] / n_el[n:],
            "line_chars": c_dup[:n], "para_chars": c_dup[n:]}


def _candidates(key: np.ndarray) -> np.ndarray:
    """Indices of keys that may occur more than once: a superset of the repeated keys (uint64
    keys with well-mixed high bits). Two bucket-count filters on disjoint bit ranges, with at least
    4 buckets per key each; the exact decision is left to the caller."""
    idx = None
    for shift in (0, 21):
        m = len(key) if idx is None else len(idx)
        if m < 2:
            return np.zeros(0, dtype=np.int64)
        bits = min(max(10, int(m - 1).bit_length() + 2), 21)
        k = key if idx is None else key[idx]
        bucket = ((k << np.uint64(shift)) >> np.uint64(64 - bits)).astype(np.intp)
        sel = np.flatnonzero(np.bincount(bucket, minlength=1 << bits)[bucket] >= 2)
        idx = sel if idx is None else idx[sel]
    return idx


_VIEW = np.dtype([("length", "<i4"), ("head", "<u8"), ("tail", "<u4")])  # Arrow's 16-byte binary view


def _views(buf: pa.Buffer, data: np.ndarray, start: np.ndarray, length: np.ndarray) -> pa.Array:
    """A ``binary_view`` array of the byte ranges ``[start, start + length)`` of ``buf``, without
    copying them (``data``: the bytes of ``buf`` as uint8, followed by at least 12 padding bytes).

    A view is the length, then either the bytes inline (up to 12, zero-padded) or a 4-byte prefix,
    buffer index 0 and the offset."""
    m = len(start)
    if m and int(start.max()) + int(length.max()) >= 2**31:
        raise ValueError("text: a document of 2 GiB or more (Arrow binary views address 32-bit offsets)")
    u8 = np.ndarray((len(data) - 7,), dtype="<u8", buffer=data, strides=(1,))  # unaligned 8-byte reads
    u4 = np.ndarray((len(data) - 3,), dtype="<u4", buffer=data, strides=(1,))
    head, tail = u8[start], u4[start + 8]
    short = length <= 12
    bits = np.minimum(length, 12).astype(np.uint64) * np.uint64(8)  # inline bytes, in bits
    lo_mask = np.where(bits >= 64, np.uint64(_M64), (np.uint64(1) << np.minimum(bits, 63)) - np.uint64(1))
    hi_bits = np.where(bits > 64, bits - np.uint64(64), np.uint64(0))
    hi_mask = (np.uint64(1) << hi_bits) - np.uint64(1)
    v = np.empty(m, dtype=_VIEW)
    v["length"] = length
    v["head"] = np.where(short, head & lo_mask, head & np.uint64(0xFFFFFFFF))  # long: prefix, buffer 0
    v["tail"] = np.where(short, tail & hi_mask.astype(np.uint32), start.astype(np.uint32))  # long: offset
    return pa.Array.from_buffers(pa.binary_view(), m, [None, pa.py_buffer(v), buf])


def _chain(pos: np.ndarray, doc: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Mask of the greedy chain through sorted positions, per document: the first position of each
    document, then repeatedly the first position at least ``n`` (per position) further in the same
    document."""
    m = len(pos)
    if not m:
        return np.zeros(0, dtype=bool)
    succ = np.searchsorted(pos, pos + n)
    sx = np.minimum(succ, m - 1)
    jump = np.append(np.where((succ < m) & (doc[sx] == doc), succ, m), m)  # m: the end (maps to itself)
    posx = np.append(pos, _BIG)
    tables = [jump]  # tables[l][i]: 2^l chain steps from i
    while (tables[-1][:m] != m).any():
        tables.append(tables[-1][tables[-1]])
    # binary lifting from the head of each document to the last chain position <= each position
    heads = np.flatnonzero(np.r_[True, doc[1:] != doc[:-1]])
    c = np.repeat(heads, np.diff(np.r_[heads, m]))
    for t in reversed(tables):
        nxt = t[c]
        c = np.where(posx[nxt] <= pos, nxt, c)
    return c == np.arange(m)


def _scan_window(q: np.ndarray, gid: np.ndarray, n_ids: int, scan: np.ndarray, n: np.ndarray,
                 allowed: np.ndarray, before: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The scan's events (sorted indices) and visited mask over a window of positions.

    ``q``: positions sorted by (scan, position); ``gid``: n-gram ids in ``[0, n_ids)``; ``scan``:
    one scan per (n, document); ``n`` per position; ``allowed``: not skipped by an event of an
    earlier window; ``before``: the n-gram was seen at a visited position of an earlier window.

    Fixed point of (visited positions -> first visited position of every n-gram -> duplicates ->
    chain of jumps -> visited), iterated from "every allowed position visited". A position depends
    only on earlier ones, so every round is right on a longer prefix of each scan. A scan whose
    first visited positions did not change is final (same duplicates, so same jumps); only the
    scans still changing take part in the next round."""
    done = []
    active = np.arange(len(q))  # positions of the scans still changing
    visited = allowed.copy()
    first_seen = np.full(n_ids, _BIG)  # per n-gram: first visited position in the window
    np.minimum.at(first_seen, gid[visited], q[visited])
    group_scan = np.zeros(n_ids, dtype=np.int64)
    group_scan[gid] = scan
    for _ in range(len(q) + 2):  # each round fixes at least one more position of every changing scan
        if not len(active):
            break
        qa, sa, ga = q[active], scan[active], gid[active]
        # duplicates: a visited position before with the same n-gram; then the chain of jumps
        dup = np.flatnonzero(allowed[active] & (before[active] | (qa > first_seen[ga])))
        events = active[dup[_chain(qa[dup], sa[dup], n[active][dup])]]
        # visited: allowed, and not strictly inside the n words after an event of the same scan
        e_pos, e_scan, e_end = q[events], scan[events], q[events] + n[events]
        j = np.searchsorted(e_pos, qa) - 1
        jc = np.maximum(j, 0)
        vis = allowed[active].copy()
        if len(events):
            vis &= ~((j >= 0) & (e_scan[jc] == sa) & (qa < e_end[jc]))
        visited[active] = vis
        new_first = np.full(n_ids, _BIG)
        np.minimum.at(new_first, ga[vis], qa[vis])
        changed = np.unique(group_scan[ga[new_first[ga] != first_seen[ga]]])
        final = ~np.isin(scan[events], changed)
        done.append(events[final])
        active = active[np.isin(sa, changed)]
        first_seen = new_first
    else:
        raise AssertionError("duplicate n-gram scan did not converge")  # unreachable: causal fixed point
    events = np.sort(np.concatenate(done)) if done else np.zeros(0, dtype=np.int64)
    return events, visited


#: Positions per scan handled together by the duplicate n-gram scan (see ``_scan_events``).
SCAN_WINDOW = 4096


def _scan_events(q: np.ndarray, gid: np.ndarray, qdoc: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Indices into ``q`` where datatrove's duplicate n-gram scan finds a duplicate (and jumps n words).

    ``q``: sorted word positions whose n-gram occurs at least twice in its document (the scan can
    only find duplicates there, and other n-grams never matter), ``gid``: dense n-gram ids,
    ``qdoc``: documents (one scan per document), ``n``: the n of each position's document.

    Every scan is cut into windows of ``SCAN_WINDOW`` positions; window w of all scans is solved
    at once (``_scan_window``) given the state after window w - 1: which n-grams were seen at a
    visited position, and up to where the last jump skips. The rounds of the fixed point grow with
    the number of jumps that interact, so windows keep them few on long repetitive documents."""
    m = len(q)
    if not m:
        return np.zeros(0, dtype=np.int64)
    n_ids = int(gid.max()) + 1
    first = np.flatnonzero(np.r_[True, qdoc[1:] != qdoc[:-1]])
    sizes = np.diff(np.r_[first, m])
    scan = np.repeat(np.arange(len(first)), sizes)
    if sizes.max() <= SCAN_WINDOW:  # one window (the usual case)
        return _scan_window(q, gid, n_ids, scan, n, np.ones(m, dtype=bool), np.zeros(m, dtype=bool))[0]
    seen = np.full(n_ids, _BIG)  # per n-gram: first visited position so far
    skip_end = np.zeros(len(first), dtype=np.int64)  # per scan: positions before this are skipped or done
    out = []
    for lo in range(0, int(sizes.max()), SCAN_WINDOW):
        big = sizes > lo
        lens = np.minimum(sizes[big] - lo, SCAN_WINDOW)
        w = np.repeat(first[big] + lo - np.cumsum(lens) + lens, lens) + np.arange(lens.sum())
        qw, gw, sw = q[w], gid[w], scan[w]
        ids, local = np.unique(gw, return_inverse=True)
        ev, vis = _scan_window(qw, local.reshape(-1), len(ids), sw, n[w], qw >= skip_end[sw], seen[gw] < qw)
        out.append(w[ev])
        np.minimum.at(seen, gw[vis], qw[vis])
        np.maximum.at(skip_end, sw[ev], qw[ev] + n[w][ev])
    return np.sort(np.concatenate(out))


def _word_poly(words: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Per string: the polynomial hash sum_t (byte_t + 1) R^t over its UTF-8 bytes (mod 2^64), and
    R^(byte length), so that the hash of a concatenation composes: h(ab) = h(a) + R^|a| h(b)."""
    data, off = _byte_view(words)
    blen = np.diff(off)
    rpow = np.full(int(blen.max(initial=0)) + 1, _R, dtype=np.uint64)
    rpow[0] = 1
    np.multiply.accumulate(rpow, out=rpow)
    t = np.arange(len(data), dtype=np.int64) - np.repeat(off[:-1], blen)  # byte index inside its word
    term = (data.astype(np.uint64) + np.uint64(1)) * rpow[t]
    cs = np.zeros(len(data) + 1, dtype=np.uint64)
    np.cumsum(term, out=cs[1:])
    return cs[off[1:]] - cs[off[:-1]], rpow[blen]


def _word_signals(arr: pa.LargeStringArray, out: dict[str, np.ndarray]) -> None:
    """Top n-gram and duplicate n-gram character counts (not yet divided by |T|) into ``out``.

    Word tuples (top n-grams, joined by spaces: equal strings = equal tuples) get exact ids level by
    level from int64 keys (id of the (n-1)-gram, id of the last word). Concatenated n-grams (dup
    n-grams: equal strings may split differently into words) that may repeat in their document
    are found with 64-bit hashes (a filter: equal strings have equal hashes); their identity is then
    decided exactly by Arrow's hash table on their bytes (``binary_view`` arrays pointing into the
    word bytes, no copy)."""
    n_docs = len(arr)
    flat, parent = _flat(pc.utf8_split_whitespace(arr))
    enc = pc.dictionary_encode(flat)
    wid = enc.indices.to_numpy().astype(np.int64)
    dwords = enc.dictionary
    dbytes = pc.binary_length(dwords).to_numpy()
    keep = dbytes[wid] > 0  # Arrow yields empty strings at leading/trailing whitespace; str.split() does not
    wid, wdoc = wid[keep], parent[keep]
    w = len(wid)
    wlen = pc.utf8_length(dwords).to_numpy().astype(np.int64)[wid]
    n_words = np.bincount(wdoc, minlength=n_docs)
    first_word = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum(n_words, out=first_word[1:])
    cs = np.zeros(w + 1, dtype=np.int64)  # characters of words i..i+n-1: cs[i + n] - cs[i]
    np.cumsum(wlen, out=cs[1:])
    # word bytes, contiguous in Arrow's string layout: the n-gram at i is bytes [start[i], start[i + n])
    fdata, foff = _byte_view(flat)
    start = np.append(foff[:-1][keep], foff[-1])
    wdata = np.zeros(len(fdata) + 12, dtype=np.uint8)
    wdata[: len(fdata)] = fdata
    wbuf = pa.py_buffer(wdata)
    # exact identity of word tuples: int64 keys (the (n-1)-gram's id, the last word's id)
    n_words_d = len(dwords)
    base = wdoc * n_words_d + wid  # (document, word)
    if n_docs * n_words_d * n_words_d >= _KEY_LIMIT:  # keep base * n_words_d + word within int64
        base = pc.dictionary_encode(pa.array(base)).indices.to_numpy().astype(np.int64)
    doc_mix = _mix(wdoc.astype(np.uint64) * _R)  # per word: its document, mixed
    t1 = _mix(wid.astype(np.uint64) + _D)  # per word: a random-looking 64-bit value
    h_d, p_d = _word_poly(dwords)
    h1, p1 = h_d[wid], p_d[wid]  # per word: byte polynomial hash, R^bytes
    poly, pw = h1, p1  # n-gram at each position: concatenation hash, R^bytes
    ids = rep = None  # (n-1)-word tuple at each position: exact id (-1: not repeated), repeated?
    dup_cand = []  # per n of DUP_NS: positions whose n-gram string may repeat in its document
    for n in range(2, max(DUP_NS) + 1):
        m = max(w - n + 1, 0)
        inside = wdoc[:m] == wdoc[n - 1:]  # n-grams within one document
        if n in TOP_NS:
            if rep is None:  # 2-grams: a tuple hash filters the candidates
                cand = _candidates((t1[:m] * _C + t1[1:]) ^ doc_mix[:m])
                cand = cand[inside[cand]]
                key = base[cand] * n_words_d + wid[cand + 1]
            else:  # a word tuple repeats only where both of its (n-1)-word tuples repeat
                cand = np.flatnonzero(rep[:m] & rep[1:m + 1] & inside)
                key = ids[cand] * n_words_d + wid[cand + n - 1]
            sid = pc.dictionary_encode(pa.array(key, type=pa.int64())).indices.to_numpy().astype(np.int64)
            cnt = np.bincount(sid)
            ids = np.full(m, -1, dtype=np.int64)
            ids[cand] = sid
            rep = np.zeros(m, dtype=bool)
            rep[cand[cnt[sid] >= 2]] = True
            # most frequent n-gram per document, ties to the first seen; none repeated: the first one
            val = np.where(n_words >= n, cs[np.minimum(first_word[:-1] + n, w)] - cs[first_word[:-1]] + n - 1, 0)
            first = _first_mask(sid)  # ids are numbered in order of first appearance
            fpos, c = cand[first], cnt[sid[first]]
            fpos, c = fpos[c >= 2], c[c >= 2]
            if len(fpos):
                d = wdoc[fpos]
                o = np.lexsort((fpos, -c, d))
                b = o[np.r_[True, d[o][1:] != d[o][:-1]]]
                val[d[b]] = (cs[fpos[b] + n] - cs[fpos[b]] + n - 1) * c[b]
            out[f"gopher_top{n}_char_frac"] = val
        poly = poly[:m] + h1[n - 1:] * pw[:m]
        pw = pw[:m] * p1[n - 1:]
        if n in DUP_NS:
            cand = _candidates(poly ^ doc_mix[:m])
            dup_cand.append(cand[inside[cand]])
    # duplicate n-grams, all n at once: exact ids of the candidates' bytes, grouped by (n, document)
    ns = np.repeat(np.array(DUP_NS, dtype=np.int64), [len(c) for c in dup_cand])
    cand = np.concatenate(dup_cand)
    s = start[cand]
    sid = pc.dictionary_encode(_views(wbuf, wdata, s, start[cand + ns] - s)).indices.to_numpy().astype(np.int64)
    sdoc = (ns - DUP_NS[0]) * n_docs + wdoc[cand]  # one scan per (n, document)
    gid = pc.dictionary_encode(pa.array(sdoc * (int(sid.max(initial=0)) + 1) + sid)).indices.to_numpy()
    gid = gid.astype(np.int64)
    rep = np.flatnonzero(np.bincount(gid)[gid] >= 2)
    q = cand[rep] + (ns[rep] - DUP_NS[0]) * (w + 1)  # positions of different n kept apart and sorted
    e = rep[_scan_events(q, gid[rep], sdoc[rep], ns[rep])]
    e_n, e_pos = ns[e], cand[e]
    chars = np.bincount(sdoc[e], weights=cs[e_pos + e_n] - cs[e_pos], minlength=len(DUP_NS) * n_docs)
    for i, n in enumerate(DUP_NS):
        out[f"gopher_dup{n}_char_frac"] = chars[i * n_docs: (i + 1) * n_docs]


def _gopher_batch(arr: pa.LargeStringArray, size: np.ndarray, has: np.ndarray) -> dict[str, np.ndarray]:
    """Gopher fractions and compression ratio of every document (meaningless where ``has`` is False:
    empty documents, skipped by zlib)."""
    out: dict[str, np.ndarray] = {}
    lp = _dup_lines_paras(arr)
    out["gopher_dup_para_frac"] = lp["gopher_dup_para_frac"]
    out["gopher_dup_para_char_frac"] = lp["para_chars"] / size
    out["gopher_dup_line_frac"] = lp["gopher_dup_line_frac"]
    out["gopher_dup_line_char_frac"] = lp["line_chars"] / size
    chars: dict[str, np.ndarray] = {}
    _word_signals(arr, chars)
    for k, v in chars.items():
        out[k] = v / size
    data, off = _byte_view(arr)
    mv = memoryview(data)
    clen = np.ones(len(arr), dtype=np.int64)
    ne = np.flatnonzero(has)
    clen[ne] = [len(zlib.compress(mv[a:b], 6)) for a, b in zip(off[ne].tolist(), off[ne + 1].tolist())]
    out["compression_ratio"] = np.diff(off) / clen
    return out


#: Documents are processed in groups of about this many UTF-8 bytes (whole documents; a loop over
#: groups, not documents): every step is linear, but past a few MB hash tables and temporaries
#: leave the CPU caches and throughput drops several-fold.
CHUNK_BYTES = 1 << 20


def _signals(arr: pa.LargeStringArray) -> dict[str, np.ndarray]:
    """Every text signal of every document of ``arr`` (padded or a slice of a padded array)."""
    chars = pc.utf8_length(arr).to_numpy().astype(np.int64)
    odd, nonspace, words = _char_classes(arr, chars)
    has = chars > 0
    out = dict.fromkeys(SIGNALS)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["non_alnum_frac"] = np.where(has, odd / chars.astype(np.float64), np.nan)
        out["mean_word_len"] = np.where(words > 0, nonspace / np.maximum(words, 1), np.nan)
        if has.any():
            for k, v in _gopher_batch(arr, chars.astype(np.float64), has).items():
                out[k] = np.where(has, v, np.nan)  # empty documents: NaN
    return {k: np.full(len(arr), np.nan) if v is None else v for k, v in out.items()}


def text_row_signals(texts: Sequence[str | None] | pa.Array | pa.ChunkedArray) -> dict[str, np.ndarray]:
    """Every text signal for every document (NaN where the text is empty or missing), computed for
    whole groups of documents at once. ``texts``: a sequence of str/None or an Arrow string array."""
    arr = _text_array(texts)
    n = len(arr)
    if not n:
        return {k: np.zeros(0) for k in SIGNALS}
    _, off = _byte_view(arr)
    cuts = np.searchsorted(off, np.arange(CHUNK_BYTES, int(off[-1]), CHUNK_BYTES))
    bounds = np.unique(np.r_[0, cuts, n])
    parts = [_signals(arr.slice(a, b - a)) for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]
    return {k: np.concatenate([p[k] for p in parts]) for k in SIGNALS}


def gopher_signals(text: str) -> dict[str, float]:
    """Gopher repetition fractions and compression ratio of one document (NaN for empty text)."""
    rs = text_row_signals([text])
    return {k: float(rs[k][0]) for k in _GOPHER}


_FIXED = 2**32  # per-document values are summed in fixed point (units of 2^-32): exact, so associative


class TextStats:
    """Text signals auditor: mean over documents of the per-document signals.

    Sums are kept as integers in units of 2^-32 (each document's value rounded to the nearest
    2^-32), so accumulating and merging in any order gives bit-identical results: float sums
    would differ in the last bits with the order in which a runner delivers batches."""

    name = "text"

    def create(self) -> dict:
        return {"sum": dict.fromkeys(SIGNALS, 0), "n": dict.fromkeys(SIGNALS, 0)}

    def add(self, acc: dict, batch: TokenBatch) -> dict:
        if batch.text is None or not len(batch.text):
            return acc
        rs = text_row_signals(batch.text)
        out = {"sum": dict(acc["sum"]), "n": dict(acc["n"])}
        for k, v in rs.items():
            ok = ~np.isnan(v)
            out["sum"][k] += int(np.rint(v[ok] * _FIXED).astype(np.int64).sum(dtype=np.int64))
            out["n"][k] += int(ok.sum())
        return out

    def merge(self, accs: Iterable[dict]) -> dict:
        out = self.create()
        for a in accs:
            for k in SIGNALS:
                out["sum"][k] += a["sum"][k]
                out["n"][k] += a["n"][k]
        return out

    def result(self, acc: dict) -> dict[str, float]:
        return {k: (acc["sum"][k] / _FIXED / acc["n"][k] if acc["n"][k] else float("nan")) for k in SIGNALS}

    def row_signals(self, batch: TokenBatch) -> dict[str, np.ndarray]:
        if batch.text is None:
            return {k: np.full(batch.n_rows, np.nan) for k in SIGNALS}
        return text_row_signals(batch.text)
