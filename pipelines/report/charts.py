"""What both pages share: the style sheet, HTML escaping, verdict badges, number formats, and the inline SVG charts
(the loss curve with its spikes, signal strips)."""

from __future__ import annotations

import html
import math
from typing import Sequence
import numpy as np


COLORS = {"data": "#d62728", "not_data": "#1f77b4", "inconclusive": "#7f7f7f", None: "#bcbd22"}


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:18px 0 6px} .muted{color:#666} table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top} th{background:#f5f5f5}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;font-size:12px}
pre{background:#f7f7f7;border:1px solid #e3e3e3;padding:6px;white-space:pre-wrap;word-break:break-all;
max-height:120px;overflow:hidden;font-size:12px;margin:4px 0} .legend span{margin-right:14px}
.card{border:1px solid #e3e3e3;border-radius:6px;padding:10px 14px;margin:12px 0}
"""


def _e(x) -> str:
    return html.escape("" if x is None else str(x))


def _badge(verdict) -> str:
    return f'<span class="badge" style="background:{COLORS.get(verdict, "#999")}">{_e(verdict or "not audited")}</span>'


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
    xs, ys = _downsample(steps[ok], values[ok])
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
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{_e(title)}" style="background:#fff;border:1px solid #eee">']
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        parts.append(f'<line x1="{L}" x2="{width - R}" y1="{py(v):.1f}" y2="{py(v):.1f}" stroke="#eee"/>'
                     f'<text x="{L - 6}" y="{py(v) + 4:.1f}" font-size="11" text-anchor="end" fill="#666">{v:.2f}</text>')
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


def signal_strip_svg(rows: list[tuple[str, float, list[float]]], width: int = 640, label: str = "robust z",
                     lo: float | None = None) -> str:
    """One line per signal: control steps as grey ticks, the window step as a red diamond, on a
    per-signal axis scaled to the controls' range and the window value (from ``lo`` when given, else
    symmetric around 0)."""
    h = 22 * len(rows) + 26
    L, R = 190, 70
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" style="background:#fff">']
    parts.append(f'<text x="{L}" y="14" font-size="11" fill="#666">controls (grey) vs spike window (red); '
                 f'label = {_e(label)}</text>')
    for k, (name, z, ctrl_z) in enumerate(rows):
        y = 30 + 22 * k
        vals = [v for v in ctrl_z if math.isfinite(v)] + ([z] if math.isfinite(z) else [])
        span = max([abs(v) for v in vals] + [3.0])

        def px(v, span=span):
            if lo is not None:
                return L + (v - lo) / max(span - lo, 1e-9) * (width - L - R)
            return L + (v + span) / (2 * span) * (width - L - R)

        parts.append(f'<text x="{L - 8}" y="{y + 4}" font-size="12" text-anchor="end">{_e(name)}</text>'
                     f'<line x1="{L}" x2="{width - R}" y1="{y}" y2="{y}" stroke="#ddd"/>'
                     f'<line x1="{px(0):.1f}" x2="{px(0):.1f}" y1="{y - 7}" y2="{y + 7}" stroke="#aaa"/>')
        for v in ctrl_z:
            if math.isfinite(v):
                parts.append(f'<line x1="{px(v):.1f}" x2="{px(v):.1f}" y1="{y - 5}" y2="{y + 5}" stroke="#888" '
                             f'stroke-opacity="0.5"/>')
        if math.isfinite(z):
            x = px(z)
            parts.append(f'<path d="M{x:.1f},{y - 7} l6,7 l-6,7 l-6,-7 z" fill="#d62728"/>'
                         f'<text x="{width - R + 6}" y="{y + 4}" font-size="11">{_signed(z)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _signed(x: float) -> str:
    return f"{x:+.1f}" if abs(x) < 1e4 else ("&gt; +1e4" if x > 0 else "&lt; -1e4")


def _score(x: float) -> str:
    return f"{x:.1f}" if x < 1e4 else "&gt;1e4"
