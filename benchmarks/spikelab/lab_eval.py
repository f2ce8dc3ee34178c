"""Score the tool's outputs against a lab run's ground truth; pool the scores into one table.

Only the tool's documented output files are read (README "Outputs", docs/schemas.md):
``verdicts.parquet``, ``batch_scores.parquet`` (the window steps of each spike), ``spikes.parquet``,
``skip_list.json``, ``quarantine.json``, ``summary.json`` of ``spike-audit run``, and
``shard_scores.parquet``, ``quarantine.json`` of ``spike-audit shards``.

Matching: a tool spike belongs to the planted event whose steps (the planted steps, or for a normal
spike the steps its loss bump covers) overlap the spike's window steps or its flagged range
[start_step, end_step] the most. An event no tool spike overlaps is ``missed`` (not detected).
An event's verdict is ``data`` when every matched entry says ``data``, ``mixed`` when the entries
disagree, otherwise their common verdict.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from lab_plant import KINDS
from lab_run import DOSES


def _read(path: Path, columns=None):
    """Rows of a Parquet output as dicts (only the wanted columns the file has; [] without the file)."""
    if not path.exists():
        return []
    if columns is not None:
        have = set(pq.read_schema(path).names)
        columns = [c for c in columns if c in have]
    return pq.read_table(path, columns=columns).to_pylist()


def tool_spikes(audit: Path, lookback: int = 2) -> dict[str, dict]:
    """spike_id -> {verdict, window (set of steps), range (start, end), effect, margin, ...}."""
    verdicts = _read(audit / "verdicts.parquet")
    windows: dict[str, set] = defaultdict(set)
    for r in _read(audit / "batch_scores.parquet", columns=["step", "role", "spike_id"]):
        if r["role"] == "window" and r["spike_id"] is not None:
            windows[r["spike_id"]].add(int(r["step"]))
    ranges = {}
    for r in _read(audit / "spikes.parquet"):
        ranges[r["spike_id"]] = (int(r["start_step"]), int(r["end_step"] if r.get("end_step") is not None
                                                            else r["peak_step"]))
    out = {}
    for v in verdicts:
        sid = v["spike_id"]
        rng = ranges.get(sid, (int(v["peak_step"]), int(v["peak_step"])))
        win = windows.get(sid) or set(range(rng[0] - lookback, int(v["peak_step"]) + 1))
        out[sid] = {"verdict": v["verdict"], "window": win, "range": rng, "peak": int(v["peak_step"]),
                    "effect": v.get("effect_size"), "margin": v.get("margin"), "top_signal": v.get("top_signal"),
                    "top_step": v.get("top_step"), "reason": v.get("reason")}
    return out


def _skip_rows(audit: Path) -> tuple[dict[str, set], set]:
    """spike_id -> set of (shard, row) the skip list names; and the set of steps it says to skip."""
    p = audit / "skip_list.json"
    if not p.exists():
        return {}, set()
    sl = json.loads(p.read_text())
    by: dict[str, set] = {}
    for e in sl.get("spikes", []):
        rows = set()
        for d in e.get("skip_data", []):
            if d.get("unit", "row") == "row":
                rows |= {(d["shard"], r) for r in range(int(d["row_start"]), int(d["row_end"]))}
        by[e.get("spike_id", str(e.get("peak_step")))] = rows
    return by, set(int(s) for s in sl.get("steps_to_skip", []))


def _false_alarms(summary: dict):
    """The control false-alarm count, wherever the summary keeps it (None if it does not)."""
    cc = summary.get("control_calibration")
    if isinstance(cc, dict):
        for k in ("false_alarms", "n_false_alarms"):
            if k in cc:
                return int(cc[k]), int(cc.get("n_controls", 0) or 0)
    return None


def score_run(run_dir: Path, audit: Path, shard_audit: Path | None) -> dict:
    truth = json.loads((run_dir / "truth.json").read_text())
    spikes = tool_spikes(audit)
    events = truth["events"]
    planted = {}  # (shard, row) -> event index
    for e in events:
        for r in e["rows"]:
            for sh, row, _ in r["shard_rows"]:
                planted[(sh, int(row))] = e["event"]
    ev_steps = []
    for e in events:
        if e["kind"] == "optimizer":
            lo, hi = e["loss_range"]
            ev_steps.append(set(range(lo, hi + 1)))
        else:
            ev_steps.append(set(e["steps"]))
    matched: dict[int, list[str]] = defaultdict(list)
    spurious = []
    for sid, sp in spikes.items():
        seen = sp["window"] | set(range(sp["range"][0], sp["range"][1] + 1))
        best, best_ov, best_d = None, 0, math.inf
        for i, st in enumerate(ev_steps):
            ov = len(seen & st)
            d = abs(sp["peak"] - min(st))
            if ov > best_ov or (ov == best_ov and ov > 0 and d < best_d):
                best, best_ov, best_d = i, ov, d
        if best is None:
            spurious.append({"spike_id": sid, "verdict": sp["verdict"], "peak": sp["peak"]})
        else:
            matched[best].append(sid)
    skip_by, skip_steps = _skip_rows(audit)
    all_skip = set().union(*skip_by.values()) if skip_by else set()
    ev_out = []
    for e in events:
        i = e["event"]
        sids = sorted(matched.get(i, []))
        vs = [spikes[s]["verdict"] for s in sids]
        if not vs:
            v = "missed"
        elif all(x == vs[0] for x in vs):
            v = vs[0]
        else:
            v = "mixed"
        rows = {(sh, int(row)) for r in e["rows"] for sh, row, _ in r["shard_rows"]}
        win = set().union(*(spikes[s]["window"] for s in sids)) if sids else set()
        skip_of_event = set().union(*(skip_by.get(s, set()) for s in sids)) if sids else set()
        ev_out.append({
            "design_id": e["design_id"], "kind": e["kind"], "dose": e["dose"], "n_steps": e["n_steps"],
            "steps": e["steps"], "verdict": v, "entries": [{"spike_id": s, "verdict": spikes[s]["verdict"],
                                                            "top_signal": spikes[s]["top_signal"],
                                                            "effect": spikes[s]["effect"], "margin": spikes[s]["margin"],
                                                            "top_step": spikes[s]["top_step"],
                                                            "reason": spikes[s]["reason"]} for s in sids],
            "grounded": v == "data" and any(spikes[s]["top_step"] in set(e["steps"]) for s in sids),
            "any_data": any(x == "data" for x in vs),
            "steps_in_window": len(set(e["steps"]) & win), "planted_rows": len(rows),
            "rows_skipped": len(rows & all_skip),
            "skip_rows_of_event": len(skip_of_event), "skip_rows_of_event_planted": len(skip_of_event & set(planted)),
        })
    # skip list against all planted rows
    tp = len(all_skip & set(planted))
    planted_steps = {s for e in events if e["kind"] != "optimizer" for s in e["steps"]}
    # run quarantine: clean shards (no planted row) listed
    q = json.loads((audit / "quarantine.json").read_text()) if (audit / "quarantine.json").exists() else {}
    shard_truth = truth["shards"]
    q_clean = [{"shard": s["shard"], "n_flagged_rows": s.get("n_flagged_rows")} for s in q.get("shards", [])
               if _clean(shard_truth.get(s["shard"], {}))]
    q_sources = [s["shard"] for s in q.get("shards", []) if _copy_source(shard_truth.get(s["shard"], {}))]
    summary = json.loads((audit / "summary.json").read_text()) if (audit / "summary.json").exists() else {}
    effects = [abs(float(sp["effect"])) for sp in spikes.values() if sp["effect"] is not None
               and np.isfinite(sp["effect"])]
    margins = [abs(float(sp["margin"])) for sp in spikes.values() if sp["margin"] is not None
               and np.isfinite(sp["margin"])]
    out = {
        "name": truth["name"], "spec": truth["spec"], "tokens": truth["tokens"], "n_shards": truth["n_shards"],
        "events": ev_out, "spurious": spurious, "n_tool_spikes": len(spikes),
        "skip": {"rows": len(all_skip), "planted_rows": len(planted), "true_positive": tp,
                 "steps": sorted(skip_steps), "planted_steps": len(planted_steps),
                 "planted_steps_skipped": len(skip_steps & planted_steps),
                 "clean_steps_skipped": len(skip_steps - planted_steps)},
        "run_quarantine": {"shards": len(q.get("shards", [])), "clean": q_clean, "copy_sources": q_sources},
        "max_effect": max(effects) if effects else None, "max_margin": max(margins) if margins else None,
        "control_false_alarms": _false_alarms(summary),
    }
    if shard_audit is not None:
        out["shard_audit"] = score_shards(truth, shard_audit)
    return out


def _copy_source(t: dict) -> bool:
    """A shard with no planted row that holds rows a ``dup_copied`` event copied (the originals of a replay): to
    an audit without the loss log, a block of copies and the block it copies are the same evidence."""
    return t.get("planted", 0) == 0 and t.get("copy_sources", 0) > 0


def _clean(t: dict) -> bool:
    """Neither planted rows nor the originals of planted copies (runs built before ``copy_sources`` was
    recorded count every unplanted shard as clean)."""
    return t.get("planted", 0) == 0 and t.get("copy_sources", 0) == 0


def score_shards(truth: dict, shard_audit: Path) -> dict:
    """Ranks of planted shards among the clean ones in ``spike-audit shards``, and clean shards quarantined.
    Shards holding the originals of copied rows are neither clean nor planted (their ranks are reported apart);
    ``clean_or_source_above`` counts them as clean, as the lab did before they were told apart."""
    rows = _read(shard_audit / "shard_scores.parquet", columns=["shard", "rank", "anomaly_score", "top_signal"])
    st = truth["shards"]
    name = {r["shard"]: Path(r["shard"]).name for r in rows}
    rows = sorted(rows, key=lambda r: r["rank"])
    clean_above = source_above = 0
    n_clean = sum(1 for s in st.values() if _clean(s))
    n_sources = sum(1 for s in st.values() if _copy_source(s))
    planted = []
    for r in rows:
        t = st.get(name[r["shard"]])
        if t is None:
            continue
        if _copy_source(t):
            source_above += 1
            continue
        if t["planted"] == 0:
            clean_above += 1
            continue
        frac = t["planted"] / max(1, t["rows"])
        kind = max(t["kinds"].items(), key=lambda kv: kv[1])[0]
        planted.append({"shard": name[r["shard"]], "rank": int(r["rank"]), "clean_above": clean_above,
                        "clean_or_source_above": clean_above + source_above,
                        "frac": frac, "kind": kind, "top_signal": r["top_signal"]})
    q = json.loads((shard_audit / "quarantine.json").read_text()) if (shard_audit / "quarantine.json").exists() else {}
    qs = [Path(s["shard"] if isinstance(s, dict) else s).name for s in q.get("shards", q.get("quarantined", []))]
    q_clean = [s for s in qs if _clean(st.get(s, {"planted": 1}))]
    q_sources = [s for s in qs if _copy_source(st.get(s, {}))]
    return {"n_shards": len(rows), "n_clean": n_clean, "n_copy_sources": n_sources, "planted": planted,
            "quarantined": len(qs), "quarantined_clean": q_clean, "quarantined_sources": q_sources,
            "top5_allowed": int(math.floor(0.05 * n_clean)),
            "top5_allowed_with_sources": int(math.floor(0.05 * (n_clean + n_sources)))}


# ---------------------------------------------------------------------------------------- pool


def _recall(events) -> tuple[int, int]:
    return sum(e["verdict"] == "data" for e in events), len(events)


def pool_scores(runs: list[dict], seeds: int) -> dict:
    data_ev = [dict(e, run=r["name"]) for r in runs for e in r["events"] if e["kind"] != "optimizer"]
    opt_ev = [dict(e, run=r["name"]) for r in runs for e in r["events"] if e["kind"] == "optimizer"]
    kinds = {}
    for kind in KINDS:
        evs = [e for e in data_ev if e["kind"] == kind]
        by_dose = {}
        for d in DOSES:
            de = [e for e in evs if e["dose"] == d]
            if de:
                k, n = _recall(de)
                by_dose[f"{d}/16"] = {"data": k, "n": n, "recall": k / n,
                                      "any_data": sum(e["any_data"] for e in de),
                                      "missed": sum(e["verdict"] == "missed" for e in de)}
        drop = None
        for d in DOSES:
            c = by_dose.get(f"{d}/16")
            if c is not None and c["recall"] < 0.95:
                drop = f"{d}/16"
                break
        tested = [d for d in DOSES if f"{d}/16" in by_dose]
        prow = sum(e["planted_rows"] for e in evs)
        skipped = sum(e["rows_skipped"] for e in evs)
        sk = sum(e["skip_rows_of_event"] for e in evs)
        skp = sum(e["skip_rows_of_event_planted"] for e in evs)
        verdicts = Counter(e["verdict"] for e in evs)
        kinds[kind] = {"doses": by_dose, "drop_below_095": drop if drop else
                       (f"none down to {min(tested)}/16" if tested else None),
                       "missed": sum(e["verdict"] == "missed" for e in evs), "n": len(evs),
                       "verdicts": dict(verdicts), "grounded": sum(e["grounded"] for e in evs),
                       "skip_precision": (skp / sk) if sk else None, "skip_recall": skipped / prow if prow else None,
                       "steps_in_window": (sum(e["steps_in_window"] for e in evs) / sum(e["n_steps"] for e in evs))
                       if evs else None,
                       "agreement": _agreement(evs)}
    n_opt = len(opt_ev)
    opt_detected = [e for e in opt_ev if e["verdict"] != "missed"]
    false_data = sum(e["any_data"] for e in opt_detected)
    tp = sum(r["skip"]["true_positive"] for r in runs)
    skip_rows = sum(r["skip"]["rows"] for r in runs)
    planted_rows = sum(r["skip"]["planted_rows"] for r in runs)
    shard_p = [p for r in runs if "shard_audit" in r for p in r["shard_audit"]["planted"]]
    big = [p for r in runs if "shard_audit" in r for p in r["shard_audit"]["planted"] if p["frac"] >= 0.05]
    in_top = [p for r in runs if "shard_audit" in r for p in r["shard_audit"]["planted"]
              if p["frac"] >= 0.05 and p["clean_above"] <= r["shard_audit"]["top5_allowed"]]
    in_top_src = [p for r in runs if "shard_audit" in r for p in r["shard_audit"]["planted"]
                  if p["frac"] >= 0.05 and p.get("clean_or_source_above", p["clean_above"])
                  <= r["shard_audit"].get("top5_allowed_with_sources", r["shard_audit"]["top5_allowed"])]
    fa = [r["control_false_alarms"] for r in runs if r["control_false_alarms"] is not None]
    effects = [r["max_effect"] for r in runs if r["max_effect"] is not None]
    margins = [r["max_margin"] for r in runs if r["max_margin"] is not None]
    all_ev = data_ev + opt_ev
    by_design = defaultdict(list)
    for e in all_ev:
        by_design[e["design_id"]].append(e["verdict"])
    agree = [Counter(v).most_common(1)[0][1] / len(v) for v in by_design.values() if len(v) > 1]
    return {
        "seeds": seeds,
        "kinds": kinds,
        "by_duration": {str(d): {"data": sum(e["verdict"] == "data" for e in data_ev if e["n_steps"] == d),
                                 "inconclusive": sum(e["verdict"] == "inconclusive" for e in data_ev if e["n_steps"] == d),
                                 "n": sum(e["n_steps"] == d for e in data_ev)}
                        for d in sorted({e["n_steps"] for e in data_ev})},
        "all_data_kinds": {"data": sum(e["verdict"] == "data" for e in data_ev), "n": len(data_ev),
                           "grounded": sum(e["grounded"] for e in data_ev),
                           "missed": sum(e["verdict"] == "missed" for e in data_ev),
                           "mixed": sum(e["verdict"] == "mixed" for e in data_ev),
                           "at_dose_ge_4": _recall([e for e in data_ev if e["dose"] >= 4])},
        "optimizer": {"n": n_opt, "detected": len(opt_detected), "false_data": false_data,
                      "false_data_rate": false_data / len(opt_detected) if opt_detected else None,
                      "false_data_ci95": wilson(false_data, len(opt_detected)),
                      "verdicts": dict(Counter(e["verdict"] for e in opt_ev)), "agreement": _agreement(opt_ev)},
        "agreement": {"designs": len(agree), "mean": float(np.mean(agree)) if agree else None,
                      "share_ge_095": float(np.mean([a >= 0.95 for a in agree])) if agree else None},
        "skip": {"precision": tp / skip_rows if skip_rows else None, "recall": tp / planted_rows if planted_rows else None,
                 "rows": skip_rows, "planted_rows": planted_rows, "true_positive": tp,
                 "planted_steps_skipped": sum(r["skip"]["planted_steps_skipped"] for r in runs),
                 "planted_steps": sum(r["skip"]["planted_steps"] for r in runs),
                 "clean_steps_skipped": sum(r["skip"]["clean_steps_skipped"] for r in runs)},
        "shards": {"audits": sum("shard_audit" in r for r in runs), "planted_shards": len(shard_p),
                   "planted_ge_5pct": len(big), "in_top_5pct": len(in_top),
                   "in_top_5pct_sources_as_clean": len(in_top_src),
                   "copy_sources": sum(r["shard_audit"].get("n_copy_sources", 0) for r in runs if "shard_audit" in r),
                   "sources_quarantined": sum(len(r["shard_audit"].get("quarantined_sources", []))
                                              for r in runs if "shard_audit" in r),
                   "worst_clean_above": max((p["clean_above"] for p in big), default=None),
                   "missed": [dict(p, run=r["name"]) for r in runs if "shard_audit" in r
                              for p in r["shard_audit"]["planted"] if p["frac"] >= 0.05
                              and p["clean_above"] > r["shard_audit"]["top5_allowed"]],
                   "clean_quarantined": sum(len(r["shard_audit"]["quarantined_clean"]) for r in runs
                                            if "shard_audit" in r),
                   "n_clean": sum(r["shard_audit"]["n_clean"] for r in runs if "shard_audit" in r)},
        "run_quarantine": {"clean_shards": sum(len(r["run_quarantine"]["clean"]) for r in runs),
                           "clean_single_row": sum(1 for r in runs for q in r["run_quarantine"]["clean"]
                                                   if q["n_flagged_rows"] == 1),
                           "copy_sources": sum(len(r["run_quarantine"].get("copy_sources", [])) for r in runs),
                           "shards": sum(r["run_quarantine"]["shards"] for r in runs)},
        "max_effect": max(effects) if effects else None,
        "max_margin": max(margins) if margins else None,
        "control_false_alarms": {"alarms": sum(a for a, _ in fa), "controls": sum(n for _, n in fa),
                                 "runs": len(fa)} if fa else None,
        "draw_agreement": draw_agreement(runs),
        "spurious_spikes": sum(len(r["spurious"]) for r in runs),
        "spurious_data": sum(1 for r in runs for s in r["spurious"] if s["verdict"] == "data"),
    }


def draw_agreement(runs: list[dict]) -> dict | None:
    """How often a verdict changes with the control draw alone: every run audited again under other ``--seed``
    values (the same data and log), each event's verdicts over the draws. An event is stable when every draw
    gives the same verdict; ``share`` is the mean share of draws giving the event's modal verdict. Grouped as
    planted events at doses >= 4/16, at 2/16, and normal (optimizer) spikes."""
    groups: dict[str, list] = {"dose >= 4/16": [], "dose 2/16": [], "normal spikes": []}
    n_draws = set()
    for r in runs:
        if not r.get("draws"):
            continue
        for i, e in enumerate(r["events"]):
            vs = [e["verdict"]] + [d[i] for d in r["draws"]]
            n_draws.add(len(vs))
            g = "normal spikes" if e["kind"] == "optimizer" else ("dose >= 4/16" if e["dose"] >= 4 else "dose 2/16")
            groups[g].append(vs)
    if not n_draws:
        return None
    out = {"draws": sorted(n_draws)}
    for g, evs in groups.items():
        shares = [Counter(v).most_common(1)[0][1] / len(v) for v in evs]
        out[g] = {"events": len(evs), "stable": sum(s == 1.0 for s in shares),
                  "share": float(np.mean(shares)) if shares else None,
                  "changed": sorted({f"{Counter(v).most_common(1)[0][0]}->" + "/".join(sorted(set(v)))
                                     for v in evs if len(set(v)) > 1})}
    every = [v for evs in groups.values() for v in evs]
    out["all"] = {"events": len(every), "stable": sum(len(set(v)) == 1 for v in every)}
    return out


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """Wilson score interval of a binomial proportion ``k / n`` (95% by default)."""
    if n <= 0:
        return None
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * float(np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / d
    return max(0.0, c - h), min(1.0, c + h)


def _agreement(evs) -> float | None:
    by = defaultdict(list)
    for e in evs:
        by[e["design_id"]].append(e["verdict"])
    a = [Counter(v).most_common(1)[0][1] / len(v) for v in by.values() if len(v) > 1]
    return float(np.mean(a)) if a else None


# ---------------------------------------------------------------------------------------- table


def _f(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


def _draw_line(d: dict | None) -> str:
    if not d:
        return "- verdict under other control draws: not measured (--control-draws 1)"
    parts = [f"{g} {d[g]['stable']}/{d[g]['events']} (mean share {_f(d[g]['share'], 3)})"
             for g in ("dose >= 4/16", "dose 2/16", "normal spikes") if d[g]["events"]]
    return (f"- verdict under other control draws (the same run audited with {'/'.join(map(str, d['draws']))} "
            f"`--seed` values): events with the same verdict under every draw {d['all']['stable']}/{d['all']['events']}; "
            + "; ".join(parts))


def render(pooled: dict, meta: dict) -> str:
    """The one table (markdown), with the run-level figures under it."""
    head = "| kind | " + " | ".join(f"{d}/16" for d in DOSES) + \
        " | < 0.95 from | data at a planted step | not_data / inconcl. / mixed | missed | seed agreement |" \
        " skip precision | skip recall | window covers |"
    lines = [head, "|" + "---|" * (len(DOSES) + 9)]
    for kind, k in pooled["kinds"].items():
        cells = []
        for d in DOSES:
            c = k["doses"].get(f"{d}/16")
            cells.append(f"{c['data']}/{c['n']}" if c else "-")
        vc = k["verdicts"]
        n_data = vc.get("data", 0)
        lines.append(f"| {kind} | " + " | ".join(cells) + f" | {k['drop_below_095'] or '-'} | "
                     f"{k['grounded']}/{n_data} | {vc.get('not_data', 0)} / {vc.get('inconclusive', 0)} / "
                     f"{vc.get('mixed', 0)} | {k['missed']}/{k['n']} | "
                     f"{_f(k['agreement'])} | {_f(k['skip_precision'])} | {_f(k['skip_recall'])} | "
                     f"{_f(k['steps_in_window'])} |")
    o = pooled["optimizer"]
    ov = o["verdicts"]
    lines.append(f"| optimizer (normal data): false `data` | {o['false_data']}/{o['detected']} | | | | | | "
                 f"{ov.get('not_data', 0)} / {ov.get('inconclusive', 0)} / {ov.get('mixed', 0)} | "
                 f"{o['n'] - o['detected']}/{o['n']} | {_f(o['agreement'])} | | | |")
    a = pooled["all_data_kinds"]
    k4, n4 = a["at_dose_ge_4"]
    s, sh, rq = pooled["skip"], pooled["shards"], pooled["run_quarantine"]
    fa = pooled["control_false_alarms"]
    out = "\n".join(lines) + "\n\n"
    out += "\n".join([
        f"- data kinds: {a['data']}/{a['n']} events judged `data` ({k4}/{n4} at doses >= 4/16), {a['grounded']} of them "
        f"with the top step at a planted step; {a['missed']} not detected as spikes; {a['mixed']} with contradicting "
        f"entries (loss vs grad norm)",
        "- by planted duration (steps: data/inconclusive/n): " + ", ".join(
            f"{d}: {c['data']}/{c['inconclusive']}/{c['n']}" for d, c in pooled["by_duration"].items()),
        f"- normal (optimizer) spikes: false `data` {o['false_data']}/{o['detected']} = "
        f"{_f(o['false_data_rate'], 3)}" + (f" (95% interval {o['false_data_ci95'][0]:.3f}-{o['false_data_ci95'][1]:.3f})"
                                            if o.get("false_data_ci95") else "") + f" (verdicts {o['verdicts']})",
        f"- verdict agreement across seeds: mean share of seeds giving an event design's modal verdict "
        f"{_f(pooled['agreement']['mean'], 3)}; designs with >= 95% agreement: "
        f"{_f(pooled['agreement']['share_ge_095'], 3)} of {pooled['agreement']['designs']}",
        _draw_line(pooled.get("draw_agreement")),
        f"- skip list rows vs planted rows (all planted steps): precision {_f(s['precision'], 3)} "
        f"({s['true_positive']}/{s['rows']}), recall {_f(s['recall'], 3)} ({s['true_positive']}/{s['planted_rows']}); "
        f"planted steps in steps_to_skip {s['planted_steps_skipped']}/{s['planted_steps']}, clean steps in it "
        f"{s['clean_steps_skipped']}",
        f"- `spike-audit shards`: planted shards with >= 5% planted rows in the top 5% (among clean shards) "
        f"{sh['in_top_5pct']}/{sh['planted_ge_5pct']} (most clean shards above a planted one: {sh['worst_clean_above']}); "
        f"clean shards quarantined {sh['clean_quarantined']}/{sh['n_clean']} ({sh['audits']} audits); shards holding "
        f"the originals of copied rows, neither clean nor planted: {sh.get('copy_sources', 0)} "
        f"({sh.get('sources_quarantined', 0)} quarantined; counted as clean, "
        f"{sh.get('in_top_5pct_sources_as_clean', '-')}/{sh['planted_ge_5pct']} in the top 5%)",
        f"- `spike-audit run` quarantine: {rq['clean_shards']} clean shards listed ({rq['clean_single_row']} for a "
        f"single row) and {rq.get('copy_sources', 0)} holding the originals of copied rows, of {rq['shards']} listed",
        f"- largest printed effect size {_f(pooled['max_effect'], 1) if pooled['max_effect'] is None or pooled['max_effect'] < 1e6 else format(pooled['max_effect'], '.3g')}; "
        f"largest margin {format(pooled['max_margin'], '.3g') if pooled['max_margin'] is not None else '-'}",
        f"- control false alarms (summary.json): " + (f"{fa['alarms']} of {fa['controls']} controls over {fa['runs']} runs"
                                                       if fa else "not reported"),
        f"- tool spikes matching no planted event: {pooled['spurious_spikes']} ({pooled['spurious_data']} judged `data`)",
    ]) + "\n"
    out += "\n" + meta.get("footer", "") + "\n"
    return out
