"""What both pages share: the style sheet, HTML escaping, verdict badges, number formats, and the inline SVG charts
(the loss curve with its spikes, the evidence strips, distributions across shards).

Every chart is an SVG with a ``viewBox`` drawn at 100% of its container's width (at most its natural width), so a
narrow window scales it down instead of overflowing. Distributions of many values (controls, shards) are drawn as
binned histograms, never one mark per value: a page's size grows with what it shows, not with the data."""

from __future__ import annotations

import html
import math
from typing import Iterable, Sequence
import numpy as np


COLORS = {"data": "#d62728", "not_data": "#1f77b4", "inconclusive": "#7f7f7f", None: "#bcbd22"}


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;padding:0 16px;color:#222;
max-width:1200px;overflow-wrap:break-word}
h1{font-size:22px;margin-bottom:4px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:18px 0 6px} .muted{color:#666}
table{border-collapse:collapse;font-size:13px;max-width:100%}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top;overflow-wrap:anywhere}
th{background:#f5f5f5;overflow-wrap:normal} td.n{text-align:right;white-space:nowrap} td.id{min-width:13ch}
td.ex{min-width:28ch} code{overflow-wrap:anywhere}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;font-size:12px;white-space:nowrap}
pre{background:#f7f7f7;border:1px solid #e3e3e3;padding:6px;white-space:pre-wrap;word-break:break-all;
overflow-wrap:anywhere;max-height:120px;overflow:hidden;font-size:12px;margin:4px 0;max-width:100%;
box-sizing:border-box} .legend span{margin-right:14px}
.card{border:1px solid #e3e3e3;border-radius:6px;padding:10px 14px;margin:12px 0;overflow:hidden}
svg.chart{display:block;width:100%;height:auto;background:#fff}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:8px}
.grid>div{border:1px solid #eee;border-radius:4px;padding:4px 6px;min-width:0}
.pick label{display:inline-block;margin:2px 10px 2px 0;font-size:13px;cursor:pointer;overflow-wrap:anywhere}
.sel{display:none}
svg .lbl{font-size:12px;text-anchor:end} svg .lbs{font-size:11px;text-anchor:end} svg .val{font-size:11px}
svg .tk{font-size:10px;text-anchor:middle;fill:#666} svg .cnt{font-size:10px;text-anchor:end;fill:#d62728}
svg .dm{fill:#d62728}
"""


def _e(x) -> str:
    """Text for the page: HTML-escaped, and its control and bidirectional characters written as visible escapes
    (``\\x1b``, ``\\u202e``), as on the terminal: a right-to-left override in a shard name or an excerpt would
    otherwise reverse the tool's own text after it, and raw C0/C1 controls are HTML parse errors."""
    from spike_audit.pipelines.errors import printable

    return html.escape(printable("" if x is None else str(x)))


def _badge(verdict) -> str:
    return f'<span class="badge" style="background:{COLORS.get(verdict, "#999")}">{_e(verdict or "not audited")}</span>'


# ------------------------------------------------------------------------------------------- numbers


def fmt_num(x, digits: int = 3) -> str:
    """A number as a reader wants it: integers with thousands separators, other values with ``digits``
    significant digits, scientific (``1.67e8``) beyond a million or below a thousandth; ``n/a`` for None,
    ``NaN`` and ``inf`` as such. Never 166666666.7."""
    if x is None:
        return "n/a"
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    x = float(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    a = abs(x)
    if a == 0:
        return "0"
    if a >= 1e6 or a < 1e-3:
        m, _, e = f"{x:.{digits - 1}e}".partition("e")
        m = m.rstrip("0").rstrip(".") if "." in m else m
        return f"{m}e{int(e)}"
    if a >= 10 ** digits:  # 1234.5 -> 1,234 (no digits beyond the integer part)
        return f"{round(x):,}"
    out = f"{x:.{digits}g}"
    return out if "e" not in out else f"{x:,.0f}"


def fmt_signed(x) -> str:
    s = fmt_num(x)
    return s if s.startswith("-") or s in ("n/a", "NaN") or s == "0" else "+" + s


def fmt_pct(x) -> str:
    if x is None or not math.isfinite(float(x)):
        return "n/a"
    x = 100.0 * float(x)
    return f"{x:.0f}%" if x >= 10 or x == 0 else (f"{x:.2g}%" if x >= 0.01 else "<0.01%")


def _score(x: float) -> str:
    return fmt_num(x)


# ------------------------------------------------------------------------------------------- scales


def symlog(v, c: float = 1.0):
    """sign(v) log10(1 + |v| / c): linear near 0, logarithmic beyond ``c`` (so a value of 300 and controls
    between 0 and 3 both stay readable on one axis)."""
    v = np.asarray(v, dtype=np.float64)
    return np.sign(v) * np.log10(1.0 + np.abs(v) / c)


def _ticks(hi: float, c: float = 1.0) -> list[float]:
    """Tick values 0, 1, 3, 10, 30, ... (times ``c``) up to ``hi``."""
    out = [0.0]
    k = 0
    while True:
        for m in (1, 3):
            t = m * 10.0 ** k * c
            if t > hi * 1.0001:
                return out
            out.append(t)
        k += 1
        if k > 30:
            return out


def _tick_label(v: float) -> str:
    return ("-" if v < 0 else "") + fmt_num(abs(v))


def _hist_path(u: np.ndarray, x0: float, x1: float, y0: float, height: float, nbins: int) -> tuple[str, np.ndarray]:
    """A histogram of positions ``u`` in [0, 1] drawn as one path of bars between x0 and x1, bars rising
    from y0 to at most ``height`` (square-root scale, so one value among thousands still shows)."""
    u = np.clip(np.asarray(u, dtype=np.float64), 0.0, 1.0)
    counts = np.bincount(np.minimum((u * nbins).astype(np.int64), nbins - 1), minlength=nbins) if len(u) else \
        np.zeros(nbins, np.int64)
    if not counts.any():
        return "", counts
    w = (x1 - x0) / nbins
    h = np.sqrt(counts / counts.max()) * height
    d = "".join(f"M{x0 + i * w:.1f} {y0:.1f}v{-max(h[i], 1.0):.1f}h{max(w - 0.6, 0.8):.1f}v{max(h[i], 1.0):.1f}z"
                for i in np.flatnonzero(counts).tolist())
    return d, counts


def _svg_open(width: int, height: int, label: str = "") -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} {height}" '
            f'style="max-width:{width}px" role="img" aria-label="{_e(label)}">')


# ------------------------------------------------------------------------------------------- loss curve


def _downsample(x: np.ndarray, y: np.ndarray, n: int = 1500) -> tuple[np.ndarray, np.ndarray]:
    """Keep the min and max of each of n/2 buckets so spikes stay visible on long curves (finite y)."""
    if len(x) <= n:
        return x, y
    edges = np.linspace(0, len(x), n // 2 + 1).astype(np.int64)
    starts = edges[:-1][np.diff(edges) > 0]
    idx = []
    for a, b in zip(starts, np.r_[starts[1:], len(y)]):  # a loop over buckets (<= n/2), not points
        seg = y[a:b]
        idx += [a + int(np.argmin(seg)), a + int(np.argmax(seg))]
    idx = np.unique(np.asarray(idx, dtype=np.int64))
    return x[idx], y[idx]


def loss_svg(steps: np.ndarray, values: np.ndarray, marks: Sequence[tuple[int, float, str | None, str]],
             width: int = 1100, height: int = 320, title: str = "") -> str:
    steps = np.asarray(steps, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(values)
    if not ok.any():
        return "<p>No finite values to plot.</p>"
    # plotted within +-1e300: a loss of 1e308 overflowed the axis range to inf (a raw RuntimeWarning on stderr)
    xs, ys = _downsample(steps[ok], np.clip(values[ok], -1e300, 1e300))
    lo, hi = np.percentile(ys, 0.5), max(np.max(ys), np.percentile(ys, 99.5))
    pad = 0.05 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    x0, x1 = float(steps.min()), float(steps.max()) or 1.0
    L, R, T, B = 56, 16, 20, 34

    def px(s):
        return L + (s - x0) / ((x1 - x0) or 1.0) * (width - L - R)

    def py(v):
        return T + (1 - (min(max(v, lo), hi) - lo) / (hi - lo)) * (height - T - B)

    pts = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in zip(xs, ys))
    parts = [_svg_open(width, height, title).replace('style="', 'style="border:1px solid #eee;', 1)]
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        parts.append(f'<line x1="{L}" x2="{width - R}" y1="{py(v):.1f}" y2="{py(v):.1f}" stroke="#eee"/>'
                     f'<text x="{L - 6}" y="{py(v) + 4:.1f}" font-size="11" text-anchor="end" fill="#666">'
                     f'{_e(fmt_num(v))}</text>')
    for k in range(6):
        s = x0 + (x1 - x0) * k / 5
        parts.append(f'<text x="{px(s):.1f}" y="{height - 12}" font-size="11" text-anchor="middle" '
                     f'fill="#666">{int(s)}</text>')
    parts.append(f'<polyline fill="none" stroke="#333" stroke-width="1" points="{pts}"/>')
    for step, value, verdict, label in marks:
        c = COLORS.get(verdict, "#999")
        y = py(value) if np.isfinite(value) else T
        parts.append(f'<line x1="{px(step):.1f}" x2="{px(step):.1f}" y1="{T}" y2="{height - B}" stroke="{c}" '
                     f'stroke-opacity="0.35"/><circle cx="{px(step):.1f}" cy="{y:.1f}" r="5" fill="{c}">'
                     f'<title>{_e(label)}</title></circle>')
    parts.append(f'<text x="{L}" y="13" font-size="12" fill="#444">{_e(title)}</text></svg>')
    return "".join(parts)


# ------------------------------------------------------------------------------------------- evidence strips

#: Evidence is -log10 of a binomial tail, capped at this: the strips' axis is fixed, 0 .. 300 on a symlog scale.
EVIDENCE_CAP = 300.0
STRIP_W, STRIP_L, STRIP_R = 820, 215, 245
STRIP_ROW = 26


def _u_evidence(v) -> np.ndarray:
    return symlog(np.minimum(np.maximum(np.asarray(v, dtype=np.float64), 0.0), EVIDENCE_CAP)) / \
        float(symlog(EVIDENCE_CAP))


class ControlStrips:
    """The controls' evidence per family, drawn once per page (an SVG ``<defs>`` block) and referenced by every
    event's strip (``<use>``): the controls are the same for every event, so 200 events cost 200 small strips,
    not 200 copies of 200 controls' ticks."""

    def __init__(self, controls: Sequence[dict], nbins: int = 64):
        self.controls = list(controls)
        self.n = len(self.controls)
        self.nbins = nbins
        self.ids: dict[str, str] = {}
        self.paths: dict[str, str] = {}
        self.values: dict[str, np.ndarray] = {}

    def values_of(self, name: str) -> np.ndarray:
        if name not in self.values:
            self.values[name] = np.array([float(d[name]["evidence"]) if name in d and d[name]["evidence"] is not None
                                          else 0.0 for d in self.controls], dtype=np.float64)
        return self.values[name]

    def ref(self, name: str) -> str:
        if name not in self.ids:
            self.ids[name] = f"ctl{len(self.ids)}"
            d, _ = _hist_path(_u_evidence(self.values_of(name)), STRIP_L, STRIP_W - STRIP_R, 0.0, 10.0, self.nbins)
            self.paths[name] = d
        return self.ids[name]

    def defs(self) -> str:
        """The shared block (put it once in the page, after the strips: ``<use>`` resolves by id anywhere)."""
        if not self.ids:
            return ""
        body = "".join(f'<path id="{i}" d="{self.paths[n]}" fill="#888" fill-opacity="0.55"/>'
                       for n, i in self.ids.items())
        x0, x1 = STRIP_L, STRIP_W - STRIP_R
        body += '<g id="ctlticks">' + "".join(
            f'<path d="M{x0 + float(_u_evidence(t)) * (x1 - x0):.1f} -4v4" stroke="#999"/><text '
            f'class="tk" x="{x0 + float(_u_evidence(t)) * (x1 - x0):.1f}" y="10">{_e(fmt_num(t))}</text>' for t in _ticks(EVIDENCE_CAP)) + "</g>"
        return ('<svg xmlns="http://www.w3.org/2000/svg" width="0" height="0" style="position:absolute" '
                f'aria-hidden="true"><defs>{body}</defs></svg>')


def evidence_strip_svg(rows: list[tuple[str, float]], controls: ControlStrips) -> str:
    """One line per family: the controls' evidence as a grey histogram, the window's evidence as a red diamond,
    on one axis for every family (evidence 0 .. 300, symlog: linear below 1, logarithmic above). Each line prints
    the window's value and how many controls it exceeds."""
    n = controls.n
    h = STRIP_ROW * len(rows) + 44
    x0, x1 = STRIP_L, STRIP_W - STRIP_R
    parts = [_svg_open(STRIP_W, h, "evidence of the window against the controls"),
             f'<text x="{x0}" y="13" font-size="11" fill="#666">evidence: {n} control steps (grey histogram) vs '
             f'the event window (red)</text>']
    for k, (name, z) in enumerate(rows):
        y = 34 + STRIP_ROW * k
        parts.append(f'<text class="lbl" x="{x0 - 8}" y="{y + 4}">{_e(name)}</text>'
                     f'<path d="M{x0} {y + 6}H{x1}" stroke="#ddd"/><use href="#{controls.ref(name)}" y="{y + 6}"/>')
        if math.isfinite(z):
            ctl = controls.values_of(name)
            x = x0 + float(_u_evidence(z)) * (x1 - x0)
            above = int(np.count_nonzero(ctl < z))
            rank = (f"above all {n} controls" if n and above == n else
                    f"above {above} of {n} controls" if n else "no controls")
            capped = " (cap)" if z >= EVIDENCE_CAP else ""
            parts.append(f'<path class="dm" d="M{x:.1f} {y - 2}l5 7l-5 7l-5-7z"/>'
                         f'<text class="val" x="{x1 + 8}" y="{y + 4}">{_e(fmt_num(z))}{capped} &#183; '
                         f'{_e(rank)}</text>')
    controls.ref(rows[0][0]) if rows else None  # the shared block exists once a strip is drawn
    parts.append(f'<use href="#ctlticks" y="{34 + STRIP_ROW * len(rows)}"/></svg>')
    return "".join(parts)


# ------------------------------------------------------------------------------------------- across shards


def distribution_svg(z: np.ndarray, highlight: np.ndarray | None = None,
                     marks: Iterable[tuple[float, str, str]] = (), width: int = 320, height: int = 84,
                     nbins: int = 48) -> str:
    """One signal across shards: every shard's robust z as a grey histogram on a symmetric symlog axis (so the
    bulk near 0 and a z of 1e8 are both visible), ``highlight`` (a subset, e.g. the quarantined shards) as a red
    histogram over it, and ``marks`` (z, css class, label): one blue line and label each, shown by its class
    (the selected shard)."""
    z = np.asarray(z, dtype=np.float64)
    z = z[np.isfinite(z)]
    hi = float(np.max(np.abs(z))) if len(z) else 1.0
    marks = list(marks)
    for mz, _, _ in marks:
        if math.isfinite(mz):
            hi = max(hi, abs(mz))
    span = float(symlog(max(hi, 3.0)))
    x0, x1, base = 8.0, width - 8.0, height - 22.0

    def u(v):
        return (symlog(v) / span + 1.0) / 2.0

    parts = [_svg_open(width, height, "distribution across shards")]
    d, _ = _hist_path(u(z), x0, x1, base, base - 18, nbins)
    parts.append(f'<line x1="{x0}" x2="{x1}" y1="{base}" y2="{base}" stroke="#ccc"/>')
    if d:
        parts.append(f'<path d="{d}" fill="#999" fill-opacity="0.6"/>')
    if highlight is not None:
        hz = np.asarray(highlight, dtype=np.float64)
        hz = hz[np.isfinite(hz)]
        d, _ = _hist_path(u(hz), x0, x1, base, base - 18, nbins)
        if d:
            parts.append(f'<path d="{d}" fill="#d62728" fill-opacity="0.75"/>')
    decades = [t for t in _ticks(hi) if t > 0 and str(fmt_num(t)).lstrip("-").startswith("1")
               and float(symlog(t)) / span > 0.15]
    step = max(1, math.ceil(len(decades) / 3))  # at most 3 ticks each side, the largest decade kept
    ticks = [0.0] + decades[::-1][::step][::-1]
    for t in sorted({-t for t in ticks} | set(ticks)):
        x = x0 + float(u(t)) * (x1 - x0)
        anchor = "start" if x < x0 + 14 else "end" if x > x1 - 14 else "middle"
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{base}" y2="{base + 3}" stroke="#999"/>'
                     f'<text x="{x:.1f}" y="{base + 13}" font-size="9" text-anchor="{anchor}" fill="#666">'
                     f'{_e(_tick_label(t))}</text>')
    for mz, cls, label in marks:
        if not math.isfinite(mz):
            continue
        x = x0 + float(u(mz)) * (x1 - x0)
        # the label in the corner away from the mark (it always fits the panel, whatever the mark's position)
        anchor, tx = ("start", x0) if x > width / 2 else ("end", x1)
        parts.append(f'<g class="sel {cls}"><line x1="{x:.1f}" x2="{x:.1f}" y1="4" y2="{base}" stroke="#1f57c3" '
                     f'stroke-width="2"/><text x="{tx:.1f}" y="12" font-size="10" text-anchor="{anchor}" '
                     f'fill="#1f57c3">{_e(label)}</text></g>')
    parts.append("</svg>")
    return "".join(parts)
