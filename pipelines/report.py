"""Self-contained HTML reports (inline SVG, no scripts, no network): open the file in any browser."""

from __future__ import annotations

import html
import math
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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


def signal_strip_svg(rows: list[tuple[str, float, list[float]]], width: int = 640) -> str:
    """One line per signal: control steps as grey ticks, the window step as a red diamond, on a
    per-signal axis scaled to the controls' range and the window value."""
    h = 22 * len(rows) + 26
    L, R = 190, 70
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" style="background:#fff">']
    parts.append(f'<text x="{L}" y="14" font-size="11" fill="#666">controls (grey) vs spike window (red); '
                 f'label = robust z</text>')
    for k, (name, z, ctrl_z) in enumerate(rows):
        y = 30 + 22 * k
        vals = [v for v in ctrl_z if math.isfinite(v)] + ([z] if math.isfinite(z) else [])
        span = max([abs(v) for v in vals] + [3.0])

        def px(v):
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


def _signals_of(batch_scores: pa.Table, role: str, spike_id: str | None = None) -> list[tuple[int, dict]]:
    t = batch_scores.filter(pc.equal(batch_scores.column("role"), role))
    if spike_id is not None:
        t = t.filter(pc.equal(t.column("spike_id"), spike_id))
    return [(r["step"], {s["name"]: s["z"] for s in r["signals"]}) for r in t.to_pylist()]


def render_run_report(loss: pa.Table, spikes: pa.Table, tables: dict[str, pa.Table], cfg) -> str:
    from spike_audit.pipelines.run import attributed

    verdicts = {v["spike_id"]: v for v in tables["verdicts"].to_pylist()}
    bs = tables["batch_scores"]
    flags = tables["row_flags"].to_pylist()
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>spike-audit: {_e(cfg.log)}</title>"
             f"<style>{CSS}</style></head><body>"]
    counts = {}
    for v in verdicts.values():
        counts[v["verdict"]] = counts.get(v["verdict"], 0) + 1
    parts.append(f"<h1>spike-audit report</h1><p class='muted'>log <code>{_e(cfg.log)}</code> &middot; manifest "
                 f"<code>{_e(cfg.manifest)}</code> &middot; shards <code>{_e(cfg.shards)}</code></p>")
    parts.append("<p>" + f"{spikes.num_rows} spikes detected; verdicts: " +
                 ", ".join(f"{_badge(k)} {n}" for k, n in sorted(counts.items())) + "</p>")

    parts.append("<h2>Loss curve</h2>")
    for metric in (cfg.metric, "grad_norm"):
        t = loss.filter(pc.equal(loss.column("metric"), metric))
        if not t.num_rows:
            continue
        steps = np.asarray(t.column("step"), dtype=np.int64)
        vals = np.asarray(t.column("value"), dtype=np.float64)
        sp = spikes.filter(pc.equal(spikes.column("metric"), metric)).to_pylist()
        marks = [(s["peak_step"], s["peak_value"], verdicts.get(s["spike_id"], {}).get("verdict"),
                  f"{s['spike_id']}: {verdicts.get(s['spike_id'], {}).get('verdict', 'not audited')}") for s in sp]
        parts.append(loss_svg(steps, vals, marks, title=f"{metric} ({t.num_rows} steps)"))
    parts.append("<p class='legend'>" + "".join(
        f"<span>{_badge(k)}</span>" for k in ("data", "not_data", "inconclusive")) + "</p>")

    parts.append("<h2>Verdicts</h2><table><tr><th>spike</th><th>peak step</th><th>verdict</th><th>p</th>"
                 "<th>effect</th><th>top signal</th><th>top shards</th><th>reason</th></tr>")
    for v in sorted(verdicts.values(), key=lambda v: (v["peak_step"], v["spike_id"])):
        p = f"{v['p_value']:.3g}" if v["p_value"] is not None else ""
        e = _signed(v["effect_size"]) if v["effect_size"] is not None else ""
        parts.append(f"<tr><td><a href='#{_e(v['spike_id'])}'>{_e(v['spike_id'])}</a></td><td>{v['peak_step']}</td>"
                     f"<td>{_badge(v['verdict'])}</td><td>{p}</td><td>{e}</td><td>{_e(v['top_signal'])}</td>"
                     f"<td>{'<br>'.join(_e(s) for s in v['top_shards'])}</td><td>{_e(v['reason'])}</td></tr>")
    parts.append("</table>")

    controls = _signals_of(bs, "control")
    parts.append(f"<h2>Spikes in detail</h2><p class='muted'>{len(controls)} control steps.</p>")
    for v in sorted(verdicts.values(), key=lambda v: (v["peak_step"], v["spike_id"])):
        sid = v["spike_id"]
        win = _signals_of(bs, "window", sid)
        parts.append(f"<div class='card' id='{_e(sid)}'><h3>{_e(sid)} {_badge(v['verdict'])}</h3>"
                     f"<p>{_e(v['reason'])}</p>")
        if win:
            names = sorted({n for _, d in win for n in d})
            best = {n: max((d.get(n) for _, d in win if d.get(n) is not None), key=abs, default=float("nan"))
                    for n in names}
            top = sorted(names, key=lambda n: -abs(best[n]) if math.isfinite(best[n]) else 0)[:10]
            rows = [(n, best[n], [d.get(n) if d.get(n) is not None else float("nan") for _, d in controls])
                    for n in top]
            parts.append(signal_strip_svg(rows))
        all_mine = [f for f in flags if f["spike_id"] == sid]
        carriers = attributed(all_mine, v.get("top_step"), v.get("top_signal")) if v["verdict"] == "data" else []
        rest = sorted((f for f in all_mine if f not in carriers), key=lambda f: (-f["score"], f["shard"], f["row"]))
        mine = (carriers + rest)[:8]
        if mine:
            parts.append(f"<p><b>Flagged rows</b> ({len(all_mine)} in all; {len(carriers)} carry the verdict's "
                         f"top signal at step {v.get('top_step')}, shown first):</p>")
            for f in mine:
                parts.append(f"<div><code>{_e(f['shard'])}</code> {_e(f['unit'])} {f['row']} (step {f['step']}, "
                             f"score {_score(f['score'])}: {_e(', '.join(f['signals']))})"
                             f"<pre>{_e(f['excerpt'] if f['excerpt'] is not None else '(no text)')}</pre></div>")
        parts.append("</div>")

    ss = tables["shard_scores"].to_pylist()[:15]
    if ss:
        parts.append("<h2>Shards (audited rows only), most anomalous first</h2><table><tr><th>rank</th><th>shard</th>"
                     "<th>score</th><th>reason</th><th>rows</th><th>tokens</th></tr>")
        for r in ss:
            parts.append(f"<tr><td>{r['rank']}</td><td>{_e(r['shard'])}</td><td>{r['anomaly_score']:.1f}</td>"
                         f"<td>{_e(r['reason'])}</td><td>{r['n_rows']}</td><td>{r['n_tokens']}</td></tr>")
        parts.append("</table>")
    parts.append("<p class='muted'>Generated by spike-audit. Tables: spikes, batch_scores, shard_scores, row_flags, "
                 "verdicts (Parquet, schemas in docs/schemas.md).</p></body></html>")
    return "\n".join(parts)


def render_shard_report(tables: dict[str, pa.Table], bad: list[dict], cfg, excerpts: dict[str, list[str]]) -> str:
    """Shard audit: the distribution of every signal across shards, the worst shards with reasons
    and excerpts, cross-shard duplicate clusters, and the shards that could not be read."""
    scores = tables["shard_scores"].to_pylist()
    dups = tables["duplicates"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>spike-audit shards</title>"
             f"<style>{CSS}</style></head><body><h1>spike-audit shard audit</h1>"
             f"<p class='muted'>{len(scores)} shards audited from {_e(', '.join(cfg.inputs))}; quarantine at "
             f"anomaly score &ge; {cfg.quarantine_z:g}.</p>"]
    worst = [r for r in scores if r["anomaly_score"] >= cfg.quarantine_z]
    parts.append(f"<p><b>{len(worst)}</b> shards above the threshold, <b>{len(bad)}</b> unreadable.</p>")
    parts.append("<h2>Most anomalous shards</h2><table><tr><th>rank</th><th>shard</th><th>score</th><th>reason</th>"
                 "<th>rows</th><th>tokens</th><th>excerpt</th></tr>")
    for r in scores[:15]:
        ex = "".join(f"<pre>{_e(t)}</pre>" for t in excerpts.get(r["shard"], []))
        flag = " style='background:#fff0f0'" if r["anomaly_score"] >= cfg.quarantine_z else ""
        parts.append(f"<tr{flag}><td>{r['rank']}</td><td>{_e(r['shard'])}</td><td>{_score(r['anomaly_score'])}</td>"
                     f"<td>{_e(r['reason'])}</td><td>{r['n_rows']}</td><td>{r['n_tokens']}</td><td>{ex}</td></tr>")
    parts.append("</table>")
    if scores:
        names = sorted({s["name"] for r in scores for s in r["signals"]})
        parts.append("<h2>Signal distributions across shards</h2><p class='muted'>Each tick is a shard's robust z; "
                     "red diamonds mark the shards above the threshold.</p>")
        rows = []
        for n in names:
            zs = [next((s["z"] for s in r["signals"] if s["name"] == n), None) for r in scores]
            zs = [z if z is not None else float("nan") for z in zs]
            worst_z = [z for r, z in zip(scores, zs) if r["anomaly_score"] >= cfg.quarantine_z and math.isfinite(z)]
            top = max(worst_z, key=abs) if worst_z else float("nan")
            if any(math.isfinite(z) for z in zs):
                rows.append((n, top, [z for z in zs if math.isfinite(z) and (not worst_z or z not in worst_z)]))
        parts.append(signal_strip_svg(rows, width=760))
    if dups.num_rows:
        summary = dups.group_by(["cluster_id", "kind"]).aggregate([("n_members", "max"), ("n_shards", "max")])
        summary = summary.sort_by([("n_members_max", "descending"), ("cluster_id", "ascending")]).to_pylist()[:20]
        parts.append(f"<h2>Duplicate clusters spanning shards</h2><p>{len(set(dups.column('cluster_id').to_pylist()))}"
                     " clusters (the largest below).</p><table><tr><th>cluster</th><th>kind</th><th>rows</th>"
                     "<th>shards</th></tr>")
        for c in summary:
            parts.append(f"<tr><td>{_e(c['cluster_id'])}</td><td>{_e(c['kind'])}</td><td>{c['n_members_max']}</td>"
                         f"<td>{c['n_shards_max']}</td></tr>")
        parts.append("</table>")
    if bad:
        parts.append("<h2>Unreadable shards</h2><table><tr><th>shard</th><th>error</th></tr>" + "".join(
            f"<tr><td>{_e(b['shard'])}</td><td>{_e(b['error'])}</td></tr>" for b in bad) + "</table>")
    parts.append("<p class='muted'>Generated by spike-audit. Tables: shard_scores, duplicates (Parquet, schemas in "
                 "docs/schemas.md).</p></body></html>")
    return "\n".join(parts)


def _signed(x: float) -> str:
    return f"{x:+.1f}" if abs(x) < 1e4 else ("&gt; +1e4" if x > 0 else "&lt; -1e4")


def _score(x: float) -> str:
    return f"{x:.1f}" if x < 1e4 else "&gt;1e4"
