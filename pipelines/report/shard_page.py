"""The ``spike-audit shards`` page: the ranked anomalous shards with their reasons and anomalous rows, each signal's
distribution across shards with a selected shard highlighted (TFDV's statistics view, one shard against the
corpus), duplicate clusters with their members, and the shards that could not be read.

The page's size is bounded whatever the number of shards: the tables show the top of each ranking (every row is
in the Parquet tables beside the report) and distributions are histograms."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spike_audit.pipelines.report.charts import CSS, _e, distribution_svg, fmt_num, fmt_pct, fmt_signed

#: Shards in the ranked table, shards one can select in the comparison, clusters listed, members per cluster.
TOP_SHARDS, PICKABLE, TOP_CLUSTERS, MEMBERS_SHOWN, BAD_SHOWN = 15, 10, 20, 8, 50
EXCERPT_CHARS = 240


def _excerpt_html(items) -> str:
    """A shard's excerpts: dicts (``row``, ``text``, ``signals``, ``score``: the anomalous rows) or plain texts."""
    out = []
    for it in items:
        if isinstance(it, dict):
            text = it.get("text")
            text = "(no text)" if text is None else str(text)
            head = f"row {fmt_num(it.get('row'))}"
            if it.get("signals"):
                head += f" &#183; {_e(', '.join(it['signals']))}"
            if it.get("score") is not None:
                head += f" &#183; evidence {fmt_num(it['score'])}"
            out.append(f"<div class='muted'>{head}</div>")
        else:
            text = str(it)
        more = "\u2026" if len(text) > EXCERPT_CHARS else ""
        out.append(f"<pre>{_e(text[:EXCERPT_CHARS])}{more}</pre>")
    return "".join(out)


def _signal_matrix(table: pa.Table) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Signal names and the shards x signals matrices of values and robust z (NaN where absent), in Arrow and
    numpy (no Python object per shard and signal)."""
    col = table.column("signals").combine_chunks()
    flat = col.flatten()
    if len(flat) == 0:
        return [], np.zeros((table.num_rows, 0)), np.zeros((table.num_rows, 0))
    owner = np.asarray(pc.list_parent_indices(col).to_numpy(zero_copy_only=False), np.int64)
    sig_names = flat.field("name")
    names = sorted(pc.unique(sig_names).to_pylist())
    j = np.asarray(pc.index_in(sig_names, value_set=pa.array(names)).to_numpy(zero_copy_only=False), np.int64)
    val = np.full((table.num_rows, len(names)), np.nan)
    z = np.full((table.num_rows, len(names)), np.nan)
    val[owner, j] = np.asarray(flat.field("value").to_numpy(zero_copy_only=False), np.float64)
    z[owner, j] = np.asarray(flat.field("z").to_numpy(zero_copy_only=False), np.float64)
    return names, val, z


def _comparison(table: pa.Table, scores: list[dict], q_names: set[str]) -> str:
    """Each signal's robust z across every shard (grey histogram, quarantined shards red), with a selected shard's
    value marked (blue); the selection is a radio button per top shard (CSS only, no script)."""
    names, val, z = _signal_matrix(table)
    if not names:
        return ""
    pick = scores[:PICKABLE]
    quarantined = np.asarray(pc.is_in(table.column("shard"), value_set=pa.array(sorted(q_names), pa.string()))
                             .to_numpy(zero_copy_only=False), dtype=bool)
    parts = ["<h2 id='compare'>Signal distributions across shards: one shard against the corpus</h2>",
             f"<p class='muted'>Each panel is one suite signal over all {fmt_num(table.num_rows)} shards: the shards' "
             f"robust z across shards as a grey histogram (quarantined shards in red) on a symmetric axis, linear "
             f"within &#177;1 and logarithmic beyond, so the bulk and a far outlier both show. Pick a shard to "
             f"mark it (blue) with its value, its z and the share of shards below it.</p>"]
    css = "".join(f"#pk{k}:checked~.grid .p{k}{{display:inline}}#pk{k}:checked+label{{font-weight:bold;"
                  f"color:#1f57c3}}" for k in range(len(pick)))
    parts.append(f"<style>{css}</style><div class='pick'>")
    for k, r in enumerate(pick):
        parts.append(f"<input type='radio' name='pick' id='pk{k}'{' checked' if k == 0 else ''}>"
                     f"<label for='pk{k}'>#{r['rank']} {_e(r['shard'])}</label>")
    parts.append("<div class='grid'>")
    # signals ordered by how far the top shard stands out, the most telling first
    top = np.abs(np.nan_to_num(z[0], nan=0.0)) if len(z) else np.zeros(len(names))
    for j in sorted(range(len(names)), key=lambda j: (-top[j], names[j])):
        zj = z[:, j]
        fin = np.isfinite(zj)
        if not fin.any():
            continue
        marks = []
        for k in range(len(pick)):
            if not math.isfinite(zj[k]):
                continue
            below = float(np.count_nonzero(zj[fin] < zj[k])) / float(np.count_nonzero(fin))
            marks.append((float(zj[k]), f"p{k}", f"{fmt_num(val[k, j])} (z {fmt_signed(zj[k])}, "
                                                  f"above {fmt_pct(below)})"))
        med = float(np.nanmedian(val[:, j]))
        parts.append(f"<div><b>{_e(names[j])}</b> <span class='muted'>median {_e(fmt_num(med))}</span>"
                     f"{distribution_svg(zj, zj[quarantined], marks)}</div>")
    parts.append("</div></div>")
    return "".join(parts)


def _clusters(dups: pa.Table, cluster_text: dict) -> str:
    n_clusters = len(pc.unique(dups.column("cluster_id")))
    summary = dups.group_by(["cluster_id", "kind"]).aggregate([("n_members", "max"), ("n_shards", "max")])
    summary = summary.sort_by([("n_members_max", "descending"), ("cluster_id", "ascending")]).slice(0, TOP_CLUSTERS)
    ids = summary.column("cluster_id")
    members = dups.filter(pc.is_in(dups.column("cluster_id"), value_set=ids)).sort_by(
        [("cluster_id", "ascending"), ("shard", "ascending"), ("row", "ascending")])
    by_id: dict[str, list[dict]] = {}
    shards_of: dict[str, list[str]] = {}
    for m in members.select(["cluster_id", "shard", "row"]).to_pylist():  # bounded: top clusters' members
        by_id.setdefault(m["cluster_id"], []).append(m)
        s = shards_of.setdefault(m["cluster_id"], [])
        if m["shard"] not in s:
            s.append(m["shard"])
    parts = [f"<h2 id='clusters'>Duplicate clusters spanning shards</h2><p>{fmt_num(n_clusters)} clusters; the "
             f"{min(n_clusters, TOP_CLUSTERS)} largest below with their members (all of them in "
             f"duplicates.parquet).</p><table><tr><th>cluster</th><th>kind</th><th>rows</th><th>shards</th>"
             f"<th>members (shard: row)</th><th>text</th></tr>"]
    for c in summary.to_pylist():
        cid = c["cluster_id"]
        ms = by_id.get(cid, [])
        shown = "<br>".join(f"<code>{_e(m['shard'])}</code>: {fmt_num(m['row'])}" for m in ms[:MEMBERS_SHOWN])
        if len(ms) > MEMBERS_SHOWN or c["n_members_max"] > len(ms):
            shown += f"<br><span class='muted'>and {fmt_num(c['n_members_max'] - min(len(ms), MEMBERS_SHOWN))} more</span>"
        sh = shards_of.get(cid, [])
        sh_txt = ", ".join(_e(s) for s in sh[:4]) + (f" and {fmt_num(c['n_shards_max'] - 4)} more"
                                                     if c["n_shards_max"] > 4 else "")
        text = cluster_text.get(cid)
        ex = _excerpt_html([text]) if text is not None else "<span class='muted'>(not read)</span>"
        parts.append(f"<tr><td><code>{_e(cid)}</code></td><td>{_e(c['kind'])}</td><td class='n'>"
                     f"{fmt_num(c['n_members_max'])}</td><td>{fmt_num(c['n_shards_max'])}: {sh_txt}</td>"
                     f"<td class='id'>{shown}</td><td class='ex'>{ex}</td></tr>")
    parts.append("</table>")
    return "".join(parts)


def render_shard_report(tables: dict[str, pa.Table], bad: list[dict], cfg, excerpts: dict[str, list],
                        quarantine: dict | None = None, cluster_text: dict[str, str] | None = None) -> str:
    """Shard audit: the worst shards with reasons and their anomalous rows (``tables["row_flags"]`` when the audit
    wrote it; ``excerpts``: shard -> more rows, each a dict with ``row``, ``text``, ``signals``, ``score``, or a
    plain text), every signal's distribution across
    shards with a selected shard marked, cross-shard duplicate clusters with members (``cluster_text``: cluster
    id -> a member's text), and the shards that could not be read. ``quarantine``: the quarantine decision
    (``quarantine.json``)."""
    quarantine = quarantine or {"shards": [], "threshold_evidence": float("inf")}
    cluster_text = cluster_text or {}
    excerpts = dict(excerpts or {})
    flags = tables.get("row_flags")
    if flags is not None and flags.num_rows:  # the anomalous rows the shard audit found (row_flags) come first
        for f in flags.sort_by([("shard", "ascending"), ("score", "descending"), ("row", "ascending")]).to_pylist():
            if len(excerpts.setdefault(f["shard"], [])) < 5:
                excerpts[f["shard"]].append({"row": f["row"], "text": f["excerpt"], "signals": f["signals"],
                                             "score": f["score"]})
    q_names = {q["shard"] for q in quarantine["shards"]}
    table = tables["shard_scores"]
    n_shards = table.num_rows
    # Python rows only for the top of the ranking and the quarantined shards (the rest stays in Arrow)
    scores = table.slice(0, max(TOP_SHARDS, PICKABLE)).drop_columns(["families", "signals"]).to_pylist()
    dups = tables["duplicates"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\"><meta name='viewport' "
             f"content='width=device-width, initial-scale=1'><title>spike-audit shards</title>"
             f"<style>{CSS}</style></head><body><h1>spike-audit shard audit</h1>"
             f"<p class='muted'>{fmt_num(n_shards)} shards audited from {_e(', '.join(cfg.inputs))}; evidence = "
             f"-log10 of the binomial tail of a shard's anomalous rows at the natural rate of such rows in the other "
             f"shards; quarantine at evidence &ge; {fmt_num(quarantine['threshold_evidence'])} with at least "
             f"{cfg.min_rows} rows.</p>"]
    parts.append(f"<p><b>{fmt_num(len(q_names))}</b> shards quarantined, <b>{fmt_num(len(bad))}</b> unreadable.</p>")
    flagged = any(isinstance(x, dict) for v in excerpts.values() for x in v)
    parts.append(f"<h2>Most anomalous shards</h2><p class='muted'>The top {min(TOP_SHARDS, n_shards)} of "
                 f"{fmt_num(n_shards)} (all of them in shard_scores.parquet); quarantined shards shaded."
                 + (" Rows: the shard's rows at its anomalous families' cuts (the rows the row-level evidence "
                    "counts), strongest first." if flagged else "") + "</p>"
                 "<table><tr><th>rank</th><th>shard</th><th>evidence</th><th>reason</th><th>rows</th><th>tokens</th>"
                 f"<th>{'anomalous rows' if flagged else 'rows'}</th></tr>")
    for r in scores[:TOP_SHARDS]:
        ex = _excerpt_html(excerpts.get(r["shard"], []))
        flag = " style='background:#fff0f0'" if r["shard"] in q_names else ""
        parts.append(f"<tr{flag}><td class='n'>{r['rank']}</td><td class='id'><code>{_e(r['shard'])}</code></td>"
                     f"<td class='n'>{fmt_num(r['anomaly_score'])}</td><td>{_e(r['reason'])}</td>"
                     f"<td class='n'>{fmt_num(r['n_rows'])}</td><td class='n'>{fmt_num(r['n_tokens'])}</td>"
                     f"<td class='ex'>{ex}</td></tr>")
    parts.append("</table>")
    if n_shards:
        parts.append(_comparison(table, scores, q_names))
    if dups.num_rows:
        parts.append(_clusters(dups, cluster_text))
    if bad:
        parts.append("<h2>Unreadable shards</h2><table><tr><th>shard</th><th>error</th></tr>" + "".join(
            f"<tr><td class='id'><code>{_e(b['shard'])}</code></td><td>{_e(b['error'])}</td></tr>" for b in bad[:BAD_SHOWN])
            + "</table>" + (f"<p class='muted'>and {fmt_num(len(bad) - BAD_SHOWN)} more (summary.json, "
                            f"quarantine.json)</p>" if len(bad) > BAD_SHOWN else ""))
    parts.append("<p class='muted'>Generated by spike-audit. Tables: shard_scores, duplicates"
                 + (", row_flags" if flags is not None else "") + " (Parquet, schemas in docs/schemas.md).</p>"
                 "</body></html>")
    return "\n".join(parts)
