"""Text signals: Gopher repetition (datatrove arithmetic, whitespace words), char classes, zlib.

The batch implementation in ``auditors.text`` is checked against the plain per-document
implementation below (the previous ``auditors.text``, kept literally as the reference): every
signal of every document must be bit-identical, on adversarial documents from hypothesis.
"""

import math
import re
import zlib
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spike_audit.auditors import text_repeats
from spike_audit.auditors.base import TokenBatch
from spike_audit.auditors.text import SIGNALS, TextStats, gopher_signals, text_row_signals

# ---------------------------------------------------------------------------------------------
# Reference: the per-document implementation (plain Python, one document at a time).

TOP_NS = (2, 3, 4)
DUP_NS = (5, 6, 7, 8, 9, 10)
_PARA = re.compile(r"\n{2,}")
_LINE = re.compile(r"\n+")
_GOPHER = [k for k in SIGNALS if k.startswith("gopher_")] + ["compression_ratio"]


def _dups(elements):
    seen = set()
    n = chars = 0
    for e in elements:
        if e in seen:
            n += 1
            chars += len(e)
        else:
            seen.add(e)
    return n, chars


def _top_ngram_chars(words, n):
    grams = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0
    counts = Counter(grams)
    best, best_c = "", 0
    for g, c in counts.items():  # insertion order: ties go to the first seen
        if c > best_c:
            best, best_c = g, c
    return len(best) * best_c


def _dup_ngram_chars(words, n):
    seen = set()
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


def ref_gopher_signals(text):
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


def ref_text_row_signals(texts):
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
        t = texts[i]
        ns = [c for c in t if not re.match(r"[\t\n\f\r ]", c)]
        out["non_latin_frac"][i] = (sum(_non_latin_char(c) for c in ns) / len(ns)) if ns else 0.0
        out["max_char_run"][i] = float(max((len(m.group(0)) for m in re.finditer(r"([\x00-\x7f])\1*", t)),
                                           default=0))
        out["digit_frac"][i] = (sum(c in "0123456789" for c in ns) / len(ns)) if ns else 0.0
        out["upper_frac"][i] = (sum("A" <= c <= "Z" for c in ns) / len(ns)) if ns else 0.0
        out["encoded_frac"][i] = (sum(_encoded_len(w) for w in re.split(r"[\t\n\f\r ]+", t) if w) / len(ns)
                                  ) if ns else 0.0
        for k, val in ref_gopher_signals(texts[i]).items():
            out[k][i] = val
    return out


def _encoded_len(w: str) -> int:
    """Characters of one word that count in encoded_frac: hex (with an optional trailing ':' or ',') or base64."""
    m = re.fullmatch(r"([0-9A-Fa-f]+)[:,]?", w)
    if m:
        core = m.group(1)
        if re.search("[0-9]", core) and ((re.search("[a-fA-F]", core) and len(core) >= 4) or len(core) >= 8):
            return len(core)
    if (re.fullmatch(r"[A-Za-z0-9+/=]{16,}", w) and re.search("[A-Z]", w) and re.search("[a-z]", w)
            and re.search("[0-9]", w)):
        return len(w)
    return 0


def test_encoded_frac_on_dumps_and_prose():
    from spike_audit.auditors.text import text_row_signals

    docs = ["H4sIAAAAAAACA5VSX6ubMBR/91Mcyh42mIEN7st9s9\nH4sIAAAAAAACA5VU247bNhB911cMFn1ogZV6AdKHFHnQZh",
            "0080edb0: 038e 048d 0546 8c06 8307 03df 070a 0c07  .....F..........",
            "The cafe was dead quiet in 2024; nobody added a decade of beef.",
            "ids: 3f786850e387550fdab836ed7e6dc881de23001b, 12345678", "", " \n "]
    got = text_row_signals(docs)["encoded_frac"]
    assert got[0] == 1.0  # base64 lines: every character
    assert abs(got[1] - 32 / 57) < 1e-12  # the offset (8) and the 6 groups holding a letter a-f (24) of 57
    assert got[2] == 0.0  # English words made of hex letters, and a year, are not encoded
    assert abs(got[3] - 48 / 53) < 1e-12  # a SHA-1 with its ',' (40) and 8 digits (8) of 53 characters
    assert np.isnan(got[4]) and got[5] == 0.0


def _non_latin_char(c: str) -> bool:
    from spike_audit.auditors.text_chars import NON_LATIN_RANGES

    return any(lo <= ord(c) <= hi for lo, hi in NON_LATIN_RANGES)


def assert_same(got, want, texts):
    assert set(got) == set(want) == set(SIGNALS)
    for k in SIGNALS:
        g, w = np.asarray(got[k]), np.asarray(want[k])
        assert g.shape == w.shape == (len(texts),), k
        same = (g == w) | (np.isnan(g) & np.isnan(w))  # bit-identical values, NaN at the same rows
        if not same.all():
            i = int(np.flatnonzero(~same)[0])
            raise AssertionError(f"{k} of document {i} {texts[i]!r}: got {g[i]!r}, reference {w[i]!r}")


# ---------------------------------------------------------------------------------------------
# Adversarial documents

# words that concatenate ambiguously ("a b" + "ab" ...), unicode, a long word, punctuation
WORDS = ["a", "b", "ab", "ba", "aab", "é", "日本", "Ω1", "١٢", "x" * 300, "!", "?!", "\u00ad", "ﬁ", "𝔘"]
SEPS = [" ", " ", " ", "\n", "\n\n", "\n\n\n", "\r\n", "\r\n\r\n", "\t", "\x0b", "\x0c", "\x1c", "\x85",
        "\u00a0", "\u2028", "\u3000", "  ", " \n ", "\n \n"]
chars_no_surrogates = st.characters(blacklist_categories=("Cs",))


@st.composite
def documents(draw):
    kind = draw(st.integers(0, 5))
    if kind == 0:  # anything
        return draw(st.text(chars_no_surrogates, max_size=60))
    if kind == 1:  # whitespace only, or empty
        return "".join(draw(st.lists(st.sampled_from(SEPS), max_size=6)))
    # a few words and separators, with segments repeated (n-gram, line and paragraph repeats)
    segs = []
    for _ in range(draw(st.integers(1, 6))):
        if segs and draw(st.booleans()):  # repeat earlier material: period 1..12 words, 2..6 times
            k = draw(st.integers(1, min(12, len(segs))))
            segs.extend(segs[-k:] * draw(st.integers(1, 5)))
        else:
            for _ in range(draw(st.integers(1, 12))):
                segs.append(draw(st.sampled_from(WORDS[:6] if kind == 2 else WORDS)))
                segs.append(draw(st.sampled_from(SEPS[:3] if kind == 3 else SEPS)))
    lead = draw(st.sampled_from(["", " ", "\n", "\n\n", "\u3000"]))
    return lead + "".join(segs)


batches = st.lists(st.one_of(documents(), st.none()), min_size=1, max_size=12)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches)
def test_batch_equals_per_document_reference(texts):
    assert_same(text_row_signals(texts), ref_text_row_signals(texts), texts)


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(texts=batches)
def test_hashes_only_filter_candidates(monkeypatch_candidates, texts):
    """With the hash filter disabled (every n-gram a candidate) the results are the same: exactness
    never depends on the 64-bit hashes."""
    assert_same(text_row_signals(texts), ref_text_row_signals(texts), texts)


@pytest.fixture
def monkeypatch_candidates(monkeypatch):
    monkeypatch.setattr(text_repeats, "_candidates", lambda key: np.arange(len(key)))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(texts=batches)
def test_dense_word_codes(monkeypatch, texts):
    """The path for batches too large for (document, word, word) int64 keys gives the same results."""
    monkeypatch.setattr(text_repeats, "_KEY_LIMIT", 0)
    assert_same(text_row_signals(texts), ref_text_row_signals(texts), texts)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(texts=batches, window=st.integers(1, 8))
def test_scan_in_small_windows(monkeypatch, texts, window):
    """The duplicate n-gram scan cut into windows of a few positions (long documents are) gives the
    same results: the state carried between windows is complete."""
    monkeypatch.setattr(text_repeats, "SCAN_WINDOW", window)
    assert_same(text_row_signals(texts), ref_text_row_signals(texts), texts)


@pytest.mark.parametrize("window", [None, 16])
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 3), min_size=0, max_size=400), period=st.integers(2, 10),
       seed=st.integers(0, 2**32 - 1))
def test_long_repetitive_documents(monkeypatch, window, ids, period, seed):
    """Long documents of a 4-word vocabulary plus a repeated block of every period: many
    overlapping repeats, long jump chains in the duplicate n-gram scan (also cut in windows)."""
    if window:
        monkeypatch.setattr(text_repeats, "SCAN_WINDOW", window)
    rng = np.random.default_rng(seed)
    vocab = ["a", "b", "ab", "ba"]
    block = [vocab[int(i)] for i in rng.integers(0, 4, period)]
    words = [vocab[i] for i in ids] + block * int(rng.integers(2, 30)) + [vocab[i] for i in ids[::-1]]
    seps = rng.choice([" ", " ", "\n", "\n\n"], len(words))
    texts = ["".join(w + s for w, s in zip(words, seps)), " ".join(words), " ".join(block * 50)]
    assert_same(text_row_signals(texts), ref_text_row_signals(texts), texts)


def test_arrow_inputs_equal_list_input():
    texts = ["a b a b a b a b a b a b", None, "", "x\n\ny\n\nx", "é ü é ü é ü é ü é ü é ü ü"] * 3
    want = text_row_signals(texts)
    arr = pa.array(["pad"] + texts, type=pa.string()).slice(1)  # sliced, 32-bit offsets
    chunked = pa.chunked_array([pa.array(texts[:4]), pa.array(texts[4:], type=pa.string())])
    for got in (text_row_signals(arr), text_row_signals(chunked)):
        assert_same(got, want, texts)


def test_bytes_after_the_last_string_do_not_matter():
    """Arrow's utf8_split_whitespace reads one character past a string ending in whitespace; the
    auditor must not depend on what follows the last string in the buffer."""
    texts = ["a b", "日本 a ba a  日本 a  日本 a "]
    raw = "".join(texts).encode()
    off = np.array([0, len(texts[0].encode()), len(raw)], dtype=np.int64)
    for tail in (b"", b"\x80\x80\x80", b"\xff" * 8, b"\xe6\x97"):
        arr = pa.Array.from_buffers(pa.large_string(), 2, [None, pa.py_buffer(off), pa.py_buffer(raw + tail)])
        assert_same(text_row_signals(arr), ref_text_row_signals(texts), texts)


def test_stats_add_and_row_signals_use_the_batch_values():
    texts = ["the cat sat\nthe cat sat", "", "one two three four five one two three four five six"]
    batch = TokenBatch(np.zeros(0, np.int64), np.zeros(len(texts) + 1, np.int64), text=texts)
    aud = TextStats()
    acc = aud.add(aud.create(), batch)
    ref = ref_text_row_signals(texts)
    for k in SIGNALS:
        ok = ~np.isnan(ref[k])
        assert acc["n"][k] == ok.sum()
        assert acc["sum"][k] == int(np.rint(ref[k][ok] * 2**32).astype(np.int64).sum())
    assert_same(aud.row_signals(batch), ref, texts)


# ---------------------------------------------------------------------------------------------
# Definitions (worked examples) and the datatrove agreement

DOCS = [
    "the cat sat\nthe cat sat\non the mat\n\nthe cat sat\nthe cat sat\non the mat\n\nend",
    "a b c d e f a b c d e f a b c d e f g h",
    "one two three four five six seven eight nine ten eleven twelve " * 3,
    "Unique words only here, nothing repeats at all!",
    "x\n\n\ny\n\nx\n\ny\nz",
]


def test_worked_example():
    t = "ab\nab\ncd"
    g = gopher_signals(t)
    assert g["gopher_dup_line_frac"] == pytest.approx(1 / 3)
    assert g["gopher_dup_line_char_frac"] == pytest.approx(2 / 8)
    # words: ab ab cd; top 2-gram "ab ab" (first of two 2-grams seen once) -> 5 chars
    assert g["gopher_top2_char_frac"] == pytest.approx(5 / 8)
    t = "a b a b a b a b a b x"  # 5-gram scan: "ababa" at 0, "babab" at 1, "ababa" at 2 (dup, jump)...
    g = gopher_signals(t)
    assert g["gopher_dup5_char_frac"] == pytest.approx(5 / len(t))
    # n-grams are compared as concatenated strings: "x ab c d e" repeats as "x a bc d e"
    t = "x ab c d e x a bc d e"
    assert gopher_signals(t)["gopher_dup5_char_frac"] == pytest.approx(6 / len(t))


def test_empty_text_is_nan_and_char_classes():
    rs = text_row_signals(["", None, "ab 12 !?", "héllo wörld", "a\u00a0b\x0bc ½ ∑ 日本"])
    assert math.isnan(rs["gopher_dup_line_frac"][0]) and math.isnan(rs["compression_ratio"][1])
    assert rs["non_alnum_frac"][2] == pytest.approx(2 / 8)
    assert rs["mean_word_len"][2] == pytest.approx(6 / 3)
    assert rs["non_alnum_frac"][3] == 0.0
    assert rs["mean_word_len"][3] == pytest.approx(5.0)
    # RE2 classes: \u00a0 and \x0b are not \s (so not words separators there, and count as odd),
    # ½ is a number (\p{N}), ∑ is neither letter nor number
    assert rs["non_alnum_frac"][4] == pytest.approx(3 / 12)
    assert rs["mean_word_len"][4] == pytest.approx(9 / 4)
    assert set(rs) == set(SIGNALS)


def test_compression_ratio_grows_with_redundancy():
    rng = np.random.default_rng(0)
    rs = text_row_signals(["abc" * 200, "".join(chr(97 + int(c)) for c in rng.integers(0, 26, 600))])
    assert rs["compression_ratio"][0] > 5 * rs["compression_ratio"][1]


def test_agrees_with_datatrove_gopher_filter():
    filt = pytest.importorskip("datatrove.pipeline.filters.gopher_repetition_filter")
    from datatrove.data import Document
    from datatrove.utils.word_tokenizers import WordTokenizer

    class Whitespace(WordTokenizer):
        def word_tokenize(self, text, **kw):
            return text.split()

        def sent_tokenize(self, text, **kw):
            return [text]

        def span_tokenize(self, text, **kw):
            return [(0, len(text))]

    ws = Whitespace()
    checks = {
        "gopher_dup_para_frac": dict(dup_para_frac=None),
        "gopher_dup_para_char_frac": dict(dup_para_char_frac=None),
        "gopher_dup_line_frac": dict(dup_line_frac=None),
        "gopher_dup_line_char_frac": dict(dup_line_char_frac=None),
        **{f"gopher_top{n}_char_frac": dict(top_n_grams=((n, None),)) for n in (2, 3, 4)},
        **{f"gopher_dup{n}_char_frac": dict(dup_n_grams=((n, None),)) for n in range(5, 11)},
    }
    none = dict(dup_line_frac=None, dup_para_frac=None, dup_line_char_frac=None, dup_para_char_frac=None,
                top_n_grams=(), dup_n_grams=())

    def passes(text, name, thr):
        kw = dict(none)
        for k, v in checks[name].items():
            kw[k] = ((v[0][0], thr),) if isinstance(v, tuple) else thr
        f = filt.GopherRepetitionFilter(language=ws, **kw)
        return f.filter(Document(text=text, id="x")) is True

    compared = 0
    rows = text_row_signals(DOCS)
    for i, doc in enumerate(DOCS):
        for name in checks:
            v = rows[name][i]
            if v <= 1e-9:
                continue
            assert passes(doc, name, v + 1e-9), (doc, name, v)
            assert not passes(doc, name, v - 1e-9), (doc, name, v)
            compared += 1
    assert compared > 20


def test_long_documents_are_read_up_to_max_doc_chars():
    from spike_audit.auditors.text import MAX_DOC_CHARS, text_row_signals

    head = "the quick brown fox jumps over the lazy dog\n" * (MAX_DOC_CHARS // 44 + 1)
    long_doc = head[:MAX_DOC_CHARS] + "zzz " * 50_000
    a = text_row_signals([long_doc])
    b = text_row_signals([head[:MAX_DOC_CHARS]])
    for k in a:
        assert np.array_equal(a[k], b[k], equal_nan=True), k
