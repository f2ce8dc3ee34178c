"""What the reports show (issue 14): honest numbers, strips on a scale where the controls' spread and the window's
value both show, responsive charts, escaped data, anomalous rows, duplicate clusters with members, one shard
against the corpus."""

import math
import re

import pytest
from hypothesis import given, strategies as st
from report_cases import FAMILY_NAMES, run_case, shard_case

from spike_audit.pipelines.report.charts import fmt_num, symlog
from spike_audit.pipelines.report.run_page import render_run_report
from spike_audit.pipelines.report.shard_page import PICKABLE, render_shard_report


@pytest.fixture(scope="module")
def run_html():
    return render_run_report(*run_case(n_events=12, n_controls=150, flags_per_event=20, loss_rows_per_step=64,
                                       n_steps=3000))


@pytest.fixture(scope="module")
def shard_html():
    return render_shard_report(*shard_case(n_shards=500, n_clusters=60))


@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300))
def test_fmt_num_is_short_and_within_three_significant_digits(x):
    s = fmt_num(x)
    assert len(s) <= 10, s
    back = float(s.replace(",", ""))
    assert back == pytest.approx(x, rel=5e-3, abs=0 if x else 1e-300) or abs(x) < 1e-300


@given(st.integers(min_value=-10**15, max_value=10**15))
def test_fmt_num_prints_integers_exactly(n):
    assert int(fmt_num(n).replace(",", "")) == n


def test_fmt_num_examples():
    assert fmt_num(166666666.7) == "1.67e8"
    assert fmt_num(0.000123) == "1.23e-4"
    assert fmt_num(1234.5) == "1,234"
    assert fmt_num(19.26) == "19.3"
    assert fmt_num(float("nan")) == "NaN" and fmt_num(None) == "n/a" and fmt_num(float("inf")) == "inf"


def test_symlog_is_monotone_and_odd():
    xs = [-1e8, -300, -3, -1, -0.5, 0, 0.5, 1, 3, 300, 1e8]
    ys = [float(symlog(x)) for x in xs]
    assert ys == sorted(ys) and all(math.isclose(float(symlog(-x)), -float(symlog(x))) for x in xs)


@pytest.mark.parametrize("page", ["run_html", "shard_html"])
def test_no_raw_long_numbers_and_data_escaped(page, request):
    html = request.getfixturevalue(page)
    assert "166666666" not in html  # the generated tables hold 166666666.7 and 166,666,666 in many columns
    text = re.sub(r"<style>.*?</style>|<[^>]*>", " ", html, flags=re.S)  # what the reader sees
    text = re.sub(r"(part|shard)-\d+|\b[0-9a-f]{16}\b", " ", text)  # shard names and cluster ids hold digits
    assert not re.search(r"(?<![\d.,])\d{5,}", text), re.search(r".{40}(?<![\d.,])\d{5,}.{10}", text)
    assert "<script" not in html and "&lt;script&gt;" in html
    # self-contained: nothing to fetch (the only URL is the SVG namespace)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", html) and "url(" not in html
    assert "<link" not in html and "<img" not in html and "<iframe" not in html


@pytest.mark.parametrize("page", ["run_html", "shard_html"])
def test_charts_are_responsive(page, request):
    html = request.getfixturevalue(page)
    svgs = re.findall(r"<svg[^>]*>", html)
    assert svgs
    for tag in svgs:
        if 'width="0"' in tag:  # the hidden block of shared shapes
            continue
        assert "viewBox=" in tag and 'class="chart"' in tag and " width=" not in tag, tag
    assert "svg.chart{display:block;width:100%;height:auto" in html
    assert "pre{" in html and "word-break:break-all" in html and "white-space:pre-wrap" in html


def test_run_strips_show_the_window_value_and_the_controls_once(run_html):
    assert "&gt; +1e4" not in run_html and "controls vs spike window" not in run_html
    values = re.findall(r'<text class="val"[^>]*>([^<]*)</text>', run_html)
    assert values and all("controls" in v for v in values)
    assert any(re.match(r"\d[\d.,e]* \(cap\) &#183; above all 150 controls", v) for v in values)
    # the controls' histograms are drawn once per family and referenced by every event's strip
    defs = re.findall(r'<path id="(ctl\d+)"', run_html)
    uses = re.findall(r'<use href="#(ctl\d+)"', run_html)
    assert len(defs) == len(set(defs)) and set(uses) == set(defs) and len(uses) > len(defs)


def test_run_report_lists_the_strongest_flagged_rows_of_each_event(run_html):
    assert run_html.count("<b>Flagged rows</b> (20 in all") == 12


def test_shard_report_rows_clusters_and_comparison(shard_html):
    assert "controls vs spike window" not in shard_html and "controls (grey)" not in shard_html
    assert "anomalous rows" in shard_html and f"row 12 &#183; {FAMILY_NAMES[0]}" in shard_html
    # clusters: members (shard: row), the shards, a text excerpt
    clusters = shard_html[shard_html.index("id='clusters'"):]
    assert "corpus/part-" in clusters and re.search(r"</code>: [\d,]+<br>", clusters)
    assert "<pre>" in clusters and "more</span>" in clusters
    # one radio button per pickable shard, and each signal panel marks every one of them (shown when picked)
    assert shard_html.count("type='radio'") == PICKABLE
    for k in range(PICKABLE):
        assert f"#pk{k}:checked~.grid .p{k}{{display:inline}}" in shard_html
        assert shard_html.count(f'class="sel p{k}"') >= 10
    assert "above 99" in shard_html  # the top shard's share of shards below it


@pytest.mark.parametrize("page", ["run_html", "shard_html"])
def test_control_and_bidi_characters_from_the_data_are_visible_escapes(page, request):
    """A right-to-left override in a shard name or an excerpt reversed the tool's own text after it in the browser;
    raw NUL/ESC were HTML parse errors. They are written as the terminal writes them; a CSP forbids any fetch or
    script (defence in depth: the page has none)."""
    html = request.getfixturevalue(page)
    for raw in ("\u202e", "\x00", "\x1b", "\x9b", "\x7f"):
        assert raw not in html, repr(raw)
    assert "\\u202e\\x00 tab" in html  # report_cases' hostile text, escaped as on the terminal
    assert "Content-Security-Policy" in html and "default-src 'none'" in html


def test_a_huge_loss_is_plotted_without_overflow():
    """A loss of 1e308 overflowed the chart's axis range: labels read 'inf' and numpy printed a RuntimeWarning."""
    import warnings

    import numpy as np

    from spike_audit.pipelines.report.charts import loss_svg

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        svg = loss_svg(np.arange(100), np.r_[np.full(99, 3.0), 1e308], [])
    assert "inf" not in svg and "nan" not in svg
