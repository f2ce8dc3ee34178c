"""Report pieces of the model-based verdict: the per-row loss strip and the verdict's summary line."""

from __future__ import annotations

import html

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MAX_DOTS = 256  # rows drawn one by one per step; above it, the band plus the rows outside it


def _e(x) -> str:
    return html.escape("" if x is None else str(x))


def loss_strip_svg(loss_rows: pa.Table, spike_id: str, model_step=None, width: int = 760,
                   max_baseline: int = 16) -> str:
    """One line per step, baseline steps (grey) above the window steps: every row's loss as a dot
    (flagged rows red, loss outliers ringed), the step's 5-95% band and median. Empty string when the
    spike has no per-row losses."""
    t = loss_rows.filter(pc.equal(loss_rows.column("spike_id"), spike_id))
    if t.num_rows == 0:
        return ""
    step = np.asarray(t.column("step").to_numpy(), np.int64)
    role = np.asarray(t.column("role").to_pylist(), dtype=object)
    loss = np.asarray(t.column("loss").to_numpy(zero_copy_only=False), np.float64)
    flag = np.asarray(t.column("flagged").to_numpy(zero_copy_only=False), bool)
    out = np.asarray(t.column("outlier").to_numpy(zero_copy_only=False), bool)
    base_steps = sorted(set(step[role == "baseline"].tolist()))
    if len(base_steps) > max_baseline:  # evenly spaced subset, always the same for the same table
        base_steps = [base_steps[i] for i in np.linspace(0, len(base_steps) - 1, max_baseline).round().astype(int)]
    win_steps = sorted(set(step[role == "window"].tolist()))
    lines = [(s, "baseline") for s in base_steps] + [(s, "window") for s in win_steps]
    ok = np.isfinite(loss)
    if not ok.any():
        return "<p class='muted'>No finite per-row losses.</p>"
    lo, hi = float(np.min(loss[ok])), float(np.max(loss[ok]))
    pad = 0.04 * ((hi - lo) or 1.0)
    lo, hi = lo - pad, hi + pad
    L, R, T = 150, 20, 22
    h = T + 16 * len(lines) + 30

    def px(v):
        return L + (v - lo) / (hi - lo) * (width - L - R)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" style="background:#fff">',
             f'<text x="{L}" y="13" font-size="11" fill="#666">per-row loss: baseline steps (grey) and window '
             f'steps (black); red = flagged by the signals, ringed = loss outlier; band 5-95%, tick = median</text>']
    for k, (s, r) in enumerate(lines):
        y = T + 10 + 16 * k
        sel = (step == s) & (role == r)
        v = loss[sel & ok]
        colour = "#999" if r == "baseline" else "#222"
        label = f"step {s}" + (" (judged)" if r == "window" and model_step is not None and s == model_step else "")
        parts.append(f'<text x="{L - 8}" y="{y + 4}" font-size="11" text-anchor="end" fill="{colour}">{_e(label)}</text>')
        if not len(v):
            continue
        q5, q50, q95 = np.quantile(v, [0.05, 0.5, 0.95])
        parts.append(f'<rect x="{px(q5):.1f}" y="{y - 4}" width="{max(1.0, px(q95) - px(q5)):.1f}" height="8" '
                     f'fill="{colour}" fill-opacity="0.15"/><line x1="{px(q50):.1f}" x2="{px(q50):.1f}" y1="{y - 6}" '
                     f'y2="{y + 6}" stroke="{colour}"/>')
        idx = np.flatnonzero(sel & ok)
        if len(idx) > MAX_DOTS:
            idx = idx[(loss[idx] < q5) | (loss[idx] > q95) | flag[idx] | out[idx]][: 4 * MAX_DOTS]
        for i in idx.tolist():  # bounded per step
            c = "#d62728" if flag[i] else colour
            ring = ' stroke="#d62728" stroke-width="1.2" fill-opacity="0.9"' if out[i] else ""
            parts.append(f'<circle cx="{px(loss[i]):.1f}" cy="{y}" r="{3 if out[i] else 2}" fill="{c}" '
                         f'fill-opacity="0.6"{ring}/>')
    ya = T + 16 * len(lines) + 12
    for k in range(6):
        v = lo + (hi - lo) * k / 5
        parts.append(f'<text x="{px(v):.1f}" y="{ya + 10}" font-size="10" text-anchor="middle" fill="#666">'
                     f'{v:.2f}</text>')
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
