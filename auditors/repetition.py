"""Repeated n-gram runs, exactly as OLMo's instance filter defines them, vectorised over all rows.

OLMo (``olmo.data.util.find_periodic_sequences`` / OLMo-core ``NumpyDatasetBase._validate_instance``
with ``InstanceFilterConfig(repetition_max_period=13, repetition_min_period=1,
repetition_max_count=32)``) works per sequence and per period p: it cuts the sequence into aligned
chunks of p tokens (chunk k = tokens [k*p, (k+1)*p)), marks the chunks equal to the chunk before,
groups consecutive marked chunks, and extends each group backwards over the trailing tokens of the
previous chunk that equal their counterpart p tokens earlier, and forwards over the leading such
tokens of the next chunk. A group spanning ``[start, end)`` reports ``times = (end - start) // p``
and is kept when ``times > 2``; OLMo drops (loss-masks) the instance when some kept run has
``times >= repetition_max_count``.

Equivalent element-wise form used here (no per-row loop): with ``e_p[i] = (x[i] == x[i-p])`` for
the positions ``p <= i < len`` of a row, every maximal run of True ``[a, b]`` of ``e_p`` covers the
periodic span ``[a - p, b + 1)`` of length ``L + p`` (L = b - a + 1) and gives
``times = (L + p) // p``. OLMo only sees the run when it contains a whole aligned chunk, i.e. when
``ceil(a / p) * p + p - 1 <= b``, and keeps it when ``times > 2``. Periods above ``len // 3`` can
never reach ``times > 2``, which matches OLMo's ``max_period = min(max_period, len // 3)``.

Signals (defaults ``min_period=1``, ``max_period=13``, ``max_count=32``):

* ``repeat_run_rows_frac``: fraction of rows with a kept run of ``times >= max_count`` (the rows
  OLMo's instance filter would drop).
* ``repeat_token_frac``: fraction of tokens inside such runs (the union of their spans).
* ``repeat_any_token_frac``: fraction of tokens inside any kept run (``times >= 3``).
* ``max_repeat_run``: largest ``times`` of any kept run (0 when there is none).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from auditors.base import TokenBatch

SIGNALS = {
    "repeat_run_rows_frac": "Fraction of rows holding a repeated n-gram run (period 1..13 tokens) of at least 32 "
    "repeats, as OLMo's instance filter (repetition_max_count=32) defines it: the rows OLMo would drop.",
    "repeat_token_frac": "Fraction of tokens inside repeated n-gram runs of at least 32 repeats (period 1..13).",
    "repeat_any_token_frac": "Fraction of tokens inside any run OLMo's find_periodic_sequences reports "
    "(period 1..13, at least 3 repeats).",
    "max_repeat_run": "Largest repeat count (times) of any run OLMo's find_periodic_sequences reports "
    "(period 1..13); 0 when there is none.",
}


def find_runs(batch: TokenBatch, min_period: int = 1, max_period: int = 13) -> dict[str, np.ndarray]:
    """All runs OLMo's ``find_periodic_sequences`` reports, for every row at once.

    Returns arrays ``row``, ``start``, ``end`` (flat token indices, end exclusive), ``period``,
    ``times``, ordered by period then position.
    """
    off = np.asarray(batch.offsets, dtype=np.int64)
    n = int(off[-1])
    v = batch.values[:n]
    out = {k: [] for k in ("row", "start", "end", "period", "times")}
    for p in range(min_period, max_period + 1):
        if n <= p:
            break
        eq = np.equal(v[p:], v[:-p])  # eq[i - p] <=> x[i] == x[i - p]
        idx = np.flatnonzero(eq)
        if not len(idx):
            continue
        idx += p  # token index i
        # drop comparisons that reach back into the previous row: i - p < row start
        row = np.searchsorted(off, idx, side="right") - 1
        rs = off[row]
        ok = idx - rs >= p
        idx, row, rs = idx[ok], row[ok], rs[ok]
        if not len(idx):
            continue
        brk = np.flatnonzero(np.diff(idx) != 1) + 1
        first = np.concatenate([[0], brk])
        last = np.concatenate([brk - 1, [len(idx) - 1]])
        a, b = idx[first], idx[last]
        r = row[first]
        la = a - rs[first]  # local positions
        lb = b - rs[first]
        full_chunk = (-(-la // p)) * p + p - 1 <= lb
        times = (lb - la + 1 + p) // p
        keep = full_chunk & (times > 2)
        if not keep.any():
            continue
        out["row"].append(r[keep])
        out["start"].append(a[keep] - p)
        out["end"].append(b[keep] + 1)
        out["period"].append(np.full(int(keep.sum()), p, dtype=np.int64))
        out["times"].append(times[keep])
    return {k: (np.concatenate(x) if x else np.zeros(0, np.int64)) for k, x in out.items()}


def _covered_per_row(n_rows: int, row: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Tokens of each row covered by the union of its spans [start, end) (spans never cross rows)."""
    if not len(start):
        return np.zeros(n_rows, dtype=np.int64)
    o = np.argsort(start, kind="stable")
    s, e, r = start[o], end[o], row[o]
    reach = np.maximum.accumulate(e)
    new = np.ones(len(s), dtype=bool)
    new[1:] = s[1:] > reach[:-1]  # starts a new merged interval
    first = np.flatnonzero(new)
    last = np.concatenate([first[1:] - 1, [len(s) - 1]])
    return np.bincount(r[first], weights=reach[last] - s[first], minlength=n_rows).astype(np.int64)


class Repetition:
    """Repeated n-gram runs per OLMo's instance filter (see module docstring)."""

    name = "repetition"

    def __init__(self, min_period: int = 1, max_period: int = 13, max_count: int = 32):
        self.min_period, self.max_period, self.max_count = min_period, max_period, max_count

    def _per_row(self, batch: TokenBatch) -> dict[str, np.ndarray]:
        off = np.asarray(batch.offsets, dtype=np.int64)
        n_rows = batch.n_rows
        runs = find_runs(batch, self.min_period, self.max_period)
        big = runs["times"] >= self.max_count
        max_run = np.zeros(n_rows, dtype=np.int64)
        np.maximum.at(max_run, runs["row"], runs["times"])
        return {
            "max_run": max_run,
            "flag": max_run >= self.max_count,
            "cov_big": _covered_per_row(n_rows, runs["row"][big], runs["start"][big], runs["end"][big]),
            "cov_any": _covered_per_row(n_rows, runs["row"], runs["start"], runs["end"]),
            "len": np.diff(off),
        }

    def create(self) -> dict:
        return {"n_rows": 0, "n_tokens": 0, "flag_rows": 0, "tok_big": 0, "tok_any": 0, "max_run": 0}

    def add(self, acc: dict, batch: TokenBatch) -> dict:
        r = self._per_row(batch)
        return {
            "n_rows": acc["n_rows"] + batch.n_rows,
            "n_tokens": acc["n_tokens"] + int(r["len"].sum()),
            "flag_rows": acc["flag_rows"] + int(r["flag"].sum()),
            "tok_big": acc["tok_big"] + int(r["cov_big"].sum()),
            "tok_any": acc["tok_any"] + int(r["cov_any"].sum()),
            "max_run": max(acc["max_run"], int(r["max_run"].max()) if batch.n_rows else 0),
        }

    def merge(self, accs: Iterable[dict]) -> dict:
        accs = list(accs)
        out = self.create()
        for a in accs:
            for k in ("n_rows", "n_tokens", "flag_rows", "tok_big", "tok_any"):
                out[k] += a[k]
            out["max_run"] = max(out["max_run"], a["max_run"])
        return out

    def result(self, acc: dict) -> dict[str, float]:
        nr, nt = acc["n_rows"], acc["n_tokens"]
        nan = float("nan")
        return {
            "repeat_run_rows_frac": acc["flag_rows"] / nr if nr else nan,
            "repeat_token_frac": acc["tok_big"] / nt if nt else nan,
            "repeat_any_token_frac": acc["tok_any"] / nt if nt else nan,
            "max_repeat_run": float(acc["max_run"]) if nr else nan,
        }

    def row_signals(self, batch: TokenBatch) -> dict[str, np.ndarray]:
        r = self._per_row(batch)
        ln = r["len"].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return {
                "repeat_run_rows_frac": r["flag"].astype(np.float64),
                "repeat_token_frac": np.where(ln > 0, r["cov_big"] / ln, np.nan),
                "repeat_any_token_frac": np.where(ln > 0, r["cov_any"] / ln, np.nan),
                "max_repeat_run": r["max_run"].astype(np.float64),
            }
