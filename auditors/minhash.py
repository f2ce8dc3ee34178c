"""Near duplication: MinHash over token n-gram shingles with banded LSH, vectorised over whole batches.

Definitions (defaults: ``ngram=5``, ``num_perm=128``, ``threshold=0.8``, ``seed=0``):

* Shingle hash (uint32): for the n tokens starting at position i of a row,
  ``s = fmix32( sum_j u[t_{i+j}] * C_j )`` with ``u[t] = high32(fmix64(t XOR k))`` and odd 32-bit
  constants ``C_j`` (uint32 wrapping arithmetic). A row shorter than n (but not empty) has one
  shingle made of all its tokens: ``fmix32(sum_{j<L} u[t_j] * C_j + L * C_n)``. Empty rows have no
  shingle, no signature, and are never near-duplicates.
* Permutation k: ``h_k(s) = (a_k * s + b_k) mod 2^32`` with a_k odd (a bijection of uint32),
  ``a_k, b_k`` derived from the seed. Signature ``sig[row, k] = min over the row's shingles of
  h_k(s)`` (computed with ``np.minimum.reduceat``). The estimated Jaccard similarity of two rows is
  the fraction of equal signature entries.
* LSH: ``b`` bands of ``r`` rows, chosen as the pair (b, r) with ``b * r <= num_perm`` minimising
  ``0.5 * FP + 0.5 * FN`` where ``FP = integral_0^t 1-(1-s^r)^b ds`` and
  ``FN = integral_t^1 (1-s^r)^b ds`` (the MinHashLSH rule of datasketch; integrals by Simpson's rule
  on 2,001 points). t=0.8, 128 permutations give b=9, r=13. Band key = ``fmix64(sum_j sig_j * D_j
  + band * GOLDEN)`` over the band's r values (uint64).
* Candidates: rows sharing a band key. In a bucket of at most 64 rows every pair is a candidate;
  in a larger bucket each row is paired with the bucket's first row and with its predecessor
  (members ordered by a digest of their sketch, so results do not depend on input order).
* Verification uses b-bit sketches (the low 8 bits of each signature entry, Li & Koenig's b-bit
  minwise hashing): ``J = (m/num_perm - 2^-8) / (1 - 2^-8)`` where m is the number of equal bytes.
  A candidate pair is a near duplicate when ``J >= threshold``.

Signals (``result``), over all rows of the accumulator (across every batch added or merged):

* ``near_dup_frac``: fraction of rows that have at least one near-duplicate partner.
* ``near_dup_max_cluster_frac``: size of the largest connected component of near-duplicate pairs,
  divided by the number of rows (0 when there is none).

The accumulator keeps per non-empty row its band keys (8 * b bytes) and its 8-bit sketch
(num_perm bytes): bounded by the number of rows, not tokens. For cross-shard near duplicates the
pipeline groups :func:`band_keys` of :func:`signatures` by key.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterable

import numpy as np

from auditors._util import GOLDEN, fmix64, seed_key, token_mix
from auditors.base import TokenBatch

SIGNALS = {
    "near_dup_frac": "Fraction of rows with at least one near-duplicate row in the accumulator: sharing a MinHash "
    "LSH bucket (5-gram shingles, 128 permutations, bands chosen for Jaccard 0.8) and estimated Jaccard >= 0.8.",
    "near_dup_max_cluster_frac": "Rows in the largest connected group of near-duplicate pairs, divided by the "
    "number of rows.",
}

U32 = np.uint32
_FM1 = U32(0x85EBCA6B)
_FM2 = U32(0xC2B2AE35)
_BUCKET_ALL_PAIRS = 64
_BBITS = 8
_CHUNK = 1 << 17  # tokens per row group in signatures()


def _fmix32(x: np.ndarray) -> np.ndarray:
    x ^= x >> U32(16)
    x *= _FM1
    x ^= x >> U32(13)
    x *= _FM2
    x ^= x >> U32(16)
    return x


@lru_cache(maxsize=64)
def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5
                  ) -> tuple[int, int]:
    """(bands, rows per band) minimising the weighted false positive + false negative area."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    grid = 2001  # odd: composite Simpson
    best, opt = np.inf, (1, num_perm)
    s_lo = np.linspace(0.0, threshold, grid)
    s_hi = np.linspace(threshold, 1.0, grid)
    w = np.ones(grid)
    w[1:-1:2] = 4
    w[2:-1:2] = 2
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = (1 - (1 - s_lo**r) ** b) @ w * (threshold / (grid - 1) / 3)
            fn = ((1 - s_hi**r) ** b) @ w * ((1 - threshold) / (grid - 1) / 3)
            err = fp * fp_weight + fn * fn_weight
            if err < best:
                best, opt = err, (b, r)
    return opt


class _Params:
    def __init__(self, ngram: int, num_perm: int, seed: int):
        self.key = seed_key(seed, 11)
        self.c = np.array([seed_key(seed, 20 + j) & 0xFFFFFFFF | 1 for j in range(ngram + 1)], dtype=U32)
        self.a = np.array([seed_key(seed, 1000 + k) & 0xFFFFFFFF | 1 for k in range(num_perm)], dtype=U32)
        self.b = np.array([seed_key(seed, 5000 + k) & 0xFFFFFFFF for k in range(num_perm)], dtype=U32)
        self.d = np.array([seed_key(seed, 9000 + j) | 1 for j in range(num_perm)], dtype=np.uint64)


@lru_cache(maxsize=16)
def _params(ngram: int, num_perm: int, seed: int) -> _Params:
    return _Params(ngram, num_perm, seed)


def shingle_hashes(batch: TokenBatch, ngram: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint32 shingle hashes laid out on the token positions, plus (n_rows, 2) shingle segments.

    Row r's shingles are ``x[seg[r, 0]:seg[r, 1]]`` (empty for an empty row).
    """
    p = _params(ngram, 1, seed)
    off = np.asarray(batch.offsets, dtype=np.int64)
    n = int(off[-1])
    vals = batch.values[:n]
    u = (token_mix(vals, p.key) >> np.uint64(32)).astype(U32)
    x = np.zeros(n + 1, dtype=U32)  # one spare slot so reduceat indices stay in range
    w = n - ngram + 1
    if w > 0:
        acc = x[:w]
        np.multiply(u[:w], p.c[0], out=acc)
        tmp = np.empty(w, dtype=U32)
        for j in range(1, ngram):
            np.multiply(u[j : j + w], p.c[j], out=tmp)
            acc += tmp
        _fmix32(acc)
    lengths = np.diff(off)
    short = np.flatnonzero((lengths > 0) & (lengths < ngram))
    if len(short):
        L = lengths[short]
        j = np.arange(ngram - 1)
        idx = off[short][:, None] + j[None, :]
        mask = j[None, :] < L[:, None]
        g = u[np.where(mask, idx, 0)] * p.c[None, : ngram - 1]
        g[~mask] = 0
        h = g.sum(axis=1, dtype=U32) + L.astype(U32) * p.c[ngram]
        x[off[short]] = _fmix32(h.astype(U32))
    seg = np.stack([off[:-1], off[:-1] + np.where(lengths >= ngram, lengths - ngram + 1, np.minimum(lengths, 1))],
                   axis=1)
    return x, seg


def signatures(batch: TokenBatch, ngram: int = 5, num_perm: int = 128, seed: int = 0) -> np.ndarray:
    """MinHash signatures, (n_rows, num_perm) uint32. Empty rows get all 0xFFFFFFFF."""
    x, seg = shingle_hashes(batch, ngram, seed)
    p = _params(ngram, num_perm, seed)
    n_rows = len(seg)
    sig = np.full((num_perm, n_rows), 0xFFFFFFFF, dtype=U32)
    ne = np.flatnonzero(seg[:, 1] > seg[:, 0])
    if not len(ne):
        return np.ascontiguousarray(sig.T)
    # Process rows in groups of about _CHUNK tokens so that the permuted copy stays in cache.
    ends = seg[ne, 1]
    cuts = np.searchsorted(ends, np.arange(_CHUNK, ends[-1] + _CHUNK, _CHUNK), side="right")
    cuts = np.unique(np.concatenate([[0], np.maximum(cuts, 1), [len(ne)]]))
    buf = np.empty(min(len(x), int(np.diff(np.concatenate([[0], ends[cuts[1:] - 1]])).max()) + 1), dtype=U32)
    for g0, g1 in zip(cuts[:-1], cuts[1:]):
        rows = ne[g0:g1]
        lo, hi = int(seg[rows[0], 0]), int(seg[rows[-1], 1])
        xs = x[lo : hi + 1]  # one spare element keeps reduceat indices in range
        idx = seg[rows].ravel() - lo  # interleaved start, end: even outputs are the row minima
        b = buf[: len(xs)]
        for k in range(num_perm):
            np.multiply(xs, p.a[k], out=b)
            b += p.b[k]
            sig[k, rows] = np.minimum.reduceat(b, idx)[::2]
    return np.ascontiguousarray(sig.T)


def band_keys(sigs: np.ndarray, threshold: float = 0.8, seed: int = 0) -> np.ndarray:
    """LSH band keys (n_rows, n_bands) uint64 for signatures ``sigs`` (n_rows, num_perm)."""
    n_rows, num_perm = sigs.shape
    b, r = optimal_bands(threshold, num_perm)
    p = _params(1, num_perm, seed)
    keys = np.zeros((n_rows, b), dtype=np.uint64)
    for j in range(r):
        keys += sigs[:, j : b * r : r].astype(np.uint64) * p.d[j]
    keys += (np.arange(1, b + 1, dtype=np.uint64) * np.uint64(GOLDEN))[None, :]
    return fmix64(keys, out=keys)


def _components(n: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Connected-component labels (smallest member index) by min-label propagation + pointer jumping."""
    lab = np.arange(n, dtype=np.int64)
    if not len(lo):
        return lab
    while True:
        new = lab.copy()
        np.minimum.at(new, lo, lab[hi])
        np.minimum.at(new, hi, lab[lo])
        new = new[new]
        new = new[new]
        if np.array_equal(new, lab):
            return lab
        lab = new


def near_duplicates(keys: np.ndarray, sketch: np.ndarray, threshold: float
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Verified near-duplicate pairs among rows with band ``keys`` (n, b) and 8-bit ``sketch``
    (n, num_perm). Returns ``(lo, hi, jaccard)`` (row indices, lo < hi, estimated Jaccard)."""
    n, nb = keys.shape
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
    if n < 2:
        return empty
    num_perm = sketch.shape[1]
    sk64 = np.ascontiguousarray(sketch).view(np.uint64) if num_perm % 8 == 0 else sketch.astype(np.uint64)
    digest = (sk64 * (np.arange(sk64.shape[1], dtype=np.uint64) * np.uint64(2) + np.uint64(GOLDEN))).sum(
        axis=1, dtype=np.uint64)
    digest = fmix64(digest)
    flat = keys.ravel()
    rowid = np.repeat(np.arange(n, dtype=np.int64), nb)
    order = np.lexsort((rowid, digest[rowid], flat))
    sk_ = flat[order]
    rows = rowid[order]
    brk = np.flatnonzero(sk_[1:] != sk_[:-1]) + 1
    gstart = np.concatenate([[0], brk])
    gsize = np.diff(np.concatenate([gstart, [len(sk_)]]))
    multi = gsize >= 2
    if not multi.any():
        return empty
    gstart, gsize = gstart[multi], gsize[multi]
    los, his = [], []
    small = gsize <= _BUCKET_ALL_PAIRS
    if small.any():
        st, sz = gstart[small], gsize[small]
        # member q of a group of size m pairs with members q+1..m-1
        mem_pos = np.repeat(st, sz) + (np.arange(sz.sum()) - np.repeat(np.cumsum(sz) - sz, sz))
        q = mem_pos - np.repeat(st, sz)
        cnt = np.repeat(sz, sz) - 1 - q
        i = np.repeat(mem_pos, cnt)
        j = i + 1 + (np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt))
        los.append(rows[i])
        his.append(rows[j])
    if (~small).any():
        st, sz = gstart[~small], gsize[~small]
        mem_pos = np.repeat(st, sz) + (np.arange(sz.sum()) - np.repeat(np.cumsum(sz) - sz, sz))
        first = np.repeat(st, sz)
        nf = mem_pos != first
        los += [rows[first[nf]], rows[mem_pos[nf] - 1]]
        his += [rows[mem_pos[nf]], rows[mem_pos[nf]]]
    a = np.concatenate(los)
    b = np.concatenate(his)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    ok = lo != hi
    code = np.unique(lo[ok] * np.int64(n) + hi[ok])
    lo, hi = code // n, code % n
    match = np.empty(len(lo), dtype=np.int64)
    step = max(1, 1 << 22 // max(num_perm, 1))
    for s in range(0, len(lo), step):
        match[s : s + step] = (sketch[lo[s : s + step]] == sketch[hi[s : s + step]]).sum(axis=1)
    p0 = 2.0**-_BBITS
    jac = (match / num_perm - p0) / (1 - p0)
    keep = jac >= threshold - 1e-12
    return lo[keep], hi[keep], jac[keep]


class NearDup:
    """MinHash LSH near-duplicate auditor (see module docstring)."""

    name = "minhash"

    def __init__(self, ngram: int = 5, num_perm: int = 128, threshold: float = 0.8, seed: int = 0):
        if ngram < 1 or num_perm < 2:
            raise ValueError("ngram must be >= 1 and num_perm >= 2")
        self.ngram, self.num_perm, self.threshold, self.seed = ngram, num_perm, threshold, seed
        self.bands, self.rows_per_band = optimal_bands(threshold, num_perm)

    def _sketch(self, batch: TokenBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sig = signatures(batch, self.ngram, self.num_perm, self.seed)
        ne = batch.lengths > 0
        sig = sig[ne]
        return band_keys(sig, self.threshold, self.seed), (sig & 0xFF).astype(np.uint8), ne

    def create(self) -> dict:
        return {"keys": [], "sketch": [], "n_rows": 0}

    def add(self, acc: dict, batch: TokenBatch) -> dict:
        keys, sk, _ = self._sketch(batch)
        return {"keys": acc["keys"] + [keys], "sketch": acc["sketch"] + [sk], "n_rows": acc["n_rows"] + batch.n_rows}

    def merge(self, accs: Iterable[dict]) -> dict:
        accs = list(accs)
        return {
            "keys": [k for a in accs for k in a["keys"]],
            "sketch": [s for a in accs for s in a["sketch"]],
            "n_rows": sum(a["n_rows"] for a in accs),
        }

    def _pairs(self, keys_list, sk_list):
        if not keys_list:
            return 0, (np.zeros(0, np.int64),) * 2
        keys = np.concatenate(keys_list) if len(keys_list) > 1 else keys_list[0]
        sk = np.concatenate(sk_list) if len(sk_list) > 1 else sk_list[0]
        lo, hi, _ = near_duplicates(keys, sk, self.threshold)
        return len(keys), (lo, hi)

    def result(self, acc: dict) -> dict[str, float]:
        n = acc["n_rows"]
        if not n:
            return {k: float("nan") for k in SIGNALS}
        m, (lo, hi) = self._pairs(acc["keys"], acc["sketch"])
        if not len(lo):
            return {"near_dup_frac": 0.0, "near_dup_max_cluster_frac": 0.0}
        near = np.unique(np.concatenate([lo, hi]))
        lab = _components(m, lo, hi)
        biggest = int(np.bincount(lab[near]).max())
        return {"near_dup_frac": len(near) / n, "near_dup_max_cluster_frac": biggest / n}

    def row_signals(self, batch: TokenBatch) -> dict[str, np.ndarray]:
        """Per row: ``near_dup_frac`` is 1.0 when the row has a near duplicate in the batch."""
        keys, sk, ne = self._sketch(batch)
        _, (lo, hi) = self._pairs([keys], [sk])
        flag = np.zeros(len(keys), dtype=np.float64)
        flag[lo] = 1.0
        flag[hi] = 1.0
        out = np.zeros(batch.n_rows)
        out[ne] = flag
        return {"near_dup_frac": out}
