"""Both reports in a real headless browser (docs/screenshots.py's checks): no console or script errors, nothing
loaded (self-contained), nothing wider than the window or than its own box at 1280 and 800 px, on generated reports
with hostile data (a 3,000-backslash row, markup in names, 150-character shard names). Skipped without Chromium
(``apt-get install -y chromium``)."""

import importlib.util
from pathlib import Path

import pytest
from report_cases import run_case, shard_case

from spike_audit.pipelines.report.run_page import render_run_report
from spike_audit.pipelines.report.shard_page import render_shard_report

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "screenshots.py"


def _script():
    spec = importlib.util.spec_from_file_location("screenshots", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


shots = _script()
pytestmark = pytest.mark.skipif(shots.find_chromium() is None, reason="chromium not installed")


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    d = tmp_path_factory.mktemp("reports")
    run = d / "run.html"
    run.write_text(render_run_report(*run_case(n_events=20, n_controls=120, flags_per_event=12, loss_rows_per_step=64,
                                               n_steps=3000)), encoding="utf-8")
    shards = d / "shards.html"
    shards.write_text(render_shard_report(*shard_case(n_shards=2000, n_clusters=200)), encoding="utf-8")
    return {"run": run, "shards": shards}


@pytest.mark.parametrize("width", shots.WIDTHS)
@pytest.mark.parametrize("name", ["run", "shards"])
def test_report_in_a_headless_browser(pages, name, width):
    r = shots.check_page(pages[name], width)
    assert r["width"] == width
    assert r["errors"] == [] and r["resources"] == [] and r["overflow"] == [], r
    assert r["svgs"] > 5


def test_the_probe_sees_overflow_errors_and_network(tmp_path):
    """The check can fail: a fixed-width table, an unwrapped run of backslashes and a remote image are caught."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!doctype html><html><head></head><body><table><tr><td><code>" + "A" * 400 + "</code></td></tr>"
                   "</table><pre style='white-space:pre;overflow:hidden'>" + "\\" * 3000 + "</pre>"
                   "<img src='http://203.0.113.1/x.png'></body></html>")
    r = shots.check_page(bad, 800)
    assert any(x.startswith("page ") for x in r["overflow"]) and any("pre content" in x for x in r["overflow"])
    assert r["resources"] and r["errors"]
