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
* ``non_latin_frac``: non-whitespace characters whose code point lies in a non-Latin script block
  (:data:`.text_chars.NON_LATIN_RANGES`: Greek, Cyrillic, Armenian, Hebrew, Arabic, the Indic and
  South-East Asian scripts, CJK, Kana, Hangul, ...) over non-whitespace characters (0 for a document of
  whitespace only).
* ``max_char_run``: the longest run of one repeated ASCII character (a run of backslashes, of ``=``).
* ``digit_frac`` / ``upper_frac``: ASCII digits / ASCII capital letters over non-whitespace characters (0
  for a document of whitespace only): tables of numbers, hex and base64 blobs, shouting.
* ``encoded_frac``: characters in words that look like encoded binary over non-whitespace characters (0 for
  a document of whitespace only): hex (xxd dumps, hashes, C byte arrays) and base64 (inline images, mail
  attachments, certificates), which mixed in one batch each reach only their own signal above (a base64
  line is one long word; a hex dump has short words and many digits).

Every signal reads at most the first ``MAX_DOC_CHARS`` (100,000) characters of a document.

Batch signals are means over documents with non-empty text (empty or missing text is skipped; a
document without words has ``mean_word_len`` skipped). NaN when no document has text.

Everything is computed for whole groups of documents at once (:mod:`.text_repeats`, :mod:`.text_chars`,
:mod:`.text_arrays`) (about ``CHUNK_BYTES`` of text per
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

import zlib
from collections.abc import Iterable, Sequence
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spike_audit.auditors.base import TokenBatch
from spike_audit.auditors.text_arrays import _byte_view
from spike_audit.auditors.text_chars import _char_classes, _encoded_chars, _max_byte_run
from spike_audit.auditors.text_repeats import DUP_NS, TOP_NS, _dup_lines_paras, _word_signals


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
    "non_latin_frac": "Characters in a non-Latin script (Greek, Cyrillic, Arabic, Hebrew, Indic, CJK, Hangul, "
    "...: auditors.text_chars.NON_LATIN_RANGES) / non-whitespace characters.",
    "max_char_run": "Longest run of one repeated ASCII character, characters.",
    "digit_frac": "ASCII digits / non-whitespace characters.",
    "upper_frac": "ASCII capital letters / non-whitespace characters.",
    "encoded_frac": "Characters in words that look like encoded binary (hex: >= 4 hex digits with a digit and a "
    "letter a-f, or >= 8 hex digits, one trailing ':' or ',' allowed; base64: >= 16 characters of [A-Za-z0-9+/=] "
    "with a capital, a small letter and a digit) / non-whitespace characters.",
}


_GOPHER = [k for k in SIGNALS if k.startswith("gopher_")] + ["compression_ratio"]


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
    odd, nonspace, words, non_latin, digits, upper = _char_classes(arr, chars)
    has = chars > 0
    out = dict.fromkeys(SIGNALS)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["non_alnum_frac"] = np.where(has, odd / chars.astype(np.float64), np.nan)
        out["non_latin_frac"] = np.where(nonspace > 0, non_latin / np.maximum(nonspace, 1).astype(np.float64),
                                         np.where(has, 0.0, np.nan))
        out["max_char_run"] = np.where(has, _max_byte_run(arr).astype(np.float64), np.nan)
        ns = np.maximum(nonspace, 1).astype(np.float64)
        out["digit_frac"] = np.where(nonspace > 0, digits / ns, np.where(has, 0.0, np.nan))
        out["upper_frac"] = np.where(nonspace > 0, upper / ns, np.where(has, 0.0, np.nan))
        out["encoded_frac"] = np.where(nonspace > 0, _encoded_chars(arr) / ns, np.where(has, 0.0, np.nan))
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

    def add(self, acc: dict, batch: TokenBatch, cache=None) -> dict:
        if batch.text is None or not len(batch.text):
            return acc
        rs = self.row_signals(batch, cache)
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

    def row_signals(self, batch: TokenBatch, cache=None) -> dict[str, np.ndarray]:
        """Every text signal of every row (NaN without text); with a ``BatchCache`` computed once per batch
        whoever asks (the suite's accumulator, the row scorer)."""
        if batch.text is None:
            return {k: np.full(batch.n_rows, np.nan) for k in SIGNALS}
        if cache is not None:
            return cache.memo(("text",), lambda: text_row_signals(batch.text))
        return text_row_signals(batch.text)
