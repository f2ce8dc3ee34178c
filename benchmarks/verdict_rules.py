"""Alternative verdict rules, offline, on the spike lab's own audits: what would the event verdicts be if the
window had to beat the controls by a margin, or if each family were calibrated on its own first?

    python benchmarks/verdict_rules.py LAB_OUT [LAB_OUT ...]
    python benchmarks/verdict_rules.py --synthetic

Each LAB_OUT is a ``benchmarks/verdicts.py --out`` directory (its ``verdicts.json`` and every run's
``audit/batch_scores.parquet`` and ``verdicts.parquet``). From every step's family evidence (controls leave-one-out,
as the tool wrote them) it recomputes each event's p with the tool's calibration (rank among the controls' T,
Sidak over the event's window steps) under each rule, and counts events judged `data` per design:

* ``T_c >= T``: the tool's rule (it should reproduce the tool's counts; the tool also requires the top family's
  rows to exceed every control's at its cut, which this approximates by >= 2 rows);
* ``T_c >= T - delta``: a control within ``delta`` of the window's T counts as as extreme (a margin);
* ``r T_c >= T``: a relative margin;
* ``per-family tail``: each family's evidence replaced by ``-log10`` of its tail probability among the controls'
  evidence on that family (``verdict.tail_p``), before the maximum over families;
* ``fitted tail xF``: the tool's T, but the step's p in the controls' upper tail (beyond their 0.9 quantile, at a
  value no control has) the smaller of the rank p and an exponential tail fitted to the controls above that
  quantile, its scale their mean excess times F (peaks over threshold; at most down to ``1 / (n + 1) ** 2``).

It also prints how often a control judged leave-one-out against the others gets ``p <= x`` under the rank p and
under each fitted tail (a calibrated p gets it at most ``x`` of the time). ``--synthetic`` measures the same on
controls drawn from known distributions (light, heavy and zero-inflated tails): 251 values a draw, each judged
against the other 250, 60 draws.
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from spike_audit.auditors.verdict import tail_p

ALPHA = 0.05
RULES = [("T_c >= T", "e", 0.0, 1.0), ("T_c >= T - 0.25", "e", 0.25, 1.0), ("T_c >= T - 0.5", "e", 0.5, 1.0),
         ("T_c >= T - 1", "e", 1.0, 1.0), ("1.1 T_c >= T", "e", 0.0, 1.1), ("per-family tail", "tail", 0.0, 1.0),
         ("fitted tail x1", "e", 0.0, 1.0, 1.0), ("fitted tail x1.25", "e", 0.0, 1.0, 1.25),
         ("fitted tail x2", "e", 0.0, 1.0, 2.0)]
FIT_FACTORS = sorted({r[4] for r in RULES if len(r) > 4})
LEVELS = (0.05, 0.01, 0.005, 0.001)


def fitted_p(x: float, null: np.ndarray, factor: float, q: float = 0.9) -> float:
    """The rank p of ``x`` among ``null``, in their upper tail the smaller of it and a fitted exponential tail."""
    t = np.sort(np.asarray(null, dtype=np.float64))
    n = len(t)
    i = int(np.searchsorted(t, x, side="left"))
    emp = (1.0 + n - i) / (n + 1.0)
    u = float(np.quantile(t, q))
    if x <= u or (i < n and t[i] == x):
        return emp
    exc = t[t > u] - u
    scale = max(float(exc.mean()) * factor if len(exc) else 0.0, 1.0 / np.log(10.0))
    fit = (len(exc) + 1.0) / (n + 1.0) * np.exp(-(x - u) / scale)
    return float(min(emp, max(fit, 1.0 / (n + 1.0) ** 2)))


def _steps(audit: Path):
    bs = pq.read_table(audit / "batch_scores.parquet", columns=["step", "role", "spike_id", "families"]).to_pylist()
    names = sorted({f["name"] for r in bs for f in r["families"]})
    col = {f: i for i, f in enumerate(names)}
    e = np.zeros((len(bs), len(names)))
    k = np.zeros((len(bs), len(names)), dtype=np.int64)
    for i, r in enumerate(bs):
        for f in r["families"]:
            e[i, col[f["name"]]] = min(float(f["evidence"]), 300.0)
            k[i, col[f["name"]]] = f["rows"] or 0
    return (e, k, np.array([r["role"] for r in bs]), [r["spike_id"] for r in bs],
            np.array([r["step"] for r in bs], dtype=np.int64))


def _tail_scale(e: np.ndarray, ctrl: np.ndarray) -> np.ndarray:
    """Each (step, family) evidence as -log10 of its tail among the controls' evidence on the family."""
    q = np.zeros_like(e)
    ci = np.flatnonzero(ctrl)
    for f in range(e.shape[1]):
        null = e[ctrl, f]
        for i in np.flatnonzero(e[:, f] > 0):
            nl = np.delete(null, np.searchsorted(ci, i)) if ctrl[i] else null
            q[i, f] = -np.log10(tail_p(e[i, f], nl))
    return q


def event_verdicts(audit: Path) -> dict[str, dict[str, bool]]:
    """{rule: {spike_id: judged data}} for one audit."""
    e, k, role, sid, step = _steps(audit)
    ctrl = role == "control"
    windows = {r["spike_id"]: r["n_window_steps"] or 0
               for r in pq.read_table(audit / "verdicts.parquet", columns=["spike_id", "n_window_steps"]).to_pylist()}
    scaled = {"e": e}
    out = {}
    for name, mode, delta, ratio, *fit in RULES:
        if mode not in scaled:
            scaled[mode] = _tail_scale(e, ctrl)
        q = scaled[mode]
        t = q.max(axis=1)
        top = q.argmax(axis=1)
        tc = t[ctrl]
        n = len(tc)
        res = {}
        for s, m in windows.items():
            idx = sorted((i for i in range(len(sid)) if sid[i] == s and role[i] == "window"), key=lambda i: step[i])[:m]
            if not idx or not n:
                res[s] = False
                continue
            if fit:
                ps = np.array([fitted_p(t[i], tc, fit[0]) for i in idx])
            else:
                ps = np.array([(1 + np.count_nonzero(tc * ratio >= t[i] - delta)) / (n + 1) for i in idx])
            i = idx[int(np.argmin(ps))]
            res[s] = bool(1 - (1 - ps.min()) ** len(idx) <= ALPHA and k[i, top[i]] >= 2)
        out[name] = res
    return out


def control_calibration(audit: Path) -> dict[str, np.ndarray]:
    """Every control's p judged leave-one-out against the other controls' T: the rank p and each fitted tail's."""
    e, _, role, _, _ = _steps(audit)
    tc = e[role == "control"].max(axis=1)
    out = {"rank": np.array([(1 + np.count_nonzero(np.delete(tc, i) >= tc[i])) / len(tc) for i in range(len(tc))])}
    for f in FIT_FACTORS:
        out[f"fitted tail x{f:g}"] = np.array([fitted_p(tc[i], np.delete(tc, i), f) for i in range(len(tc))])
    return out


def main(dirs: list[str]) -> int:
    counts = {name: defaultdict(Counter) for name, *_ in RULES}
    cal: dict[str, list] = defaultdict(list)
    for d in dirs:
        doc = json.loads((Path(d) / "verdicts.json").read_text())
        for r in doc["runs"]:
            vs = event_verdicts(Path(d) / "runs" / r["name"] / "audit")
            for name, p in control_calibration(Path(d) / "runs" / r["name"] / "audit").items():
                cal[name].append(p)
            for ev in r["events"]:
                ids = [x["spike_id"] for x in ev["entries"]]
                keys = (["normal spikes"] if ev["kind"] == "optimizer"
                        else [f"all at {ev['dose']}/16", f"{ev['kind']} {ev['dose']}/16"])
                for name in counts:
                    hit = any(vs[name].get(i, False) for i in ids)
                    for key in keys:
                        counts[name][key][hit] += 1
    cells = sorted(counts[RULES[0][0]], key=lambda c: (not c.startswith("normal"), not c.startswith("all"), c))
    print("| events judged `data` | " + " | ".join(f"`{name}`" for name in counts) + " |")
    print("|---" * (len(counts) + 1) + "|")
    for c in cells:
        print(f"| {c} | " + " | ".join(f"{counts[name][c][True]}/{sum(counts[name][c].values())}" for name in counts) + " |")
    print()
    print("| controls judged leave-one-out: share with p <= x | " + " | ".join(f"x = {a:g}" for a in LEVELS) + " |")
    print("|---" * (len(LEVELS) + 1) + "|")
    for name, ps in cal.items():
        p = np.concatenate(ps)
        print(f"| {name} ({len(p)} controls) | " + " | ".join(f"{np.mean(p <= a):.4f}" for a in LEVELS) + " |")
    return 0


SYNTHETIC = {
    "exponential": lambda rng, k: rng.exponential(1.0, k),
    "gamma(3)": lambda rng, k: rng.gamma(3.0, 1.0, k),
    "max of 40 -log10 U": lambda rng, k: -np.log10(rng.random((k, 40))).max(axis=1),
    "90% zeros, else exponential": lambda rng, k: np.where(rng.random(k) < 0.9, 0.0, rng.exponential(2.0, k)),
    "lognormal(sigma 1.5)": lambda rng, k: rng.lognormal(0.0, 1.5, k),
    "Lomax(2)": lambda rng, k: rng.pareto(2.0, k),
}


def synthetic(n: int = 250, draws: int = 60, levels=(0.01, 0.004)) -> int:
    print("| null of the controls' T | " + " | ".join(f"{name}: P(p <= {a:g}) / {a:g}" for name in
                                                       ["rank"] + [f"x{f:g}" for f in FIT_FACTORS] for a in levels) + " |")
    print("|---" * (1 + len(levels) * (1 + len(FIT_FACTORS))) + "|")
    for dist, draw in SYNTHETIC.items():
        rng = np.random.default_rng(0)
        ps = defaultdict(list)
        for _ in range(draws):
            x = draw(rng, n + 1)
            for i in range(n + 1):
                rest = np.delete(x, i)
                ps["rank"].append((1 + np.count_nonzero(rest >= x[i])) / (n + 1))
                for f in FIT_FACTORS:
                    ps[f].append(fitted_p(x[i], rest, f))
        cells = [f"{np.mean(np.asarray(ps[k]) <= a) / a:.2f}" for k in ["rank"] + FIT_FACTORS for a in levels]
        print(f"| {dist} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--synthetic"]:
        sys.exit(synthetic())
    if len(sys.argv) < 2:
        sys.exit(__doc__.split("\n\n")[1])
    sys.exit(main(sys.argv[1:]))
