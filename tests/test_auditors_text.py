"""Text signals: Gopher repetition (datatrove arithmetic, whitespace words), char classes, zlib."""

import math

import numpy as np
import pytest

from auditors.text import SIGNALS, gopher_signals, text_row_signals

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


def test_empty_text_is_nan_and_char_classes():
    rs = text_row_signals(["", None, "ab 12 !?", "héllo wörld"])
    assert math.isnan(rs["gopher_dup_line_frac"][0]) and math.isnan(rs["compression_ratio"][1])
    assert rs["non_alnum_frac"][2] == pytest.approx(2 / 8)
    assert rs["mean_word_len"][2] == pytest.approx(6 / 3)
    assert rs["non_alnum_frac"][3] == 0.0
    assert rs["mean_word_len"][3] == pytest.approx(5.0)
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
    for doc in DOCS:
        ours = gopher_signals(doc)
        for name in checks:
            v = ours[name]
            if v <= 1e-9:
                continue
            assert passes(doc, name, v + 1e-9), (doc, name, v)
            assert not passes(doc, name, v - 1e-9), (doc, name, v)
            compared += 1
    assert compared > 20
