"""Check the HTML reports in a real headless browser and write the README's screenshots.

    python docs/screenshots.py                 # demo run + shard audit in a temporary dir, screenshots into docs/
    python docs/screenshots.py --dir /tmp/d    # keep (or reuse) the demo there
    python docs/screenshots.py --check-only    # the checks, no PNG written

Needs Chromium (``apt-get install -y chromium``; or ``CHROMIUM=/path/to/chrome``). It builds the demo run
(``spike-audit demo``), audits the demo's shards (``spike-audit shards``), then opens both reports at 1280 and
800 px wide and checks, in the browser:

* no console errors and no script errors (the reports have no script; a probe is injected into a copy only);
* no resource loaded at all (the page is self-contained: no network, no file beside it);
* no horizontal overflow: the page is not wider than the window, and no element's content is wider than its
  own box (a run of 3,000 backslashes must wrap inside its ``<pre>``, not run under its neighbours).

It prints one line per report and width and exits 1 if a check fails. The screenshots (PNG, reduced to a
256-colour palette when Pillow is installed) go into ``docs/``. ``tests/test_report_browser.py`` runs the same
checks on generated reports when Chromium is present.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent
WIDTHS = (1280, 800)

#: Injected first in <head> of a copy of the page: records errors, then on load measures the layout and writes the
#: result into the DOM, where --dump-dom prints it.
PROBE = r"""<script>
(function(){
  var errors = [];
  window.addEventListener('error', function(e){
    errors.push('error: ' + (e.message || (e.target && (e.target.src || e.target.href)) || 'resource'));
  }, true);
  var ce = console.error, cw = console.warn;
  console.error = function(){ errors.push('console.error: ' + Array.prototype.join.call(arguments, ' ')); ce.apply(console, arguments); };
  window.addEventListener('load', function(){
    var de = document.documentElement, W = window.innerWidth, bad = [];
    if (de.scrollWidth > de.clientWidth + 1) bad.push('page ' + de.scrollWidth + 'px wide in a ' + de.clientWidth + 'px window');
    var els = document.body.querySelectorAll('*');
    for (var i = 0; i < els.length && bad.length < 20; i++) {
      var el = els[i], r = el.getBoundingClientRect();
      if (el.tagName === 'STYLE' || el.tagName === 'SCRIPT' || el.closest('svg[width="0"]')) continue;
      if (r.width > 0 && r.right > de.clientWidth + 1)
        bad.push(el.tagName.toLowerCase() + (el.className && el.className.baseVal === undefined ? '.' + el.className : '') +
                 ' ends at ' + Math.round(r.right) + 'px');
      var svg = el.ownerSVGElement;
      if (svg && r.width > 0) {
        var b = svg.getBoundingClientRect();
        if (r.right > b.right + 1 || r.left < b.left - 1)
          bad.push(el.tagName.toLowerCase() + ' clipped by its chart (' + Math.round(r.left) + '..' + Math.round(r.right) +
                   'px in ' + Math.round(b.left) + '..' + Math.round(b.right) + 'px): ' + (el.textContent || '').slice(0, 60));
      }
      var cs = getComputedStyle(el);
      if (!(el instanceof SVGElement) && cs.display !== 'inline' && el.scrollWidth > el.clientWidth + 1 &&
          el.clientWidth > 0 && el.tagName !== 'HTML' && el.tagName !== 'BODY')
        bad.push(el.tagName.toLowerCase() + ' content ' + el.scrollWidth + 'px in a ' + el.clientWidth + 'px box');
    }
    var res = performance.getEntriesByType('resource').map(function(e){ return e.name; });
    var anchors = {}, ids = document.querySelectorAll('[id]');
    for (var j = 0; j < ids.length && j < 500; j++)
      anchors[ids[j].id] = Math.round(ids[j].getBoundingClientRect().top + window.scrollY);
    var out = document.createElement('pre');
    out.id = '__probe__';
    out.textContent = JSON.stringify({width: W, errors: errors, overflow: bad, resources: res, anchors: anchors,
                                      svgs: document.querySelectorAll('svg').length});
    document.body.appendChild(out);
  });
})();
</script>"""


def find_chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _flags(chromium: str, width: int, height: int) -> list[str]:
    return [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
            "--disable-extensions", "--force-device-scale-factor=1", "--host-resolver-rules=MAP * ~NOTFOUND",
            f"--window-size={width},{height}", "--virtual-time-budget=5000"]


def check_page(html_path: Path, width: int, chromium: str | None = None, timeout: float = 90) -> dict:
    """Open a copy of the page with the probe at ``width`` px and return what the probe measured: ``errors``,
    ``overflow`` (empty when nothing overflows), ``resources`` (empty when self-contained)."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise RuntimeError("chromium not found (apt-get install -y chromium, or set CHROMIUM)")
    text = Path(html_path).read_text(encoding="utf-8")
    if "<script" in text.lower():
        raise AssertionError(f"{html_path}: the report has a <script> (reports are static HTML)")
    m = re.search(r"<head[^>]*>", text, re.I)
    probed = text[: m.end()] + PROBE + text[m.end():] if m else PROBE + text
    with tempfile.TemporaryDirectory() as d:
        page = Path(d) / "page.html"
        page.write_text(probed, encoding="utf-8")
        p = subprocess.run(_flags(chromium, width, 1000) + [f"--user-data-dir={d}/profile", "--dump-dom",
                                                             page.as_uri()],
                           capture_output=True, text=True, timeout=timeout)
    m = re.search(r'<pre id="__probe__">(.*?)</pre>', p.stdout, re.S)
    if not m:
        raise RuntimeError(f"{html_path}: the probe did not report (chromium exit {p.returncode}): "
                           f"{p.stderr.strip()[-500:]}")
    import html as _html

    return json.loads(_html.unescape(m.group(1)))


def screenshot(html_path: Path, width: int, height: int, out: Path, fragment: str = "",
               chromium: str | None = None) -> Path:
    """A PNG of ``height`` px of the page at ``width`` px: its top, or from the element with id ``fragment`` (headless
    Chromium does not scroll to a fragment before its screenshot: the page is shot tall and cropped; needs
    Pillow, else the top is kept)."""
    chromium = chromium or find_chromium()
    top = 0
    try:
        from PIL import Image
    except ImportError:
        Image = None
    if fragment and Image is not None:
        top = max(0, int(check_page(html_path, width, chromium)["anchors"].get(fragment, 0)) - 8)
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(_flags(chromium, width, top + height) + [f"--user-data-dir={d}/profile", f"--screenshot={out}",
                                                                Path(html_path).resolve().as_uri()],
                       capture_output=True, text=True, timeout=90, check=True)
    if Image is not None:  # a palette PNG is a third of the size and looks the same for these flat charts
        im = Image.open(out).convert("RGB")
        if top:
            im = im.crop((0, top, im.width, min(im.height, top + height)))
        im.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    return out


def _run(cmd: list[str]) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()[-800:]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", help="demo directory (created if missing; default: a temporary one)")
    ap.add_argument("--out", default=str(DOCS), help="where the PNGs go (default: docs/)")
    ap.add_argument("--check-only", action="store_true", help="run the browser checks, write no PNG")
    a = ap.parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        sys.exit("chromium not found (apt-get install -y chromium, or set CHROMIUM)")
    tmp = None if a.dir else tempfile.TemporaryDirectory()
    d = Path(a.dir or tmp.name)
    # the installed command of the Python running this script (its virtualenv), else the one on PATH
    sibling = Path(sys.executable).parent / "spike-audit"
    exe = [str(sibling)] if sibling.exists() else [shutil.which("spike-audit")] if shutil.which("spike-audit") else \
        [sys.executable, "-c", "import sys; from spike_audit.pipelines.cli.main import main; sys.exit(main())"]
    if not (d / "audit" / "report.html").exists():
        _run(exe + ["-q", "demo", "--dir", str(d)])
    if not (d / "shards" / "report.html").exists():
        _run(exe + ["-q", "shards", str(d / "run" / "shards"), "--out", str(d / "shards")])
    reports = {"run": d / "audit" / "report.html", "shards": d / "shards" / "report.html"}
    failed = False
    for name, path in reports.items():
        for w in WIDTHS:
            r = check_page(path, w, chromium)
            ok = not r["errors"] and not r["overflow"] and not r["resources"]
            failed |= not ok
            print(f"{name:6} report at {w:4} px: {'ok' if ok else 'FAILED'} ({path.stat().st_size:,} bytes, "
                  f"{r['svgs']} charts; console errors: {len(r['errors'])}, overflowing elements: "
                  f"{len(r['overflow'])}, resources loaded: {len(r['resources'])})")
            for x in r["errors"] + r["overflow"] + r["resources"]:
                print(f"    {x}")
    if not a.check_only:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        event = _first_data_event(reports["run"])
        shots = [("report-run.png", reports["run"], 1280, 1180, ""),
                 ("report-run-event.png", reports["run"], 1280, 900, event),
                 ("report-run-800.png", reports["run"], 800, 1000, ""),
                 ("report-shards.png", reports["shards"], 1280, 1000, ""),
                 ("report-shards-compare.png", reports["shards"], 1280, 900, "compare")]
        for fname, path, w, h, frag in shots:
            p = screenshot(path, w, h, out / fname, frag, chromium)
            print(f"wrote {p} ({p.stat().st_size:,} bytes)")
    if tmp is not None:
        tmp.cleanup()
    return 1 if failed else 0


def _first_data_event(report: Path) -> str:
    """The id of the first event card judged ``data`` (its anchor), else the first card."""
    text = report.read_text(encoding="utf-8")
    cards = re.findall(r"<div class='card' id='([^']+)'><h3>.*?</h3>", text)
    data = re.findall(r"<div class='card' id='([^']+)'><h3>[^<]*<span class=\"badge\"[^>]*>data<", text)
    import html as _html

    return _html.unescape((data or cards or [""])[0])


if __name__ == "__main__":
    sys.exit(main())
