"""Row-level evidence: how many rows of a batch are anomalous on a signal, against the natural rate of such
rows in a reference, as a binomial tail on each signal's own null scale.

Inputs are row signal values (``rows x signals``) of one or more *groups* of rows (a training step's batch,
a shard) and of a *reference* (the rows of the control steps; a corpus). Each signal is looked at through
one or two :class:`Family` orientations (the tail where an anomaly lives: high rare-token share, low
compression ratio, both tails of row length), after which high is anomalous.

**Bins.** An oriented value ``y >= 0`` falls in bin 0 when ``y == 0`` (or NaN: the signal does not apply to
the row), else in bin ``1 + floor(16 * (log2 y + 24))`` clipped to ``1..768`` (``2^-24 <= y < 2^24`` at a
relative resolution of 2^(1/16), 4.4%). A fraction's low tail is ``y = 1 - x``, a positive quantity's low
tail ``y = 1 / x``. Bins make every group and the reference plain count histograms: mergeable, and a
member's own rows are taken out of the reference by subtraction (leave-one-out is exact).

**Scan statistic.** For a group of ``N`` rows and a family, every bin ``b >= 1`` that one of the group's
rows falls in is a candidate cut. At the cut, ``k`` = the group's rows in bins ``>= b``, ``a`` = the
reference rows in bins ``>= b`` (leave-one-out: without the group's own rows when it is part of the
reference), and the natural rate ``r = (a + 0.5) / (R + 1)`` over the ``R`` reference rows. The cut's
evidence is ``e = -log10 P(X >= k)``, ``X ~ Binomial(N, r)``: the probability that ``N`` rows drawn at the
natural rate give at least ``k`` rows this extreme. The family's evidence is the largest over its cuts
(the scan adapts the cut to the anomaly: 2 rows far beyond every reference row, or 12 rows moderately
beyond most); a row value equal to the reference's mode never gives evidence (its natural rate is that of
the mode), nor does a zero of a zero-inflated signal (bin 0 is never a cut). The group's statistic is
``T = max`` over families: every family on its own null scale, so a heavy-tailed or zero-inflated signal
does not set the bar for the others. The family's *rows* are those at the highest cut whose evidence is within
1 (a factor 10 in probability) of its best: the most extreme rows that carry the evidence, so that a natural
row just below a planted block is not named with it.

``T`` is not itself a p-value (rows of a batch are not independent, the scan and the maximum over families
are multiple comparisons); :mod:`.verdict` calibrates it on control steps, exactly under exchangeability.

The binomial tail is the regularised incomplete beta ``P(X >= k) = I_r(k, N - k + 1)`` by its continued
fraction (vectorised, in log space, so evidence of hundreds is exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

PER_OCTAVE = 16
LOG2_MIN = -24
LOG2_MAX = 24
#: Bins per family: 0 (zero / NaN) and 1..768.
NBINS = 1 + (LOG2_MAX - LOG2_MIN) * PER_OCTAVE
BIN_DTYPE = np.uint16
LN10 = math.log(10.0)
#: A family's rows (its reported cut) are those at the highest cut whose evidence is within this of its best.
FLAG_TOLERANCE = 1.0


@dataclass(frozen=True)
class Family:
    """One oriented row signal: ``signal`` looked at in its ``tail`` (``high`` or ``low``). ``kind`` says how
    the low tail is oriented: ``frac`` (a share in [0, 1]: ``1 - x``), ``pos`` (a positive quantity:
    ``1 / x``) or ``flag`` (0/1, high tail only)."""

    signal: str
    tail: str = "high"
    kind: str = "pos"

    @property
    def name(self) -> str:
        return self.signal if self.tail == "high" else f"{self.signal}:low"


def orient(values: np.ndarray, col: int | np.ndarray, family: Family) -> np.ndarray:
    """The oriented value ``y`` (high = anomalous, >= 0, NaN kept) of one column of ``values``."""
    x = np.asarray(values[:, col] if np.ndim(values) == 2 else values, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if family.tail == "high":
            y = np.maximum(x, 0.0)
        elif family.kind == "frac":
            y = np.maximum(1.0 - x, 0.0)
        else:
            y = np.where(x > 0, 1.0 / np.where(x > 0, x, 1.0), np.where(x == 0, np.inf, np.nan))
    return np.where(np.isnan(x), np.nan, y)


def to_bins(y: np.ndarray) -> np.ndarray:
    """Bin of each oriented value (see the module docstring), uint16. Computed over the whole array (no gather of the
    positive values): the same float operations on every element, non-positive and NaN values then set to bin 0."""
    y = np.asarray(y, dtype=np.float64)
    pos = y > 0  # NaN compares False: bin 0
    with np.errstate(divide="ignore", invalid="ignore"):
        b = np.minimum(y, 2.0 ** LOG2_MAX, out=np.empty(y.shape))  # (an array also for one value)
        np.log2(b, out=b)
        b -= LOG2_MIN
        b *= PER_OCTAVE
        b += 1e-9
        np.floor(b, out=b)
    np.clip(b, 0, NBINS - 2, out=b)
    b += 1
    b[~pos] = 0
    return b.astype(BIN_DTYPE)


def bin_floor(b: np.ndarray | int) -> np.ndarray:
    """The smallest oriented value in bin ``b`` (0 for bin 0)."""
    b = np.asarray(b, dtype=np.float64)
    return np.where(b >= 1, 2.0 ** ((b - 1) / PER_OCTAVE + LOG2_MIN), 0.0)


def cut_value(family: Family, b: int) -> float:
    """The cut of bin ``b`` in the signal's own units: rows at the cut have ``x >=`` it (high tail) or
    ``x <=`` it (low tail)."""
    y = float(bin_floor(b))
    if family.tail == "high":
        return y
    if family.kind == "frac":
        return 1.0 - y
    return math.inf if y == 0 else 1.0 / y


def bin_matrix(values: np.ndarray, names: Sequence[str], families: Sequence[Family]) -> np.ndarray:
    """``rows x families`` bins of a ``rows x signals`` matrix whose columns are ``names``; a family whose
    signal is absent gets bin 0 (no evidence). Vectorised over the whole matrix (same values as
    :func:`orient` then :func:`to_bins`, column by column)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1, len(names))
    pos = {n: j for j, n in enumerate(names)}
    cols = np.array([pos.get(f.signal, -1) for f in families], dtype=np.int64)
    ok = cols >= 0
    high = np.array([f.tail == "high" for f in families], dtype=bool) & ok
    low_frac = np.array([f.tail != "high" and f.kind == "frac" for f in families], dtype=bool) & ok
    inverse = ok & ~high & ~low_frac
    # each column group oriented on its own columns only; NaN stays NaN (np.maximum propagates it)
    y = np.full((len(values), len(families)), np.nan)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if high.any():
            y[:, high] = np.maximum(values[:, cols[high]], 0.0)
        if low_frac.any():
            y[:, low_frac] = np.maximum(1.0 - values[:, cols[low_frac]], 0.0)
        if inverse.any():
            x = values[:, cols[inverse]]
            y[:, inverse] = np.where(x > 0, 1.0 / np.where(x > 0, x, 1.0), np.where(x == 0, np.inf, np.nan))
    return to_bins(y)


# ------------------------------------------------------------------------------------------ binomial


def _lgamma(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    u, inv = np.unique(x, return_inverse=True)
    return np.array([math.lgamma(v) for v in u.tolist()], dtype=np.float64)[inv].reshape(x.shape)


def _log_betainc_cf(a: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """log I_x(a, b) by the continued fraction (modified Lentz), accurate where ``x < (a+1)/(a+b+2)``."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = np.ones_like(x)
    d = 1.0 - qab * x / qap
    d = np.where(np.abs(d) < tiny, tiny, d)
    d = 1.0 / d
    h = d.copy()
    live = np.ones(x.shape, dtype=bool)
    iters = int(min(5000, 20 + 4 * math.sqrt(float(np.max(np.maximum(a, b))) if a.size else 1.0)))
    for m in range(1, iters + 1):
        m2 = 2.0 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = np.where(np.abs(d) < tiny, tiny, d)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < tiny, tiny, c)
        d = 1.0 / d
        h = np.where(live, h * d * c, h)
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = np.where(np.abs(d) < tiny, tiny, d)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < tiny, tiny, c)
        d = 1.0 / d
        delta = d * c
        h = np.where(live, h * delta, h)
        live &= np.abs(delta - 1.0) > 1e-15
        if not live.any():
            break
    with np.errstate(divide="ignore"):
        front = (a * np.log(x) + b * np.log1p(-x) - (_lgamma(a) + _lgamma(b) - _lgamma(a + b)) - np.log(a))
    return front + np.log(h)


def binom_logsf(k, n, p) -> np.ndarray:
    """Natural log of ``P(X >= k)`` for ``X ~ Binomial(n, p)``, elementwise (arrays broadcast).
    ``k <= 0`` gives 0; ``k > n`` gives -inf."""
    k, n, p = np.broadcast_arrays(np.asarray(k, np.float64), np.asarray(n, np.float64), np.asarray(p, np.float64))
    out = np.zeros(k.shape, dtype=np.float64)
    inner = (k > 0) & (k <= n)
    out[k > n] = -np.inf
    if not inner.any():
        return out
    kk, nn, pp = k[inner], n[inner], np.clip(p[inner], 1e-300, 1.0)
    res = np.empty(kk.shape)
    a, b = kk, nn - kk + 1.0  # P(X >= k) = I_p(k, n - k + 1)
    one = pp >= 1.0
    res[one] = 0.0
    direct = ~one & (pp < (a + 1.0) / (a + b + 2.0))
    if direct.any():
        res[direct] = _log_betainc_cf(a[direct], b[direct], pp[direct])
    comp = ~one & ~direct
    if comp.any():  # I_p(a, b) = 1 - I_{1-p}(b, a)
        lc = _log_betainc_cf(b[comp], a[comp], 1.0 - pp[comp])
        res[comp] = np.log1p(-np.minimum(np.exp(lc), 1.0))
    out[inner] = np.minimum(res, 0.0)
    return out


def evidence_of(k, n, rate) -> np.ndarray:
    """``-log10 P(X >= k)``, ``X ~ Binomial(n, rate)``: the evidence of ``k`` flagged rows among ``n``."""
    return -binom_logsf(k, n, rate) / LN10


# ------------------------------------------------------------------------------------------- counts


def tail_hist(bins: np.ndarray) -> np.ndarray:
    """``families x (NBINS + 1)``: rows with bin ``>= b`` per family (column ``NBINS`` is 0)."""
    bins = np.asarray(bins).reshape(-1, bins.shape[-1] if np.ndim(bins) == 2 else 0)
    n_f = bins.shape[1]
    cnt = np.bincount((np.arange(n_f, dtype=np.int64)[None, :] * NBINS + bins.astype(np.int64)).ravel(),
                      minlength=n_f * NBINS).reshape(n_f, NBINS)
    out = np.zeros((n_f, NBINS + 1), dtype=np.int64)
    out[:, :NBINS] = np.cumsum(cnt[:, ::-1], axis=1)[:, ::-1]
    return out


def hist_to_tail(hist: np.ndarray) -> np.ndarray:
    """A ``families x NBINS`` count histogram -> its tail counts (:func:`tail_hist` layout)."""
    hist = np.asarray(hist, dtype=np.int64)
    out = np.zeros((hist.shape[0], NBINS + 1), dtype=np.int64)
    out[:, :NBINS] = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]
    return out


def bin_hist(bins: np.ndarray) -> np.ndarray:
    """``families x NBINS`` count histogram of a ``rows x families`` bin matrix (mergeable by addition)."""
    bins = np.asarray(bins)
    n_f = bins.shape[1]
    return np.bincount((np.arange(n_f, dtype=np.int64)[None, :] * NBINS + bins.astype(np.int64)).ravel(),
                       minlength=n_f * NBINS).reshape(n_f, NBINS)


@dataclass
class Evidence:
    """Per group (axis 0) and family (axis 1): the evidence ``e``, its cut bin, the group's rows at the cut
    ``k``, the reference rows at the cut ``a`` (leave-one-out where it applies), the natural rate, and
    the group's and reference's row counts."""

    e: np.ndarray
    cut: np.ndarray
    k: np.ndarray
    a: np.ndarray
    rate: np.ndarray
    n: np.ndarray  # rows per group
    ref_rows: np.ndarray  # reference rows per group (R, or R - own rows)

    @property
    def T(self) -> np.ndarray:
        return self.e.max(axis=1) if self.e.shape[1] else np.zeros(len(self.e))

    def take(self, idx) -> "Evidence":
        """The groups ``idx`` (a list or array of group indices)."""
        idx = np.asarray(idx, dtype=np.int64)
        return Evidence(self.e[idx], self.cut[idx], self.k[idx], self.a[idx], self.rate[idx], self.n[idx],
                        self.ref_rows[idx])


def scan(candidates: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], n: np.ndarray,
         ref_rows: np.ndarray, n_families: int, max_expected: float | None = None) -> Evidence:
    """The scan statistic from candidate cuts ``(group, family, k, a)`` (parallel arrays; several calls'
    candidates concatenated) for groups of ``n`` rows against ``ref_rows`` reference rows each. With
    ``max_expected``, only *row-selective* cuts count: those where a group of ``n`` rows at the natural rate
    expects at most that many rows (``n * rate <= max_expected``)."""
    n = np.asarray(n, dtype=np.int64)
    ref_rows = np.asarray(ref_rows, dtype=np.int64)
    g_n = len(n)
    shape = (g_n, n_families)
    e = np.zeros(shape)
    cut = np.zeros(shape, dtype=np.int64)
    kk = np.zeros(shape, dtype=np.int64)
    aa = np.zeros(shape, dtype=np.int64)
    rate = np.full(shape, np.nan)
    if candidates:
        g, f, b, k, a = (np.concatenate([c[i] for c in candidates]) for i in range(5))
    else:
        g = f = b = k = a = np.zeros(0, np.int64)
    # a group with no reference rows (one shard audited alone) has nothing to be anomalous against
    keep = ref_rows[g] > 0
    g, f, b, k, a = g[keep], f[keep], b[keep], k[keep], a[keep]
    if max_expected is not None and len(g):
        sel = n[g] * ((a + 0.5) / (ref_rows[g] + 1.0)) <= max_expected
        g, f, b, k, a = g[sel], f[sel], b[sel], k[sel], a[sel]
    if len(g):
        r = (a + 0.5) / (ref_rows[g] + 1.0)
        ev = evidence_of(k, n[g], r)
        key = g * n_families + f
        # the family's evidence: the largest over its cuts
        best = np.full(g_n * n_families, -np.inf)
        np.maximum.at(best, key, ev)
        # its rows: those at the highest cut whose evidence is within a factor 10 of the best (the most
        # extreme rows that carry the evidence; a natural row just below them adds nothing)
        ok = ev >= best[key] - FLAG_TOLERANCE
        g, f, b, k, a, r, ev, key = (x[ok] for x in (g, f, b, k, a, r, ev, key))
        order = np.lexsort((-b, key))
        first = order[np.r_[True, key[order][1:] != key[order][:-1]]]
        e[g[first], f[first]] = best[key[first]]
        cut[g[first], f[first]] = b[first]
        kk[g[first], f[first]] = k[first]
        aa[g[first], f[first]] = a[first]
        rate[g[first], f[first]] = r[first]
    return Evidence(e, cut, kk, aa, rate, n, ref_rows)


def candidates_from_rows(bins: np.ndarray, group: np.ndarray, ref_tail: np.ndarray,
                         loo: bool) -> tuple[np.ndarray, ...]:
    """Candidate cuts of groups given as rows: ``bins`` (rows x families), ``group`` (row -> group id).
    ``ref_tail``: the reference's :func:`tail_hist`; with ``loo`` the groups' own rows are in the reference
    and are taken out of ``a``."""
    bins = np.asarray(bins, dtype=np.int64)
    m, n_f = bins.shape
    group = np.asarray(group, dtype=np.int64)
    if not m or not n_f:
        z = np.zeros(0, np.int64)
        return z, z, z, z, z
    code = ((group[:, None] * n_f + np.arange(n_f)[None, :]) * NBINS + bins).ravel()
    code = code[bins.ravel() > 0]
    u, cnt = np.unique(code, return_counts=True)
    gf = u // NBINS
    b = u % NBINS
    # rows of the (group, family) at bins >= b: suffix sums within each (group, family) run of u
    csum = np.cumsum(cnt)
    run_end = np.r_[np.flatnonzero(gf[1:] != gf[:-1]), len(u) - 1]
    end_of = np.repeat(csum[run_end], np.diff(np.r_[-1, run_end]))
    k = end_of - csum + cnt
    g, f = gf // n_f, gf % n_f
    a = ref_tail[f, b] - (k if loo else 0)
    return g, f, b, k, a


def candidates_from_hists(hists: np.ndarray, ref_tail: np.ndarray, own_in_ref: np.ndarray
                          ) -> tuple[np.ndarray, ...]:
    """Candidate cuts of groups given as histograms ``groups x families x NBINS`` (shards); a group with
    ``own_in_ref`` has its own counts taken out of the reference."""
    hists = np.asarray(hists, dtype=np.int64)
    g_n, n_f, _ = hists.shape
    tails = np.zeros((g_n, n_f, NBINS + 1), dtype=np.int64)
    tails[:, :, :NBINS] = np.cumsum(hists[:, :, ::-1], axis=2)[:, :, ::-1]
    g, f, b = np.nonzero(hists[:, :, 1:])
    b = b + 1
    k = tails[g, f, b]
    a = ref_tail[f, b] - np.where(np.asarray(own_in_ref, bool)[g], k, 0)
    return g, f, b, k, a


def group_counts_at(bins: np.ndarray, group: np.ndarray, n_groups: int, family: int, b: int) -> np.ndarray:
    """Rows of each group with bin ``>= b`` on ``family``."""
    sel = np.asarray(bins)[:, family] >= b
    return np.bincount(np.asarray(group)[sel], minlength=n_groups)
