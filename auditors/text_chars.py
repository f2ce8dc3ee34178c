"""Character classes of the text signals (``non_alnum_frac``, ``mean_word_len``), counted on the UTF-8 bytes;
non-ASCII code points classified by RE2 itself, once per block of 256 code points per process."""

from __future__ import annotations

import functools
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spike_audit.auditors.text_arrays import _byte_view, _seg_count


def _re2_space(data: np.ndarray) -> np.ndarray:
    """Bytes in RE2's ``\\s`` = ``[\\t\\n\\f\\r ]`` (ASCII only: UTF-8 lead and continuation bytes
    are never in it). Comparisons, not a lookup table: several times faster on byte arrays."""
    return (data == 32) | ((data - np.uint8(9) < 5) & (data != 11))


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


#: Code point ranges of the non-Latin scripts counted by ``non_latin_frac`` (inclusive): Greek through the
#: Indic, South-East Asian, Georgian, Hangul Jamo, Ethiopic... blocks (U+0370-U+1DFF, Latin Extended
#: Additional at U+1E00 excluded), CJK radicals to Hangul syllables (U+2E80-U+D7FF), CJK compatibility
#: ideographs, Arabic presentation forms, half/full-width forms, and the supplementary ideographs.
NON_LATIN_RANGES = ((0x0370, 0x1DFF), (0x2E80, 0xD7FF), (0xF900, 0xFAFF), (0xFB1D, 0xFDFF), (0xFE70, 0xFEFF),
                    (0xFF00, 0xFFEF), (0x20000, 0x3FFFF))


def _non_latin(cp: np.ndarray) -> np.ndarray:
    out = np.zeros(len(cp), dtype=bool)
    for lo, hi in NON_LATIN_RANGES:
        out |= (cp >= lo) & (cp <= hi)
    return out


def _char_classes(arr: pa.LargeStringArray, chars: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per document: characters matching ``[^\\p{L}\\p{N}\\s]``, characters matching ``\\S``, matches of
    ``\\S+`` (RE2 classes), characters in a non-Latin script (:data:`NON_LATIN_RANGES`), ASCII digits and
    ASCII capital letters, from the UTF-8 bytes."""
    data, off = _byte_view(arr)
    n = len(arr)
    if not len(data):
        z = np.zeros(n, dtype=np.int64)
        return z, z, z, z, z, z
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
    digits = _seg_count(digit, off)
    upper = _seg_count(data - np.uint8(65) < 26, off)  # [A-Z]
    lead = np.flatnonzero(data >= 0xC0)  # first bytes of the non-ASCII characters
    non_latin = np.zeros(n, dtype=np.int64)
    if len(lead):  # decode those code points (the text is valid UTF-8) and classify them
        pad = np.zeros(len(data) + 3, dtype=np.int64)
        pad[: len(data)] = data
        b0, b1, b2, b3 = pad[lead], pad[lead + 1] & 0x3F, pad[lead + 2] & 0x3F, pad[lead + 3] & 0x3F
        cp = np.where(b0 < 0xE0, ((b0 & 0x1F) << 6) | b1,
                      np.where(b0 < 0xF0, ((b0 & 0x0F) << 12) | (b1 << 6) | b2,
                               ((b0 & 0x07) << 18) | (b1 << 12) | (b2 << 6) | b3))
        odd = odd + np.diff(np.searchsorted(lead[_odd_codepoints(np.minimum(cp, 0x10FFFF))], off))
        non_latin = np.diff(np.searchsorted(lead[_non_latin(cp)], off))
    return odd, nonspace, words, non_latin, digits, upper


def _max_byte_run(arr: pa.LargeStringArray) -> np.ndarray:
    """Per document: the longest run of one repeated ASCII character (0 for an empty document).

    Every ASCII byte is in a run of at least 1, so a document's value is 1 if it has an ASCII byte, raised by its
    runs of 2 or more ASCII bytes (few: only those are located, not every byte's run)."""
    data, off = _byte_view(arr)
    n = len(arr)
    out = np.zeros(n, dtype=np.int64)
    if not len(data):
        return out
    ascii_ = data < 0x80
    cum = np.r_[0, np.cumsum(ascii_, dtype=np.int64)]
    out[np.diff(cum[np.minimum(off, len(data))]) > 0] = 1
    same = data[1:] == data[:-1]
    same &= ascii_[1:]
    same[off[1:-1][(off[1:-1] > 0) & (off[1:-1] < len(data))] - 1] = False  # a run never crosses documents
    # runs of equal bytes of 2 or more: runs of True in ``same`` (byte i equal to byte i+1)
    d = np.diff(np.r_[np.int8(0), same.view(np.int8), np.int8(0)])
    a, b = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
    if len(a):
        doc = np.searchsorted(off, a, side="right") - 1
        np.maximum.at(out, doc, b - a + 1)
    return out


#: Words that look like encoded binary (``encoded_frac``): hex of at least HEX_MIN hex digits holding a digit and
#: a letter a-f (or at least HEX_DIGITS_MIN hex digits: ``00000010``), one trailing ``:`` or ``,`` allowed
#: (``xxd`` offsets, C arrays); base64 of at least B64_MIN characters of ``[A-Za-z0-9+/=]`` holding a capital,
#: a small letter and a digit (a base64 line is 64-76 characters).
HEX_MIN, HEX_DIGITS_MIN, B64_MIN = 4, 8, 16


def _encoded_chars(arr: pa.LargeStringArray) -> np.ndarray:
    """Per document: characters in words (maximal runs of non-``\\s`` bytes) that look like hex or base64
    (:data:`HEX_MIN`, :data:`B64_MIN`), counted without the allowed trailing separator."""
    data, off = _byte_view(arr)
    n = len(arr)
    out = np.zeros(n, dtype=np.int64)
    if not len(data):
        return out
    ns = ~_re2_space(data)
    start = ns.copy()
    start[1:] &= ~ns[:-1]  # a word starts at a non-space byte after a space byte...
    heads = off[:-1][off[:-1] < len(data)]
    start[heads] = ns[heads]  # ...or at the start of a document
    idx = np.flatnonzero(ns)
    if not len(idx):
        return out
    b = data[idx]
    w0 = np.flatnonzero(start[idx])  # each word's bytes are contiguous in idx
    length = np.diff(np.r_[w0, len(idx)])
    digit = b - np.uint8(48) < 10
    n_dig = np.add.reduceat(digit.astype(np.int32), w0)
    # both kinds hold a digit and at least HEX_MIN characters: only those words' bytes are classified further
    sel = np.flatnonzero((n_dig > 0) & (length >= HEX_MIN))
    if not len(sel):
        return out
    w0, length, n_dig = w0[sel], length[sel], n_dig[sel]
    starts = np.r_[0, np.cumsum(length)[:-1]]
    pos = np.repeat(w0 - starts, length) + np.arange(int(length.sum()))  # the selected words' bytes in idx
    b = b[pos]
    ws = starts  # word starts within the selected bytes
    last = b[np.r_[ws[1:], len(b)] - 1]
    sep = (last == 58) | (last == 44)  # ':' ','
    lower = b - np.uint8(97) < 26
    upper = b - np.uint8(65) < 26
    hexletter = ((b | np.uint8(0x20)) - np.uint8(97)) < 6
    b64 = lower | upper | (b - np.uint8(48) < 10) | (b == 43) | (b == 47) | (b == 61)  # + / =

    def count(mask):
        return np.add.reduceat(mask.astype(np.int32), ws)

    n_hexl, n_up, n_low, n_b64 = count(hexletter), count(upper), count(lower), count(b64)
    n_hex = n_dig + n_hexl
    eff = length - (sep & (n_hex == length - 1))  # the length without an allowed trailing separator
    hexw = (n_hex == eff) & (((n_hexl > 0) & (eff >= HEX_MIN)) | (eff >= HEX_DIGITS_MIN))
    b64w = (n_b64 == length) & (length >= B64_MIN) & (n_up > 0) & (n_low > 0)
    enc = np.where(hexw, eff, np.where(b64w, length, 0))
    doc = np.searchsorted(off, idx[w0], side="right") - 1
    np.add.at(out, doc, enc)
    return out
