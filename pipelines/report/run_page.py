"""The ``spike-audit run`` page: the loss curve with its spikes, then per spike its verdict, its window's signals
against the controls, and the rows that carry the anomaly."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spike_audit.pipelines.report.charts import (CSS, ControlStrips, _badge, _e, evidence_strip_svg, fmt_num, fmt_pct,
                                                 loss_svg)
from spike_audit.pipelines.report.loss_strip import loss_strip_svg, model_summary_html


def _evidence_of(batch_scores: pa.Table, role: str, spike_id: str | None = None) -> list[tuple[int, dict]]:
    t = batch_scores.filter(pc.equal(batch_scores.column("role"), role))
    if spike_id is not None:
        t = t.filter(pc.equal(t.column("spike_id"), spike_id))
    return [(r["step"], {f["name"]: f for f in r["families"]}) for r in t.to_pylist()]


def _p(x) -> str:
    return fmt_num(x) if x is not None else ""


#: Flagged rows shown per event (all of them are in row_flags.parquet) and characters of each excerpt.
ROWS_SHOWN = 4
EXCERPT_CHARS = 240
#: Families drawn per event (the strongest; every family's evidence is in batch_scores.parquet).
STRIP_FAMILIES = 6
#: Families named per flagged row.
SIGNALS_NAMED = 4


def _names(signals: list[str]) -> str:
    more = len(signals) - SIGNALS_NAMED
    return ", ".join(signals[:SIGNALS_NAMED]) + (f" and {more} more" if more > 0 else "")


def _by_spike(t: pa.Table | None) -> dict[str, pa.Table]:
    """A table split by ``spike_id`` in one sort (not one filter of the whole table per event)."""
    if t is None or t.num_rows == 0:
        return {}
    t = t.sort_by([("spike_id", "ascending")])
    ids = np.asarray(t.column("spike_id").to_pylist(), dtype=object)
    cut = np.r_[0, np.flatnonzero(ids[1:] != ids[:-1]) + 1, len(ids)]
    return {ids[a]: t.slice(a, b - a) for a, b in zip(cut[:-1].tolist(), cut[1:].tolist())}


def _strongest_flags(row_flags: pa.Table, k: int) -> dict[str, tuple[int, int, list[dict]]]:
    """Per event: (flagged rows, their distinct steps, the ``k`` strongest rows: score descending, then step, shard,
    row), computed in Arrow (an event may flag thousands of rows; only ``k`` become Python objects)."""
    if row_flags.num_rows == 0:
        return {}
    t = row_flags.filter(pc.is_valid(row_flags.column("spike_id")))
    stats = t.group_by("spike_id").aggregate([("row", "count"), ("step", "count_distinct")]).to_pylist()
    order = pc.sort_indices(t, sort_keys=[("spike_id", "ascending"), ("score", "descending"), ("step", "ascending"),
                                          ("shard", "ascending"), ("row", "ascending")])
    ids = np.asarray(t.column("spike_id").take(order).to_pylist(), dtype=object)
    first = np.r_[0, np.flatnonzero(ids[1:] != ids[:-1]) + 1] if len(ids) else np.zeros(0, np.int64)
    rank = np.arange(len(ids)) - np.repeat(first, np.diff(np.r_[first, len(ids)]))
    top = t.take(pa.array(np.asarray(order)[rank < k])).to_pylist()
    out = {r["spike_id"]: (r["row_count"], r["step_count_distinct"], []) for r in stats}
    for f in top:
        out[f["spike_id"]][2].append(f)
    return out


def render_run_report(loss: pa.Table, spikes: pa.Table, tables: dict[str, pa.Table], cfg) -> str:
    verdicts = {v["spike_id"]: v for v in tables["verdicts"].to_pylist()}
    member_of = {m: v for v in verdicts.values() for m in (v.get("spikes") or [v["spike_id"]])}
    bs = tables["batch_scores"]
    flags = _strongest_flags(tables["row_flags"], ROWS_SHOWN)
    loss_by = _by_spike(tables.get("loss_rows"))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\"><meta name='viewport' content='width=device-width, initial-scale=1'><title>spike-audit: {_e(cfg.log)}</title>"
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
        rows = (f"{fmt_num(v['anomalous_rows'])}/{fmt_num(v['n_rows'])} (controls: at most "
                f"{fmt_num(v['control_max_rows'])})"
                if v["anomalous_rows"] is not None else "")
        model = (f"<td>{_badge(v.get('model_verdict')) if v.get('model_verdict') else ''} "
                 f"{_e(v.get('model_reason'))}</td>" if has_model else "")
        parts.append(f"<tr><td class='id'><a href='#{_e(v['spike_id'])}'>{_e(v['spike_id'])}</a></td><td class='n'>{v['peak_step']}</td>"
                     f"<td>{_badge(v['verdict'])}</td><td class='n'>{_p(v['p_value'])}</td><td>{_e(rows)}</td>"
                     f"<td>{_e(v['top_signal'])}</td>"
                     f"<td class='id'>{'<br>'.join(_e(s) for s in v['top_shards'])}</td><td>{_e(v['reason'])}</td>{model}</tr>")
    parts.append("</table>")

    controls = _evidence_of(bs, "control")
    windows: dict[str, list[tuple[int, dict]]] = {}
    for r in bs.filter(pc.equal(bs.column("role"), "window")).select(["spike_id", "step", "families"]).to_pylist():
        windows.setdefault(r["spike_id"], []).append((r["step"], {f["name"]: f for f in r["families"]}))
    strips = ControlStrips([d for _, d in controls])
    parts.append(f"<h2>Events in detail</h2><p class='muted'>{len(controls)} control steps. Evidence = -log10 of "
                 f"the binomial tail of a step's anomalous rows at the natural rate of such rows in the control "
                 f"rows (controls leave-one-out), capped at 300. The strips share one axis, linear from 0 to 1 and "
                 f"logarithmic above (0, 1, 3, 10, ... 300): the controls' spread (grey histogram) and the window's "
                 f"value (red, printed beside it with how many controls it exceeds) are both visible.</p>")
    for v in sorted(verdicts.values(), key=lambda v: (v["peak_step"], v["spike_id"])):
        sid = v["spike_id"]
        win = windows.get(sid, [])
        peaks = ", ".join(f"{p['metric']} at {p['step']}" for p in (v.get("peaks") or []))
        model = (f" &middot; model {_badge(v['model_verdict'])}" if v.get("model_verdict") else "")
        parts.append(f"<div class='card' id='{_e(sid)}'><h3>{_e(sid)} {_badge(v['verdict'])}{model}</h3>"
                     f"<p class='muted'>window steps {v.get('window_start')}..{v.get('window_end')}; peaks: "
                     f"{_e(peaks)}</p><p>{_e(v['reason'])}</p>")
        if v.get("model_verdict"):
            parts.append(f"<p><b>Model:</b> {_e(v.get('model_reason'))}</p>{model_summary_html(v)}")
            if sid in loss_by:
                parts.append(loss_strip_svg(loss_by[sid], sid, v.get("model_step")))
        if win:
            names = sorted({n for _, d in win for n in d})
            best = {n: max((d[n]["evidence"] for _, d in win if n in d), default=0.0) for n in names}
            top = sorted(names, key=lambda n: (-best[n], n))[:STRIP_FAMILIES]
            parts.append(evidence_strip_svg([(n, best[n]) for n in top], strips))
        n_flags, n_steps, mine = flags.get(sid, (0, 0, []))
        if mine:
            parts.append(f"<p><b>Flagged rows</b> ({fmt_num(n_flags)} in all over {fmt_num(n_steps)} steps; the "
                         f"strongest {len(mine)}, every one in row_flags.parquet):</p>")
            for f in mine:
                text = f["excerpt"] if f["excerpt"] is not None else "(no text)"
                more = "\u2026" if len(text) > EXCERPT_CHARS else ""
                parts.append(f"<div><code>{_e(f['shard'])}</code> {_e(f['unit'])} {fmt_num(f['row'])} (step "
                             f"{f['step']}, evidence {fmt_num(f['score'])}, natural rate {fmt_pct(f['natural_rate'])}: "
                             f"{_e(_names(f['signals']))})<pre>{_e(text[:EXCERPT_CHARS])}{more}</pre></div>")
        parts.append("</div>")

    ss = tables["shard_scores"].slice(0, 15).to_pylist()
    if ss:
        parts.append("<h2>Shards (audited rows only), most anomalous first</h2><table><tr><th>rank</th><th>shard</th>"
                     "<th>evidence</th><th>reason</th><th>rows</th><th>tokens</th></tr>")
        for r in ss:
            parts.append(f"<tr><td class='n'>{r['rank']}</td><td class='id'>{_e(r['shard'])}</td>"
                         f"<td class='n'>{fmt_num(r['anomaly_score'])}</td><td>{_e(r['reason'])}</td>"
                         f"<td class='n'>{fmt_num(r['n_rows'])}</td><td class='n'>{fmt_num(r['n_tokens'])}</td></tr>")
        parts.append("</table>")
    parts.append(strips.defs())
    parts.append("<p class='muted'>Generated by spike-audit. Tables: spikes, batch_scores, shard_scores, row_flags, "
                 "verdicts" + (", loss_rows" if tables.get("loss_rows") is not None else "") +
                 " (Parquet, schemas in docs/schemas.md).</p></body></html>")
    return "\n".join(parts)
