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

from spike_audit.auditors.batch_cache import BatchCache
from spike_audit.auditors.base import TokenBatch

SIGNALS = {
    "repeat_run_rows_frac": "Fraction of rows holding a repeated n-gram run (period 1..13 tokens) of at least 32 "
    "repeats, as OLMo's instance filter (repetition_max_count=32) defines it: the rows OLMo would drop.",
    "repeat_token_frac": "Fraction of tokens inside repeated n-gram runs of at least 32 repeats (period 1..13).",
    "repeat_any_token_frac": "Fraction of tokens inside any run OLMo's find_periodic_sequences reports "
    "(period 1..13, at least 3 repeats).",
    "max_repeat_run": "Largest repeat count (times) of any run OLMo's find_periodic_sequences reports "
    "(period 1..13); 0 when there is none.",
}


def _window_starts(eq: np.ndarray, width: int, bufs: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Indices ``i`` with ``eq[i : i + width]`` all True, ascending: AND of shifted copies, doubling
    the covered width at each step. ``eq`` is a prefix of ``bufs[0]`` (overwritten); ``bufs`` are two
    bool scratch arrays at least ``len(eq)`` long, used in turn so no step reads what it writes."""
    f, span, k = eq, 1, 1
    while span < width:
        s = min(span, width - span)
        g = bufs[k][: len(f) - s]
        np.logical_and(f[:-s], f[s:], out=g)
        f, span, k = g, span + s, 1 - k
    return np.flatnonzero(f)


def find_runs(batch: TokenBatch, min_period: int = 1, max_period: int = 13,
              cache: BatchCache | None = None) -> dict[str, np.ndarray]:
    """All runs OLMo's ``find_periodic_sequences`` reports, for every row at once.

    Returns arrays ``row``, ``start``, ``end`` (flat token indices, end exclusive), ``period``,
    ``times``, ordered by period then position.

    Per period p: ``eq[i - p] = (x[i] == x[i - p])``, cleared where ``i - p`` lies in the previous
    row. A run reaches ``times > 2`` only when it is at least ``2p`` long, so the runs of ``eq`` are
    found through the positions that start ``2p`` consecutive True values (the maximal runs of those
    positions map one-to-one to the maximal runs of ``eq`` of length >= 2p): the short runs, the
    vast majority, are never materialised.
    """
    c = cache if cache is not None else BatchCache(batch)
    off = c.offsets
    n = c.n
    v = c.values
    row_starts = off[:-1][np.diff(off) > 0]
    n_rows = len(off) - 1
    width = n // n_rows if n_rows and n % n_rows == 0 else 0
    packed = width > 0 and bool((np.diff(off) == width).all())  # rows of one length: boundaries by a strided view
    out = {k: [] for k in ("row", "start", "end", "period", "times")}
    eq_buf = np.empty(max(n, 1), dtype=bool)
    and_buf = np.empty(max(n, 1), dtype=bool)
    for p in range(max(min_period, 1), max_period + 1):
        if n < 3 * p:  # a kept run spans at least 3p tokens
            break
        eq = np.equal(v[p:], v[:-p], out=eq_buf[: n - p])  # eq[i - p] <=> x[i] == x[i - p]
        # comparisons reaching back into the previous row: i - p < row start <= i, i.e. eq[rs - p .. rs)
        if packed:  # the last p positions of every row of the buffer (past eq's end for the last row: unread)
            eq_buf[:n].reshape(n_rows, width)[:, max(width - p, 0):] = False
        else:
            clear = (row_starts[:, None] + np.arange(-p, 0)[None, :]).ravel()
            eq[clear[(clear >= 0) & (clear < n - p)]] = False
        idx = _window_starts(eq, 2 * p, (eq_buf, and_buf))
        if not len(idx):
            continue
        brk = np.flatnonzero(np.diff(idx) != 1) + 1
        a = idx[np.concatenate([[0], brk])] + p  # token index of the run's first True
        b = idx[np.concatenate([brk - 1, [len(idx) - 1]])] + 3 * p - 1  # ... and of its last
        r = np.searchsorted(off, a, side="right") - 1
        la = a - off[r]  # local positions
        lb = b - off[r]
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
    # starts a new merged interval; touching intervals stay apart (same total), so a row's first run never
    # merges into the previous row's last one
    new[1:] = s[1:] >= reach[:-1]
    first = np.flatnonzero(new)
    last = np.concatenate([first[1:] - 1, [len(s) - 1]])
    return np.bincount(r[first], weights=reach[last] - s[first], minlength=n_rows).astype(np.int64)


class Repetition:
    """Repeated n-gram runs per OLMo's instance filter (see module docstring)."""

    name = "repetition"

    def __init__(self, min_period: int = 1, max_period: int = 13, max_count: int = 32):
        self.min_period, self.max_period, self.max_count = min_period, max_period, max_count

    def _per_row(self, batch: TokenBatch, cache: BatchCache | None = None) -> dict[str, np.ndarray]:
        if cache is not None:  # one computation per batch, shared by add and row_signals
            return cache.memo(("repetition", self.min_period, self.max_period, self.max_count),
                              lambda: self._per_row_uncached(batch, cache))
        return self._per_row_uncached(batch, None)

    def _per_row_uncached(self, batch: TokenBatch, cache: BatchCache | None) -> dict[str, np.ndarray]:
        off = np.asarray(batch.offsets, dtype=np.int64)
        n_rows = batch.n_rows
        runs = find_runs(batch, self.min_period, self.max_period, cache=cache)
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

    def add(self, acc: dict, batch: TokenBatch, cache: BatchCache | None = None) -> dict:
        r = self._per_row(batch, cache)
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

    def row_signals(self, batch: TokenBatch, cache: BatchCache | None = None) -> dict[str, np.ndarray]:
        r = self._per_row(batch, cache)
        ln = r["len"].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return {
                "repeat_run_rows_frac": r["flag"].astype(np.float64),
                "repeat_token_frac": np.where(ln > 0, r["cov_big"] / ln, np.nan),
                "repeat_any_token_frac": np.where(ln > 0, r["cov_any"] / ln, np.nan),
                "max_repeat_run": r["max_run"].astype(np.float64),
            }
