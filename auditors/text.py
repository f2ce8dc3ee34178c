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
  whitespace, over all characters (pyarrow.compute regex counts, vectorised).
* ``mean_word_len``: non-whitespace characters / whitespace-separated words (vectorised).
* ``compression_ratio``: UTF-8 bytes / zlib (level 6) compressed bytes; higher means more redundant.

Batch signals are means over documents with non-empty text (empty or missing text is skipped; a
document without words has ``mean_word_len`` skipped). NaN when no document has text.
Per-document Python is used only for the Gopher n-gram scans and zlib.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from auditors.base import TokenBatch

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

_PARA = re.compile(r"\n{2,}")
_LINE = re.compile(r"\n+")
_GOPHER = [k for k in SIGNALS if k.startswith("gopher_")] + ["compression_ratio"]


def _dups(elements: list[str]) -> tuple[int, int]:
    seen: set[str] = set()
    n = chars = 0
    for e in elements:
        if e in seen:
            n += 1
            chars += len(e)
        else:
            seen.add(e)
    return n, chars


def _top_ngram_chars(words: list[str], n: int) -> int:
    grams = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0
    counts = Counter(grams)
    best, best_c = "", 0
    for g, c in counts.items():  # insertion order: ties go to the first seen
        if c > best_c:
            best, best_c = g, c
    return len(best) * best_c


def _dup_ngram_chars(words: list[str], n: int) -> int:
    seen: set[str] = set()
    total, i, limit = 0, 0, len(words) - n + 1
    while i < limit:
        g = "".join(words[i : i + n])
        if g in seen:
            total += len(g)
            i += n
        else:
            seen.add(g)
            i += 1
    return total


def gopher_signals(text: str) -> dict[str, float]:
    """Gopher repetition fractions and compression ratio of one document (NaN for empty text)."""
    if not text:
        return dict.fromkeys(_GOPHER, float("nan"))
    size = len(text)
    out = {}
    paras = _PARA.split(text.strip())
    d, c = _dups(paras)
    out["gopher_dup_para_frac"] = d / len(paras)
    out["gopher_dup_para_char_frac"] = c / size
    lines = _LINE.split(text)
    d, c = _dups(lines)
    out["gopher_dup_line_frac"] = d / len(lines)
    out["gopher_dup_line_char_frac"] = c / size
    words = text.split()
    for n in TOP_NS:
        out[f"gopher_top{n}_char_frac"] = _top_ngram_chars(words, n) / size
    for n in DUP_NS:
        out[f"gopher_dup{n}_char_frac"] = _dup_ngram_chars(words, n) / size
    raw = text.encode("utf-8")
    out["compression_ratio"] = len(raw) / len(zlib.compress(raw, 6))
    return out


def text_row_signals(texts: Sequence[str | None]) -> dict[str, np.ndarray]:
    """Every text signal for every document (NaN where the text is empty or missing)."""
    n = len(texts)
    arr = pa.array(texts, type=pa.large_string())
    chars = pc.fill_null(pc.utf8_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.float64)
    odd = pc.fill_null(pc.count_substring_regex(arr, r"[^\p{L}\p{N}\s]"), 0).to_numpy(zero_copy_only=False)
    nonspace = pc.fill_null(pc.count_substring_regex(arr, r"\S"), 0).to_numpy(zero_copy_only=False)
    words = pc.fill_null(pc.count_substring_regex(arr, r"\S+"), 0).to_numpy(zero_copy_only=False)
    out = {k: np.full(n, np.nan) for k in SIGNALS}
    with np.errstate(invalid="ignore", divide="ignore"):
        out["non_alnum_frac"] = np.where(chars > 0, odd / chars, np.nan)
        out["mean_word_len"] = np.where(words > 0, nonspace / np.maximum(words, 1), np.nan)
    for i in np.flatnonzero(chars > 0):
        for k, val in gopher_signals(texts[i]).items():
            out[k][i] = val
    return out


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
