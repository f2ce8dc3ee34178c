"""Report pieces of the model-based verdict: the per-row loss strip and the verdict's summary line."""

from __future__ import annotations

import html

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spike_audit.pipelines.report.charts import _svg_open, fmt_num

MAX_DOTS = 32  # flagged or outlier rows drawn one by one per window step (the most extreme losses first)


def _e(x) -> str:
    """Text for the page: HTML-escaped, and its control and bidirectional characters written as visible escapes
    (``\\x1b``, ``\\u202e``), as on the terminal: a right-to-left override in a shard name or an excerpt would
    otherwise reverse the tool's own text after it, and raw C0/C1 controls are HTML parse errors."""
    from spike_audit.pipelines.errors import printable

    return html.escape(printable("" if x is None else str(x)))


def loss_strip_svg(loss_rows: pa.Table, spike_id: str, model_step=None, width: int = 760,
                   max_baseline: int | None = None) -> str:
    """The baseline steps' rows pooled on one line (grey), then one line per window step (black): each line the
    rows' 5-95% band and median, with the rows that matter as dots: flagged by the signals (red), loss outliers
    (ringed) on the judged step (every step without a model step), counts on the others, at most
    :data:`MAX_DOTS` per line (so the strip's size does not grow with the batch). Empty string
    when the spike has no per-row losses. ``max_baseline`` is accepted for compatibility (the baseline is pooled)."""
    ids = loss_rows.column("spike_id")
    t = loss_rows if pc.all(pc.equal(ids, spike_id)).as_py() else loss_rows.filter(pc.equal(ids, spike_id))
    if t.num_rows == 0:
        return ""
    step = np.asarray(t.column("step").to_numpy(), np.int64)
    role = np.asarray(t.column("role").to_pylist(), dtype=object)
    loss = np.asarray(t.column("loss").to_numpy(zero_copy_only=False), np.float64)
    flag = np.asarray(t.column("flagged").to_numpy(zero_copy_only=False), bool)
    out = np.asarray(t.column("outlier").to_numpy(zero_copy_only=False), bool)
    ok = np.isfinite(loss)
    if not ok.any():
        return "<p class='muted'>No finite per-row losses.</p>"
    base = role == "baseline"
    n_base = len(set(step[base].tolist()))
    lines = ([(f"baseline ({n_base} steps)", base, "#999")] if base.any() else []) + [
        (f"step {s}" + (" (judged)" if model_step is not None and s == model_step else ""),
         (step == s) & (role == "window"), "#222") for s in sorted(set(step[role == "window"].tolist()))]
    lo, hi = float(np.min(loss[ok])), float(np.max(loss[ok]))
    pad = 0.04 * ((hi - lo) or 1.0)
    lo, hi = lo - pad, hi + pad
    L, R, T = 150, 20, 6
    h = T + 16 * len(lines) + 30

    def px(v):
        return L + (v - lo) / (hi - lo) * (width - L - R)

    parts = [f"<p class='muted'>Per-row loss: the baseline steps pooled (grey), the window steps (black); band "
             f"5-95%, tick = median; red = flagged by the signals, ringed = loss outlier.</p>",
             _svg_open(width, h, "per-row loss")]
    for k, (label, sel, colour) in enumerate(lines):
        y = T + 10 + 16 * k
        v = loss[sel & ok]
        parts.append(f'<text class="lbs" x="{L - 8}" y="{y + 4}" fill="{colour}">{_e(label)}</text>')
        if not len(v):
            continue
        q5, q50, q95 = np.quantile(v, [0.05, 0.5, 0.95])
        parts.append(f'<rect x="{px(q5):.1f}" y="{y - 4}" width="{max(1.0, px(q95) - px(q5)):.1f}" height="8" '
                     f'fill="{colour}" fill-opacity="0.15"/><path d="M{px(q50):.1f} {y - 6}v12" stroke="{colour}"/>')
        if colour == "#999" or (model_step is not None and not label.endswith("(judged)")):
            n_flag, n_out = int(np.count_nonzero(sel & flag)), int(np.count_nonzero(sel & out))
            if colour != "#999" and (n_flag or n_out):
                parts.append(f'<text class="cnt" x="{width - R}" y="{y + 4}">'
                             f'{n_flag} flagged, {n_out} outliers</text>')
            continue
        idx = np.flatnonzero(sel & ok & (flag | out))
        if len(idx) > MAX_DOTS:  # the most extreme losses first, the same for the same table
            idx = idx[np.lexsort((idx, -loss[idx]))[:MAX_DOTS]]
        for cls, pick, style in (("flag", flag[idx], 'stroke="#d62728" stroke-opacity="0.7" stroke-width="5"'),
                                 ("ring", out[idx], 'stroke="#d62728" stroke-width="1.2" fill="none"')):
            xs = [px(x) for x in loss[idx[pick]]]
            if not xs:
                continue
            if cls == "flag":
                d = "".join(f"M{x:.1f} {y}h0" for x in xs)
                parts.append(f'<path d="{d}" {style} stroke-linecap="round"/>')
            else:
                d = "".join(f"M{x - 3:.1f} {y}a3 3 0 1 0 6 0a3 3 0 1 0 -6 0" for x in xs)
                parts.append(f'<path d="{d}" {style}/>')
    ya = T + 16 * len(lines) + 12
    for k in range(6):
        v = lo + (hi - lo) * k / 5
        parts.append(f'<text class="tk" x="{px(v):.1f}" y="{ya + 10}">'
                     f'{_e(fmt_num(v))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def model_summary_html(v: dict) -> str:
    """The model-based verdict's numbers in one line (empty without one)."""
    if v.get("model_verdict") is None:
        return ""

    def pct(x):
        return f"{100 * x:.0f}%" if x is not None else "n/a"

    bits = [f"baseline {_e(v.get('model_baseline'))}"]
    if v.get("excess_loss") is not None:
        bits.append(f"excess {v['excess_loss']:+.3g} ({v['excess_z']:+.1f} sigma) at step {v.get('model_step')}"
                    if v.get("excess_z") is not None else f"excess {v['excess_loss']:+.3g}")
    if v.get("flagged_share") is not None:
        bits.append(f"flagged rows carry {pct(v['flagged_share'])} [{pct(v.get('flagged_share_lo'))}, "
                    f"{pct(v.get('flagged_share_hi'))}]")
    if v.get("breadth") is not None:
        lo, hi = v.get("breadth_lo"), v.get("breadth_hi")
        ci = f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else ""
        bits.append(f"breadth {v['breadth']:.2f}{ci}")
    if v.get("n_loss_outliers") is not None:
        bits.append(f"{v['n_loss_outliers']} loss outliers; precision {pct(v.get('flag_precision'))}, recall "
                    f"{pct(v.get('flag_recall'))}")
    return "<p class='muted'>" + " &middot; ".join(bits) + "</p>"
