"""Token distribution: unigram histogram, entropy, divergence from a baseline, densities, lengths.

The accumulator keeps a unigram histogram (int64, one bin per token id; it grows when ids exceed
the vocab size), the row-length counts (distinct lengths with their counts), and a log-bucketed
histogram of document lengths: all bounded by the vocab size or the longest row, never by tokens.

Definitions (``c_t`` = count of token t, ``N = sum c_t``, ``p_t = c_t / N``; baseline counts ``b_t``
with ``q_t = b_t / sum b``; log base 2):

* ``token_entropy = -sum p_t log2 p_t`` (bits).
* ``token_jsd = JS(p, q) = H((p+q)/2) - (H(p) + H(q)) / 2`` in bits, in [0, 1]; NaN without baseline.
* ``baseline_xent = -sum p_t log2 q'_t`` with add-half smoothing ``q'_t = (b_t + 0.5) / (sum b +
  0.5 V)`` (V = number of bins): mean surprisal of the tokens under the baseline unigram model.
* ``top_token_share = max_t p_t``.
* ``rare_token_share = sum of p_t over tokens with q_t < rare_threshold`` (default 1e-6, unseen
  tokens included); NaN without baseline.
* ``distinct_token_ratio = #{t : c_t > 0} / N``.
* ``eos_density = c_eos / N`` and ``pad_density = c_pad / N`` (NaN when the id is not given).
* Row lengths (exact): ``row_len_mean``, ``row_len_p50``, ``row_len_p95`` where the q-quantile is the
  smallest length L with at least a fraction q of the rows no longer than L (nearest rank).
* ``offmodal_row_frac``: fraction of rows whose length differs from the modal row length (ties:
  the smaller length); ``short_row_frac``: fraction of rows shorter than ``short_row_len``
  (default 32 tokens).
* Documents are maximal runs of non-EOS tokens inside a row (needs ``eos_id``). ``doc_len_mean`` is
  exact; ``doc_len_p50``/``doc_len_p95`` come from a histogram with 8 buckets per power of two
  (bucket ``k = floor(8 * log2(len))``) and report the bucket's geometric centre ``2^((k + 0.5)/8)``
  (within 4.4% of the exact nearest-rank quantile). NaN without ``eos_id`` or documents.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from spike_audit.auditors.batch_cache import BatchCache
from spike_audit.auditors.segments import segments_from_mask
from spike_audit.auditors.base import TokenBatch

SIGNALS = {
    "token_entropy": "Shannon entropy of the unigram token distribution, bits.",
    "token_jsd": "Jensen-Shannon divergence (base 2, in [0, 1]) between the unigram distribution and the "
    "baseline histogram; NaN without baseline.",
    "baseline_xent": "Mean surprisal of the tokens under the baseline unigram model with add-0.5 smoothing, "
    "bits/token; NaN without baseline.",
    "top_token_share": "Share of the most frequent token.",
    "rare_token_share": "Share of tokens whose baseline probability is below 1e-6 (unseen included); NaN "
    "without baseline.",
    "distinct_token_ratio": "Distinct token ids divided by tokens.",
    "eos_density": "EOS tokens per token; NaN without eos_id.",
    "pad_density": "Padding tokens per token; NaN without pad_id.",
    "row_len_mean": "Mean row length, tokens.",
    "row_len_p50": "Median row length (nearest rank), tokens.",
    "row_len_p95": "95th percentile row length (nearest rank), tokens.",
    "offmodal_row_frac": "Fraction of rows whose length differs from the modal row length.",
    "short_row_frac": "Fraction of rows shorter than 32 tokens.",
    "doc_len_mean": "Mean length of EOS-separated documents (non-EOS runs inside a row); NaN without eos_id.",
    "doc_len_p50": "Median document length from a log2 histogram with 8 buckets per octave (bucket centre); "
    "NaN without eos_id.",
    "doc_len_p95": "95th percentile document length from the same histogram; NaN without eos_id.",
}

_SUB = 8  # buckets per power of two
_NBUCKETS = _SUB * 64


def _bincount(values: np.ndarray, size: int) -> np.ndarray:
    if len(values) == 0:
        return np.zeros(size, dtype=np.int64)
    h = np.bincount(values, minlength=size)
    return h.astype(np.int64, copy=False)


def _add_hist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(a) < len(b):
        a, b = b, a
    out = a.copy()
    out[: len(b)] += b
    return out


def _entropy(counts: np.ndarray) -> float:
    n = counts.sum()
    if n <= 0:
        return float("nan")
    p = counts[counts > 0] / n
    return float(-(p * np.log2(p)).sum())


def jensen_shannon(p_counts: np.ndarray, q_counts: np.ndarray) -> float:
    """JS divergence in bits between two count vectors (padded to equal length)."""
    m = max(len(p_counts), len(q_counts))
    p = np.zeros(m)
    q = np.zeros(m)
    p[: len(p_counts)] = p_counts
    q[: len(q_counts)] = q_counts
    if p.sum() <= 0 or q.sum() <= 0:
        return float("nan")
    p /= p.sum()
    q /= q.sum()
    mix = (p + q) / 2
    js = _entropy(mix) - (_entropy(p) + _entropy(q)) / 2
    return float(min(max(js, 0.0), 1.0))


def log_bucket(lengths: np.ndarray) -> np.ndarray:
    """Bucket ``floor(8 * log2(len))`` of positive lengths (int64)."""
    return np.floor(np.log2(np.asarray(lengths, dtype=np.float64)) * _SUB + 1e-9).astype(np.int64)


def _quantile_counts(values: np.ndarray, counts: np.ndarray, q: float) -> float:
    """Nearest-rank quantile of ``values`` (sorted) repeated ``counts`` times."""
    total = counts.sum()
    if total <= 0:
        return float("nan")
    cum = np.cumsum(counts)
    k = max(int(np.ceil(q * total)), 1)
    return float(values[np.searchsorted(cum, k)])


class Histogram:
    """Unigram histogram only: the first pass that builds a baseline (``histogram(acc)``)."""

    name = "histogram"

    def __init__(self, vocab_size: int | None = None):
        self.vocab_size = int(vocab_size or 0)

    def create(self) -> np.ndarray:
        return np.zeros(self.vocab_size, dtype=np.int64)

    def add(self, acc: np.ndarray, batch: TokenBatch) -> np.ndarray:
        v = batch.values[: batch.offsets[-1]] if len(batch.offsets) else batch.values[:0]
        return _add_hist(acc, _bincount(v, self.vocab_size))

    def merge(self, accs: Iterable[np.ndarray]) -> np.ndarray:
        out = self.create()
        for a in accs:
            out = _add_hist(out, a)
        return out

    def histogram(self, acc: np.ndarray) -> np.ndarray:
        return acc

    def result(self, acc: np.ndarray) -> dict[str, float]:
        return {"n_tokens": float(acc.sum()), "token_entropy": _entropy(acc)}

    def row_signals(self, batch: TokenBatch) -> dict[str, np.ndarray]:
        return {}


class TokenStats:
    """Token distribution auditor (see module docstring)."""

    name = "tokens"

    def __init__(self, vocab_size: int | None = None, baseline_hist: np.ndarray | None = None,
                 eos_id: int | None = None, pad_id: int | None = None, rare_threshold: float = 1e-6,
                 short_row_len: int = 32):
        self.vocab_size = int(vocab_size or 0)
        self.eos_id, self.pad_id = eos_id, pad_id
        self.rare_threshold, self.short_row_len = rare_threshold, short_row_len
        self.baseline = None if baseline_hist is None else np.asarray(baseline_hist, dtype=np.int64)
        if self.baseline is not None and self.baseline.sum() <= 0:
            raise ValueError("baseline histogram is empty")

    # ---- baseline-derived per-token tables (grown to the histogram length on demand)
    def _base(self, size: int) -> np.ndarray:
        b = np.zeros(max(size, len(self.baseline)), dtype=np.float64)
        b[: len(self.baseline)] = self.baseline
        return b

    def _surprisal(self, size: int) -> np.ndarray:
        b = self._base(size)
        return -np.log2((b + 0.5) / (b.sum() + 0.5 * len(b)))

    def _rare(self, size: int) -> np.ndarray:
        b = self._base(size)
        return b / b.sum() < self.rare_threshold

    def create(self) -> dict:
        return {
            "hist": np.zeros(self.vocab_size, dtype=np.int64),
            "row_len": (np.zeros(0, np.int64), np.zeros(0, np.int64)),
            "doc_hist": np.zeros(_NBUCKETS, dtype=np.int64),
            "doc_sum": 0,
            "n_docs": 0,
        }

    def add(self, acc: dict, batch: TokenBatch, cache: BatchCache | None = None) -> dict:
        c = cache if cache is not None else BatchCache(batch)
        hist = _add_hist(acc["hist"], _bincount(c.values, self.vocab_size))
        row_len = _merge_lengths([acc["row_len"], _value_counts(c.lengths())])
        doc_hist, doc_sum, n_docs = acc["doc_hist"], acc["doc_sum"], acc["n_docs"]
        if self.eos_id is not None:
            s, e, _ = c.docs(self.eos_id)
            dl = e - s
            if len(dl):
                doc_hist = doc_hist + np.bincount(log_bucket(dl), minlength=_NBUCKETS)[:_NBUCKETS]
                doc_sum += int(dl.sum())
                n_docs += len(dl)
        return {"hist": hist, "row_len": row_len, "doc_hist": doc_hist, "doc_sum": doc_sum, "n_docs": n_docs}

    def merge(self, accs: Iterable[dict]) -> dict:
        out = self.create()
        accs = list(accs)
        for a in accs:
            out["hist"] = _add_hist(out["hist"], a["hist"])
            out["doc_hist"] = out["doc_hist"] + a["doc_hist"]
            out["doc_sum"] += a["doc_sum"]
            out["n_docs"] += a["n_docs"]
        out["row_len"] = _merge_lengths([a["row_len"] for a in accs])
        return out

    def result(self, acc: dict) -> dict[str, float]:
        nan = float("nan")
        hist = acc["hist"]
        n = int(hist.sum())
        out = dict.fromkeys(SIGNALS, nan)
        if n:
            out["token_entropy"] = _entropy(hist)
            out["top_token_share"] = float(hist.max() / n)
            out["distinct_token_ratio"] = float(np.count_nonzero(hist) / n)
            if self.eos_id is not None:
                out["eos_density"] = float(hist[self.eos_id] / n) if self.eos_id < len(hist) else 0.0
            if self.pad_id is not None:
                out["pad_density"] = float(hist[self.pad_id] / n) if self.pad_id < len(hist) else 0.0
            if self.baseline is not None:
                size = len(hist)
                out["token_jsd"] = jensen_shannon(hist, self.baseline)
                h = np.zeros(max(size, len(self.baseline)))
                h[:size] = hist
                out["baseline_xent"] = float(h @ self._surprisal(size) / n)
                out["rare_token_share"] = float(h[self._rare(size)].sum() / n)
        lu, lc = acc["row_len"]
        nr = int(lc.sum())
        if nr:
            out["row_len_mean"] = float((lu * lc).sum() / nr)
            out["row_len_p50"] = _quantile_counts(lu, lc, 0.5)
            out["row_len_p95"] = _quantile_counts(lu, lc, 0.95)
            mode = lu[np.argmax(lc)]
            out["offmodal_row_frac"] = float(lc[lu != mode].sum() / nr)
            out["short_row_frac"] = float(lc[lu < self.short_row_len].sum() / nr)
        if self.eos_id is not None and acc["n_docs"]:
            out["doc_len_mean"] = acc["doc_sum"] / acc["n_docs"]
            ks = np.arange(_NBUCKETS)
            for q, name in ((0.5, "doc_len_p50"), (0.95, "doc_len_p95")):
                k = _quantile_counts(ks, acc["doc_hist"], q)
                out[name] = float(2.0 ** ((k + 0.5) / _SUB))
        return out

    def row_signals(self, batch: TokenBatch) -> dict[str, np.ndarray]:
        """Per row: ``token_entropy``, ``top_token_share``, ``distinct_token_ratio`` of the row's own
        tokens; ``baseline_xent`` and ``rare_token_share`` (with a baseline), ``eos_density``,
        ``pad_density``, ``row_len``, ``doc_len_mean`` (mean length of the row's documents)."""
        off = np.asarray(batch.offsets, dtype=np.int64)
        n, n_rows = int(off[-1]), batch.n_rows
        v = batch.values[:n]
        ln = np.diff(off).astype(np.float64)
        nan = np.full(n_rows, np.nan)
        out: dict[str, np.ndarray] = {"row_len": ln.copy()}
        row = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(off))
        with np.errstate(invalid="ignore", divide="ignore"):
            if n:
                krow, cnt = _row_token_counts(v, ln, row)
                p = cnt / ln[krow]
                out["token_entropy"] = np.bincount(krow, weights=-p * np.log2(p), minlength=n_rows)
                top = np.zeros(n_rows)
                starts = np.flatnonzero(np.r_[True, krow[1:] != krow[:-1]])  # krow is sorted: each row's first
                top[krow[starts]] = np.maximum.reduceat(p, starts)
                out["top_token_share"] = top
                out["distinct_token_ratio"] = np.bincount(krow, minlength=n_rows) / ln
                empty = ln == 0
                for k in ("token_entropy", "top_token_share", "distinct_token_ratio"):
                    out[k][empty] = np.nan
            else:
                for k in ("token_entropy", "top_token_share", "distinct_token_ratio"):
                    out[k] = nan.copy()
            size = max(int(v.max()) + 1 if n else 0, self.vocab_size)
            if self.baseline is not None:
                out["baseline_xent"] = np.bincount(row, weights=self._surprisal(size)[v], minlength=n_rows) / ln
                out["rare_token_share"] = _row_counts(self._rare(size)[v], row, ln) / ln
            else:
                out["baseline_xent"] = nan.copy()
                out["rare_token_share"] = nan.copy()
            for name, tid in (("eos_density", self.eos_id), ("pad_density", self.pad_id)):
                out[name] = (_row_counts(v == tid, row, ln) / ln) if tid is not None else nan.copy()
            if self.eos_id is not None:
                s, e, drow = segments_from_mask(off, v == self.eos_id)
                cnt = np.bincount(drow, minlength=n_rows)
                out["doc_len_mean"] = np.bincount(drow, weights=e - s, minlength=n_rows) / np.where(cnt, cnt, np.nan)
            else:
                out["doc_len_mean"] = nan.copy()
        return out


def _row_counts(mask: np.ndarray, row: np.ndarray, ln: np.ndarray) -> np.ndarray:
    """True entries per row, as integers (exact, so the same numbers as a float ``bincount`` of the mask): a row
    sum where the rows are of one length, else a count of the rows of the true entries."""
    n_rows = len(ln)
    if n_rows and len(mask) == n_rows * int(ln[0]) and (ln == ln[0]).all():
        return mask.reshape(n_rows, int(ln[0])).sum(axis=1, dtype=np.int64)
    return np.bincount(row[mask], minlength=n_rows)


def _row_token_counts(v: np.ndarray, ln: np.ndarray, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every distinct (row, token) of a batch: its row and its count, ordered by row then token id (the order of
    ``np.unique`` over ``row << 32 | token``). One flat sort of (row, token) keys, 32-bit where the row index and
    the ids fit in 16 bits each (numpy's SIMD sort; faster than sorting each row of a 2-D array, and packed and
    ragged rows take the same path); no ``np.unique`` pass."""
    n = len(v)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if len(ln) <= 65536 and int(v.min()) >= 0 and int(v.max()) < 65536:
        key = (row.astype(np.uint32) << np.uint32(16)) | v.astype(np.uint32)
        shift = np.uint32(16)
    else:
        key = (row.astype(np.uint64) << np.uint64(32)) | v.astype(np.uint64)
        shift = np.uint64(32)
    key.sort()  # a fresh array: sorted in place, values only (any algorithm gives the same keys)
    new = np.empty(n, dtype=bool)
    new[0] = True
    np.not_equal(key[1:], key[:-1], out=new[1:])
    first = np.flatnonzero(new)
    cnt = np.empty(len(first), dtype=np.int64)
    np.subtract(first[1:], first[:-1], out=cnt[:-1])
    cnt[-1] = n - first[-1]
    return (key[first] >> shift).astype(np.int64), cnt


def _value_counts(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of a non-negative int array and their counts (int64, sorted)."""
    if len(x) and int(x.max()) <= 4 * len(x) + 65536:
        c = np.bincount(x)
        u = np.flatnonzero(c)
        return u.astype(np.int64), c[u].astype(np.int64)
    u, c = np.unique(x, return_counts=True)
    return u.astype(np.int64), c.astype(np.int64)


def _merge_lengths(parts) -> tuple[np.ndarray, np.ndarray]:
    parts = [p for p in parts if len(p[0])]
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if len(parts) == 1:
        return parts[0]
    u, inv = np.unique(np.concatenate([p[0] for p in parts]), return_inverse=True)
    c = np.bincount(inv, weights=np.concatenate([p[1] for p in parts]), minlength=len(u))
    return u, c.astype(np.int64)
