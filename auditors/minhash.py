"""Near duplication: one-permutation MinHash over token n-gram shingles with banded LSH, vectorised.

Definitions (defaults: ``ngram=5``, ``num_perm=128`` signature values, ``threshold=0.8``, ``seed=0``):

* Shingle hash (uint32): for the n tokens starting at position i of a row,
  ``s = fmix32( sum_j u[t_{i+j}] * C_j )`` with ``u[t] = high32(fmix64(t XOR k1))`` (``k1`` is the
  token key of exact dedup, :mod:`.dedup`, so a Suite mixes every token once) and odd
  32-bit constants ``C_j`` (uint32 wrapping arithmetic). A row shorter than n (but not empty) has
  one shingle made of all its tokens: ``fmix32(sum_{j<L} u[t_j] * C_j + L * C_n)``. Empty rows
  have no shingle, their signature is all 0xFFFFFFFF, and they are never near-duplicates.
* Signature: one-permutation MinHash (Li, Owen & Zhang 2012) with optimal densification
  (Shrivastava 2017). With K = ``num_perm``, shingle s falls in bin ``floor(s * K / 2^32)`` (its top
  log2 K bits when K is a power of two) and ``sig[row, j] = min`` of the row's shingle hashes in
  bin j (``np.minimum.at``). A bin without shingles (or whose only hash is 0xFFFFFFFF) is empty
  and takes the value of the first non-empty bin in its probe order ``pi_j``: all K bins sorted
  by ``fmix64((j * K + c) XOR k_probe)``, the same for every row (Shrivastava's probing by a
  universal hash of (j, attempt), drawn without repetition so that it always ends). One hash per
  shingle instead of K: the cost no longer grows with ``num_perm``.
* Estimator: the estimated Jaccard similarity of two rows is the fraction of equal signature
  entries. For an ideal random hash each entry of two shingle sets A, B is equal with probability
  exactly J(A, B) (Shrivastava 2017: a bin is equal when the smallest hash of A | B in it belongs
  to both sets, and an empty bin copies a bin chosen by the same probe order in both rows), so the
  fraction is unbiased; when rows fill nearly every bin its variance is slightly below that of K
  independent permutations (Li et al. 2012: bins sample without replacement). Rows of 2,048 tokens
  leave a bin empty with probability ``(1 - 1/128)^2044`` (about 1e-7); shorter rows rely more on
  densification (a row shorter than n has one shingle: every entry is its hash).
* LSH: ``b`` bands of ``r`` rows, chosen as the pair (b, r) with ``b * r <= num_perm`` minimising
  ``0.5 * FP + 0.5 * FN`` where ``FP = integral_0^t 1-(1-s^r)^b ds`` and
  ``FN = integral_t^1 (1-s^r)^b ds`` (the MinHashLSH rule of datasketch; integrals by Simpson's rule
  on 2,001 points). t=0.8, 128 values give b=9, r=13. Band key = ``fmix64(sum_j sig_j * D_j
  + band * GOLDEN)`` over the band's r values (uint64).
* Candidates: rows sharing a band key. In a bucket of at most 64 rows every pair is a candidate;
  in a larger bucket each row is paired with the bucket's first row and with its predecessor
  (members ordered by a digest of their sketch, so results do not depend on input order).
* Verification uses b-bit sketches (the low 8 bits of each signature entry, Li & Koenig's b-bit
  minwise hashing): ``J = (m/num_perm - 2^-8) / (1 - 2^-8)`` where m is the number of equal bytes.
  A candidate pair is a near duplicate when ``J >= threshold``.

Agreement with datasketch (``benchmarks/auditors.py``, 100 stdlib rows of 2,048 BPE tokens against
edited copies, true Jaccard 0.35..0.97, 128 values, 5-gram shingles): mean absolute error against
the exact Jaccard 0.031 for both, bias +0.002.

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

from spike_audit.auditors.batch_cache import BatchCache
from spike_audit.auditors.hashing import GOLDEN, fmix64, maybe_repeated, seed_key
from spike_audit.auditors.segment_hashes import _CHUNK
from spike_audit.auditors.segments import chunk_bounds
from spike_audit.auditors.base import TokenBatch
from spike_audit.auditors.components import components


SIGNALS = {
    "near_dup_frac": "Fraction of rows with at least one near-duplicate row in the accumulator: sharing a MinHash "
    "LSH bucket (5-gram shingles, 128-value one-permutation MinHash with optimal densification, bands chosen for "
    "Jaccard 0.8) and estimated Jaccard >= 0.8.",
    "near_dup_max_cluster_frac": "Rows in the largest connected group of near-duplicate pairs, divided by the "
    "number of rows.",
}


U32 = np.uint32


_MAX = U32(0xFFFFFFFF)


_FM1 = U32(0x85EBCA6B)


_FM2 = U32(0xC2B2AE35)


_BUCKET_ALL_PAIRS = 64


_BBITS = 8


_FEW = 8  # rows with at most this many non-empty bins are densified through the probe ranks


def _fmix32(x: np.ndarray, tmp: np.ndarray | None = None) -> np.ndarray:
    """murmur3's 32-bit finaliser in place on ``x`` (``tmp``: optional scratch of the same shape)."""
    if tmp is None:
        tmp = np.empty_like(x)
    for shift, mult in ((16, _FM1), (13, _FM2), (16, None)):
        np.right_shift(x, U32(shift), out=tmp)
        x ^= tmp
        if mult is not None:
            x *= mult
    return x


#: :func:`optimal_bands` of the settings the tool uses by default (the suite's 0.8, the row scorer's 0.3 with 128
#: values): the search costs 0.1-0.2 CPU s per process (every Beam worker), so their answers are written down; a
#: test recomputes every entry.
KNOWN_BANDS: dict[tuple[float, int, float, float], tuple[int, int]] = {
    (0.8, 128, 0.5, 0.5): (9, 13),
    (0.3, 128, 0.5, 0.5): (37, 3),
}


@lru_cache(maxsize=64)
def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5
                  ) -> tuple[int, int]:
    """(bands, rows per band) minimising the weighted false positive + false negative area."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    known = KNOWN_BANDS.get((float(threshold), int(num_perm), float(fp_weight), float(fn_weight)))
    return known if known is not None else _search_bands(threshold, num_perm, fp_weight, fn_weight)


def _search_bands(threshold: float, num_perm: int, fp_weight: float, fn_weight: float) -> tuple[int, int]:
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
        self.key = seed_key(seed, 1)  # the token mix of exact dedup (auditors.dedup): computed once per batch
        self.c = np.array([seed_key(seed, 20 + j) & 0xFFFFFFFF | 1 for j in range(ngram + 1)], dtype=U32)
        self.d = np.array([seed_key(seed, 9000 + j) | 1 for j in range(num_perm)], dtype=np.uint64)
        k = num_perm
        self.shift = 32 - (k.bit_length() - 1) if k & (k - 1) == 0 else None
        # densification probe orders: column j lists every bin c, sorted by fmix64((j * num_perm + c) ^ key)
        z = np.arange(k * k, dtype=np.uint64)
        z ^= np.uint64(seed_key(seed, 13000))
        fmix64(z, out=z)
        probe = np.argsort(z.reshape(k, k), axis=1, kind="stable")
        self.probe_t = np.ascontiguousarray(probe.T)
        # rank[j, c]: position of bin c in bin j's probe order; column k (padding) ranks last
        self.rank = np.full((k, k + 1), k, dtype=np.int16 if k < 2**15 else np.int64)
        np.put_along_axis(self.rank, probe, np.arange(k)[None, :], axis=1)


@lru_cache(maxsize=16)
def _params(ngram: int, num_perm: int, seed: int) -> _Params:
    return _Params(ngram, num_perm, seed)


def _window_hashes(u: np.ndarray, c: np.ndarray, out: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """``out[i] = fmix32(sum_j u[i + j] * c[j])`` over the ``len(c)``-token windows of ``u`` (uint32)."""
    w = len(out)
    np.multiply(u[:w], c[0], out=out)
    for j in range(1, len(c)):
        np.multiply(u[j : j + w], c[j], out=tmp[:w])
        out += tmp[:w]
    return _fmix32(out, tmp[:w])


def _short_hashes(u: np.ndarray, starts: np.ndarray, lengths: np.ndarray, c: np.ndarray) -> np.ndarray:
    """The one shingle of each row shorter than ngram: ``fmix32(sum_{j<L} u[t_j] * C_j + L * C_n)``."""
    ngram = len(c) - 1
    j = np.arange(ngram - 1)
    idx = starts[:, None] + j[None, :]
    mask = j[None, :] < lengths[:, None]
    g = u[np.where(mask, idx, 0)] * c[None, : ngram - 1]
    g[~mask] = 0
    h = g.sum(axis=1, dtype=U32) + lengths.astype(U32) * c[ngram]
    return _fmix32(h.astype(U32))


def shingle_hashes(batch: TokenBatch, ngram: int = 5, seed: int = 0, cache: BatchCache | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """uint32 shingle hashes laid out on the token positions, plus (n_rows, 2) shingle segments.

    Row r's shingles are ``x[seg[r, 0]:seg[r, 1]]`` (empty for an empty row). ``x`` has one spare
    element; the positions that start no shingle of their row hold unspecified values.
    """
    c = cache if cache is not None else BatchCache(batch)
    p = _params(ngram, 1, seed)
    off = c.offsets
    n = c.n
    u = c.token_mix(p.key, hi32=True)
    x = np.zeros(n + 1, dtype=U32)
    w = n - ngram + 1
    if w > 0:
        _window_hashes(u, p.c[:ngram], x[:w], np.empty(w, dtype=U32))
    lengths = c.lengths()
    short = np.flatnonzero((lengths > 0) & (lengths < ngram))
    if len(short):
        x[off[short]] = _short_hashes(u, off[short], lengths[short], p.c)
    seg = np.stack([off[:-1], off[:-1] + np.where(lengths >= ngram, lengths - ngram + 1, np.minimum(lengths, 1))],
                   axis=1)
    return x, seg


def _densify(sig: np.ndarray, p: _Params) -> None:
    """Optimal densification in place: every empty bin (0xFFFFFFFF) of a row that has a non-empty
    bin takes the value of the first non-empty bin in its probe order (``p.probe_t[a, j]`` is the
    a-th bin probed for bin j).

    Rows with few non-empty bins (constant or periodic rows, very short rows) take, for every bin,
    the non-empty bin of smallest probe rank directly; the others are probed one step at a time,
    vectorised over all their empty bins (about K / non-empty probes per empty bin).
    """
    k = sig.shape[1]
    empty = sig == _MAX
    n_empty = np.count_nonzero(empty, axis=1)
    partial = (n_empty > 0) & (n_empty < k)
    few = partial & (n_empty >= k - _FEW)
    for chunk in np.array_split(np.flatnonzero(few), max(1, int(few.sum()) // 2048)):
        if len(chunk):
            _densify_few(sig, empty, k - n_empty[chunk], chunk, p.rank)
    probed = partial & ~few
    if not probed.any():
        return
    flat = sig.reshape(-1)
    if not probed.all():
        empty &= probed[:, None]
    f = np.flatnonzero(empty.reshape(-1))  # flat index of every empty bin to fill, row by row
    j = f & (k - 1) if k & (k - 1) == 0 else f % k
    orig = flat.copy()  # donors are read from the bins as they were (filled bins are not donors)
    for a in range(k):  # at most k probes: probe_t[:, j] visits every bin, and each row has a non-empty one
        cand = p.probe_t[a].take(j)
        cand += f - j
        src = orig.take(cand)
        flat[f] = src  # a miss writes 0xFFFFFFFF back, and is probed again
        miss = np.flatnonzero(src == _MAX)
        if not len(miss):
            return
        f = f.take(miss)
        j = j.take(miss)


def _densify_few(sig: np.ndarray, empty: np.ndarray, m: np.ndarray, rows: np.ndarray, rank: np.ndarray) -> None:
    """Densify ``rows`` (each with 1.._FEW non-empty bins) through the probe ranks: bin j takes the
    non-empty bin c with the smallest ``rank[j, c]`` (column k of ``rank`` pads, ranked last)."""
    k = sig.shape[1]
    width = min(_FEW, k)
    ids = np.argsort(empty[rows], axis=1, kind="stable")[:, :width]  # non-empty bins first, in order
    ids[np.arange(width)[None, :] >= m[:, None]] = k
    best = rank[:, ids].argmin(axis=2)  # (k, rows): position in ids of each bin's donor
    donor = np.take_along_axis(ids, best.T, axis=1)
    sub = sig[rows]
    sig[rows] = np.where(empty[rows], np.take_along_axis(sub, donor, axis=1), sub)


def signatures(batch: TokenBatch, ngram: int = 5, num_perm: int = 128, seed: int = 0,
               cache: BatchCache | None = None) -> np.ndarray:
    """One-permutation MinHash signatures with optimal densification, (n_rows, num_perm) uint32.

    See the module docstring for the definition. Empty rows get all 0xFFFFFFFF.
    """
    if cache is not None:  # one computation per batch and parameters
        return cache.memo(("signatures", ngram, num_perm, seed), lambda: _signatures(batch, ngram, num_perm, seed, cache))
    return _signatures(batch, ngram, num_perm, seed, BatchCache(batch))


def _signatures(batch: TokenBatch, ngram: int, num_perm: int, seed: int, c: BatchCache) -> np.ndarray:
    p = _params(ngram, num_perm, seed)
    k = num_perm
    off, n = c.offsets, c.n
    lengths = c.lengths()
    n_rows = len(lengths)
    sig = np.full(n_rows * k, _MAX, dtype=U32)
    if n == 0:
        return sig.reshape(n_rows, k)
    u = c.token_mix(p.key, hi32=True)
    base = np.arange(0, n_rows * k, k, dtype=np.intp)  # flat index of each row's first bin
    cw = p.c[:ngram]
    buf = np.empty(2 * min(n, _CHUNK + 2 * int(lengths.max())), dtype=U32)
    # Rows in groups of about _CHUNK tokens, so that every temporary stays in cache.
    for a, b in chunk_bounds(off, _CHUNK):
        s0, s1 = int(off[a]), int(off[b])
        w = s1 - s0 - ngram + 1
        if w <= 0:
            continue  # only rows shorter than ngram: handled below
        x, tmp = buf[: s1 - s0], buf[s1 - s0 : 2 * (s1 - s0)]
        _window_hashes(u[s0:s1], cw, x[:w], tmp)
        ln = lengths[a:b]
        width = int(ln[0])
        if width >= ngram and (ln == width).all():  # equal-length rows: 2-D, no index arrays
            x2 = x.reshape(b - a, width)
            x2[:, width - ngram + 1 :] = _MAX  # windows running past the row end start no shingle
            bins = _bins(x2, p, k, tmp)
            flat = np.add(bins, base[a:b, None], dtype=np.intp)
        else:
            # positions starting no shingle of their row (the last ngram-1 tokens of a row, every
            # token of a row shorter than ngram) get 0xFFFFFFFF, which never lowers a minimum
            tail = np.where(ln >= ngram, ngram - 1, ln)
            ends = off[a + 1 : b + 1] - s0
            toff = np.cumsum(tail) - tail
            idx = np.repeat(ends - tail - toff, tail)
            idx += np.arange(len(idx), dtype=np.int64)
            x[idx] = _MAX
            flat = np.repeat(base[a:b], ln)
            flat += _bins(x, p, k, tmp)
        np.minimum.at(sig, flat.ravel(), x)
    sig = sig.reshape(n_rows, k)
    # a row shorter than ngram has one shingle: every bin ends up with its value
    short = np.flatnonzero((lengths > 0) & (lengths < ngram))
    if len(short):
        sig[short] = _short_hashes(u, off[short], lengths[short], p.c)[:, None]
    _densify(sig, p)
    return sig


def _bins(x: np.ndarray, p: _Params, k: int, tmp: np.ndarray) -> np.ndarray:
    """Bin of each shingle hash: ``floor(s * k / 2^32)`` (its top log2(k) bits when k is a power of 2)."""
    if p.shift is not None:
        return np.right_shift(x, U32(p.shift), out=tmp[: x.size].reshape(x.shape))
    return ((x.astype(np.uint64) * np.uint64(k)) >> np.uint64(32)).astype(U32)


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
    # members ordered by (band key, digest, row): rows sorted once by (digest, row), then a stable
    # sort of their band keys
    by_digest = np.lexsort((np.arange(n), digest))
    flat = keys[by_digest].ravel()
    cand = maybe_repeated(flat)  # only keys that may repeat form a group of two or more: sorted alone, in order
    order = cand[np.argsort(flat[cand], kind="stable")]
    sk_ = flat[order]
    rows = by_digest[order // nb]
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
    step = max(1, (1 << 22) // max(num_perm, 1))  # pairs per block (4 M sketch bytes)
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

    def _sketch(self, batch: TokenBatch, cache: BatchCache | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if cache is not None:  # one computation per batch, shared by add and row_signals
            return cache.memo(("minhash_sketch", self.ngram, self.num_perm, self.threshold, self.seed),
                              lambda: self._sketch_uncached(batch, cache))
        return self._sketch_uncached(batch, None)

    def _sketch_uncached(self, batch: TokenBatch, cache: BatchCache | None
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sig = signatures(batch, self.ngram, self.num_perm, self.seed, cache=cache)
        ne = batch.lengths > 0
        sig = sig[ne]
        return band_keys(sig, self.threshold, self.seed), (sig & 0xFF).astype(np.uint8), ne

    def row_keys(self, batch: TokenBatch, cache: BatchCache | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The batch's non-empty rows' LSH band keys and 8-bit sketches, and the mask of non-empty rows (what
        :meth:`add` keeps; computed once per ``cache``)."""
        return self._sketch(batch, cache)

    def create(self) -> dict:
        return {"keys": [], "sketch": [], "n_rows": 0}

    def add(self, acc: dict, batch: TokenBatch, cache: BatchCache | None = None) -> dict:
        keys, sk, _ = self._sketch(batch, cache)
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
        lab, _ = components(m, lo, hi)
        biggest = int(np.bincount(lab[near]).max())
        return {"near_dup_frac": len(near) / n, "near_dup_max_cluster_frac": biggest / n}

    def row_signals(self, batch: TokenBatch, cache: BatchCache | None = None) -> dict[str, np.ndarray]:
        """Per row: ``near_dup_frac`` is 1.0 when the row has a near duplicate in the batch."""
        keys, sk, ne = self._sketch(batch, cache)
        _, (lo, hi) = self._pairs([keys], [sk])
        flag = np.zeros(len(keys), dtype=np.float64)
        flag[lo] = 1.0
        flag[hi] = 1.0
        out = np.zeros(batch.n_rows)
        out[ne] = flag
        return {"near_dup_frac": out}


# Closing note: this module is a little over 400 lines because it is one definition (shingles ->
# one-permutation MinHash -> LSH bands -> b-bit verification -> the auditor) whose parts share the
# per-seed parameters (_Params); the module docstring, which states that definition, is a seventh of it.


#: Estimated 5-gram Jaccard at which two rows of one shard are near copies for ``near_dup_in_shard``: two copies of
#: one document with 6% of tokens substituted in each are at about 0.37 (0.94^5 of the shingles survive in each),
#: below the near-duplicate join's 0.5; natural near copies inside one shard are rare (in the spike lab's corpus
#: 4.4% of a shard's rows on average at an exact Jaccard >= 0.3, against about 21% with a near duplicate anywhere).
NEAR_SHARD_FLOOR = 0.3
#: Sketch values per band for the within-shard candidates (42 bands of 3 of the 128 values): a pair at Jaccard 0.37
#: shares a band with probability 0.89, at 0.3 with 0.68, an unrelated pair (0.05) with 0.007.
NEAR_SHARD_BAND = 3


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    """The distinct values of ``a``, sorted (sort and compare with the neighbour)."""
    a = np.sort(a)
    return a[np.r_[True, a[1:] != a[:-1]]] if len(a) else a


def near_copies_within(sketch: np.ndarray, floor: float = NEAR_SHARD_FLOOR, rows_per_band: int = NEAR_SHARD_BAND,
                       chunk: int = 1 << 18) -> int:
    """Rows of one shard that are near copies of another row of it, a group of ``m`` near copies counted as
    ``m - 1`` (its first once, like exact copies): candidates are rows sharing a band of ``rows_per_band`` of
    their 8-bit MinHash sketch values (each row checked against its predecessor and the first row of every band
    bucket it is in, so a bucket of many identical rows costs linear time), kept where the estimated Jaccard
    (share of equal sketch values, corrected for 8-bit collisions) is at least ``floor``; groups are the connected
    components of the kept pairs. The rows are put in a canonical order (by sketch) first, so the count does not
    depend on the order in which a shard's chunks were merged. Vectorised over all bands at once (one sort)."""
    from spike_audit.auditors.components import components

    sk = np.asarray(sketch, dtype=np.uint8)
    if len(sk) < 2:
        return 0
    # identical sketches are one node with a multiplicity (a shard of many equal rows stays linear), in sketch
    # order, which is also the canonical order (sorted and compared with the neighbour: np.unique's hash path is
    # far slower on these)
    sk = np.ascontiguousarray(sk)
    sk = sk[np.argsort(sk.view(np.dtype((np.void, sk.shape[1]))).ravel())]  # bytewise: the rows' lexicographic order
    first = np.flatnonzero(np.r_[True, (sk[1:] != sk[:-1]).any(axis=1)])
    mult = np.diff(np.r_[first, len(sk)])
    sk = sk[first]
    n, m = sk.shape
    nb = m // rows_per_band
    # every band at once: one sort of (band, band key, row) packed in a uint64, so a bucket's rows come in row order
    # and its head is its first row; bands in chunks of about 1M entries keep a large shard's memory bounded
    rbits = max(int(n - 1).bit_length(), 1)
    kbits = 8 * rows_per_band
    if (nb - 1).bit_length() + kbits + rbits > 64:
        raise ValueError(f"near_copies_within: {n} rows x {nb} bands of {rows_per_band} values do not fit a 64-bit key")
    step = max(1, (1 << 20) // n)
    rows = np.arange(n, dtype=np.uint64)
    pairs = np.zeros(0, dtype=np.int64)
    for b0 in range(0, nb, step):
        b1 = min(nb, b0 + step)
        key = np.broadcast_to(np.arange(b0, b1, dtype=np.uint64)[None, :], (n, b1 - b0)).copy()
        for c in range(rows_per_band):
            key <<= np.uint64(8)
            key |= sk[:, b0 * rows_per_band + c:b1 * rows_per_band:rows_per_band]
        key <<= np.uint64(rbits)
        key |= rows[:, None]
        ks = np.sort(key.ravel())
        del key
        row = (ks & np.uint64((1 << rbits) - 1)).astype(np.int64)
        ks >>= np.uint64(rbits)
        same = np.r_[False, ks[1:] == ks[:-1]]
        del ks
        later = np.flatnonzero(same)
        if not len(later):
            continue
        starts = np.flatnonzero(~same)  # each bucket's first entry: its head
        head = row[starts[np.searchsorted(starts, later, side="right") - 1]]
        lo = np.r_[row[later - 1], head]
        hi = np.r_[row[later], row[later]]
        code = np.minimum(lo, hi) * n + np.maximum(lo, hi)
        pairs = _sorted_unique(np.r_[pairs, code[lo != hi]])  # chunk by chunk: bounded by the distinct pairs
    keep = []
    for s0 in range(0, len(pairs), chunk):  # bounded: at most ``chunk`` pairs' sketches compared at once
        p = pairs[s0:s0 + chunk]
        eq = (sk[p // n] == sk[p % n]).sum(axis=1) / m
        keep.append(p[(eq - 1 / 256) / (1 - 1 / 256) >= floor - 1e-12])
    p = np.concatenate(keep) if keep else np.zeros(0, np.int64)
    lab, _ = components(n, p // n, p % n)
    total = np.bincount(lab, weights=mult, minlength=n)  # rows per group (a group's label is its smallest node)
    return int((total[total >= 2] - 1).sum())
