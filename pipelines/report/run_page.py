"""The ``spike-audit run`` page: the loss curve with its spikes, then per spike its verdict, its window's signals
against the controls, and the rows that carry the anomaly."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spike_audit.pipelines.report.charts import CSS, _badge, _e, _score, loss_svg, signal_strip_svg
from spike_audit.pipelines.report.loss_strip import loss_strip_svg, model_summary_html


def _evidence_of(batch_scores: pa.Table, role: str, spike_id: str | None = None) -> list[tuple[int, dict]]:
    t = batch_scores.filter(pc.equal(batch_scores.column("role"), role))
    if spike_id is not None:
        t = t.filter(pc.equal(t.column("spike_id"), spike_id))
    return [(r["step"], {f["name"]: f for f in r["families"]}) for r in t.to_pylist()]


def _p(x) -> str:
    return f"{x:.3g}" if x is not None else ""


def render_run_report(loss: pa.Table, spikes: pa.Table, tables: dict[str, pa.Table], cfg) -> str:
    verdicts = {v["spike_id"]: v for v in tables["verdicts"].to_pylist()}
    member_of = {m: v for v in verdicts.values() for m in (v.get("spikes") or [v["spike_id"]])}
    bs = tables["batch_scores"]
    flags = tables["row_flags"].to_pylist()
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>spike-audit: {_e(cfg.log)}</title>"
             f"<style>{CSS}</style></head><body>"]
    counts = {}
    for v in verdicts.values():
        counts[v["verdict"]] = counts.get(v["verdict"], 0) + 1
    parts.append(f"<h1>spike-audit report</h1><p class='muted'>log <code>{_e(cfg.log)}</code> &middot; manifest "
                 f"<code>{_e(cfg.manifest)}</code> &middot; shards <code>{_e(cfg.shards)}</code></p>")
    parts.append("<p>" + f"{spikes.num_rows} spikes detected, {len(verdicts)} events audited; verdicts: " +
                 ", ".join(f"{_badge(k)} {n}" for k, n in sorted(counts.items())) + "</p>")

    parts.append("<h2>Loss curve</h2>")
    for metric in (cfg.metric, "grad_norm"):
        t = loss.filter(pc.equal(loss.column("metric"), metric))
        if not t.num_rows:
            continue
        steps = np.asarray(t.column("step"), dtype=np.int64)
        vals = np.asarray(t.column("value"), dtype=np.float64)
        sp = spikes.filter(pc.equal(spikes.column("metric"), metric)).to_pylist()
        marks = []
        for s in sp:
            v = member_of.get(s["spike_id"], {})
            marks.append((s["peak_step"], s["peak_value"], v.get("verdict"),
                          f"{s['spike_id']}: {v.get('verdict', 'not audited')}"
                          + (f" (event {v['spike_id']})" if v and v["spike_id"] != s["spike_id"] else "")))
        parts.append(loss_svg(steps, vals, marks, title=f"{metric} ({t.num_rows} steps)"))
    parts.append("<p class='legend'>" + "".join(
        f"<span>{_badge(k)}</span>" for k in ("data", "not_data", "inconclusive")) + "</p>")

    has_model = any(v.get("model_verdict") is not None for v in verdicts.values())
    parts.append("<h2>Verdicts</h2><table><tr><th>event</th><th>peak step</th><th>verdict</th><th>p</th>"
                 "<th>rows</th><th>top signal</th><th>top shards</th><th>reason</th>"
                 + ("<th>model verdict (per-row losses)</th>" if has_model else "") + "</tr>")
    for v in sorted(verdicts.values(), key=lambda v: (v["peak_step"], v["spike_id"])):
        rows = (f"{v['anomalous_rows']}/{v['n_rows']} (controls: at most {v['control_max_rows']})"
                if v["anomalous_rows"] is not None else "")
        model = (f"<td>{_badge(v.get('model_verdict')) if v.get('model_verdict') else ''} "
                 f"{_e(v.get('model_reason'))}</td>" if has_model else "")
        parts.append(f"<tr><td><a href='#{_e(v['spike_id'])}'>{_e(v['spike_id'])}</a></td><td>{v['peak_step']}</td>"
                     f"<td>{_badge(v['verdict'])}</td><td>{_p(v['p_value'])}</td><td>{_e(rows)}</td>"
                     f"<td>{_e(v['top_signal'])}</td>"
                     f"<td>{'<br>'.join(_e(s) for s in v['top_shards'])}</td><td>{_e(v['reason'])}</td>{model}</tr>")
    parts.append("</table>")

    controls = _evidence_of(bs, "control")
    parts.append(f"<h2>Events in detail</h2><p class='muted'>{len(controls)} control steps. Evidence = -log10 of "
                 f"the binomial tail of a step's anomalous rows at the natural rate of such rows in the control "
                 f"rows (controls leave-one-out).</p>")
    for v in sorted(verdicts.values(), key=lambda v: (v["peak_step"], v["spike_id"])):
        sid = v["spike_id"]
        win = _evidence_of(bs, "window", sid)
        peaks = ", ".join(f"{p['metric']} at {p['step']}" for p in (v.get("peaks") or []))
        model = (f" &middot; model {_badge(v['model_verdict'])}" if v.get("model_verdict") else "")
        parts.append(f"<div class='card' id='{_e(sid)}'><h3>{_e(sid)} data {_badge(v['verdict'])}{model}</h3>"
                     f"<p class='muted'>window steps {v.get('window_start')}..{v.get('window_end')}; peaks: "
                     f"{_e(peaks)}</p><p>{_e(v['reason'])}</p>")
        if v.get("model_verdict"):
            parts.append(f"<p><b>Model:</b> {_e(v.get('model_reason'))}</p>{model_summary_html(v)}")
            if tables.get("loss_rows") is not None:
                parts.append(loss_strip_svg(tables["loss_rows"], sid, v.get("model_step")))
        if win:
            names = sorted({n for _, d in win for n in d})
            best = {n: max((d[n]["evidence"] for _, d in win if n in d), default=0.0) for n in names}
            top = sorted(names, key=lambda n: (-best[n], n))[:10]
            rows = [(n, best[n], [d[n]["evidence"] if n in d else 0.0 for _, d in controls]) for n in top]
            parts.append(signal_strip_svg(rows, label="evidence", lo=0.0))
        mine = sorted((f for f in flags if f["spike_id"] == sid), key=lambda f: (-f["score"], f["step"], f["shard"],
                                                                               f["row"]))
        if mine:
            parts.append(f"<p><b>Flagged rows</b> ({len(mine)} in all over "
                         f"{len({f['step'] for f in mine})} steps; the first 8):</p>")
            for f in mine[:8]:
                parts.append(f"<div><code>{_e(f['shard'])}</code> {_e(f['unit'])} {f['row']} (step {f['step']}, "
                             f"evidence {_score(f['score'])}: {_e(', '.join(f['signals']))})"
                             f"<pre>{_e(f['excerpt'] if f['excerpt'] is not None else '(no text)')}</pre></div>")
        parts.append("</div>")

    ss = tables["shard_scores"].to_pylist()[:15]
    if ss:
        parts.append("<h2>Shards (audited rows only), most anomalous first</h2><table><tr><th>rank</th><th>shard</th>"
                     "<th>evidence</th><th>reason</th><th>rows</th><th>tokens</th></tr>")
        for r in ss:
            parts.append(f"<tr><td>{r['rank']}</td><td>{_e(r['shard'])}</td><td>{r['anomaly_score']:.1f}</td>"
                         f"<td>{_e(r['reason'])}</td><td>{r['n_rows']}</td><td>{r['n_tokens']}</td></tr>")
        parts.append("</table>")
    parts.append("<p class='muted'>Generated by spike-audit. Tables: spikes, batch_scores, shard_scores, row_flags, "
                 "verdicts" + (", loss_rows" if tables.get("loss_rows") is not None else "") +
                 " (Parquet, schemas in docs/schemas.md).</p></body></html>")
    return "\n".join(parts)
