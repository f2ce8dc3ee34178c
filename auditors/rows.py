"""Row signals: one scoring pass per row gives every row-level signal (token and text), and the oriented
families the verdict's evidence is counted on.

:class:`RowScorer` scores the rows of one batch (a training step's batch, a chunk of a shard) through a
:class:`~.batch_cache.BatchCache`, so the suite's step or shard accumulator fed the same cache
(``Suite.add(acc, batch, cache)``) reuses every per-row computation: token mixes, row and document hashes,
repeated runs, MinHash signatures and text signals are each computed once per batch. Step, shard and corpus
results are merges of those (:mod:`.suite`, :mod:`.evidence`).

Every row signal is defined in :data:`ROW_SIGNALS`; :data:`FAMILIES` says in which tail each is anomalous.
Within-batch duplication is exchangeable across steps (a step is judged on its own rows only); duplication
*elsewhere* (``seen_elsewhere``, ``replay_rows``) is measured by the pipelines against a fixed reference and is
NaN here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spike_audit.auditors import text as text_mod
from spike_audit.auditors.base import TokenBatch
from spike_audit.auditors.batch_cache import BatchCache
from spike_audit.auditors.dedup import ExactDup
from spike_audit.auditors.evidence import Family
from spike_audit.auditors.minhash import signatures
from spike_audit.auditors.repetition import Repetition
from spike_audit.auditors.segment_hashes import hash_rows_and_docs
from spike_audit.auditors.tokens import TokenStats

ROW_SIGNALS: dict[str, str] = {
    "row_len": "Tokens in the row.",
    "longest_doc": "Longest EOS-separated document in the row, tokens (the row length without eos_id).",
    "doc_len_mean": "Mean length of the row's EOS-separated documents, tokens; NaN without eos_id.",
    "token_entropy": "Shannon entropy of the row's own unigram distribution, bits.",
    "top_token_share": "Share of the row's most frequent token.",
    "distinct_token_ratio": "Distinct token ids in the row / tokens.",
    "baseline_xent": "Mean surprisal of the row's tokens under the baseline unigram (control tokens, leave-one-step-"
    "out; add-0.5 smoothing), bits/token.",
    "rare_token_share": "Share of the row's tokens whose baseline probability is below 1e-6 (unseen included).",
    "eos_density": "EOS tokens per token; NaN without eos_id.",
    "pad_density": "Padding tokens per token; NaN without pad_id.",
    "repeat_token_frac": "Share of the row's tokens inside repeated n-gram runs of >= 32 repeats (period 1..13).",
    "repeat_any_token_frac": "Share of the row's tokens inside any repeated n-gram run (>= 3 repeats, period 1..13).",
    "max_repeat_run": "Largest repeat count of any n-gram run in the row (period 1..13).",
    "repeat_run_row": "1 when the row holds a run of >= 32 repeats (OLMo's instance filter would drop it), else 0.",
    "dup_in_batch": "1 when an identical row (64-bit token hash) is earlier in the same batch, else 0 (the first of "
    "a group of copies is 0: a pair of copies is one duplicate, counted once; the skip list names the first copy "
    "with the later ones).",
    "dup_doc_frac": "Share of the row's EOS-separated documents that copy a document earlier in the same batch (the "
    "first occurrence is not counted, as in dup_in_batch).",
    "near_dup_jaccard": "Largest estimated Jaccard similarity of the row's 5-gram shingles with an earlier row of the "
    "same batch (share of equal values of their 128-value MinHash signatures; every pair compared); 0 below 0.2 (code "
    "and boilerplate share common 5-grams: that is not duplication) and without an earlier partner (the first of a "
    "group of near copies is 0, counted once like dup_in_batch; the skip list names it with the later ones).",
    "chars_per_token": "Characters of the row's text per token (the tokenizer's fertility: base64, hex dumps, numbers "
    "and other strings unlike the tokenizer's training text break into short tokens); NaN without text.",
    "seen_elsewhere": "1 when a row with identical tokens is at another position of the fixed duplicate reference "
    "(spike-audit run: the rows the manifest consumed; spike-audit shards: another shard), else 0.",
    "replay_rows": "Distinct rows of the batch whose copies elsewhere in the fixed duplicate reference were consumed "
    "together at one other step (a block), given to every row of the block but its first in batch order (counted "
    "once, like dup_in_batch: the first gets 1 and the skip list names it with the later ones): the largest over the "
    "row's blocks (a natural duplicate: 1; two natural duplicates consumed together elsewhere: 2 for the later one; "
    "k rows of an earlier batch consumed again: k for k - 1 of them); 0 when not seen elsewhere. In spike-audit "
    "shards, set per shard, a flag: 1 for the k - 1 later rows of the shard's largest block, the k distinct rows it "
    "shares with one other shard (rows held by at most 16 shards; a shard written twice, an overlapping split), else "
    "0; not measured against a saved --baseline.",
    **{k: f"Text: {v}" for k, v in text_mod.SIGNALS.items()},
    "near_dup_in_shard": "spike-audit shards only, set per shard: 1 for a row that is a near copy of another row of "
    "the same shard (estimated 5-gram Jaccard >= 0.3 from the rows' 8-bit MinHash sketches, candidates from bands of "
    "3 values; a group of m near copies counts m - 1, like copies within a batch), else 0; NaN per row and in "
    "spike-audit run (a batch's near copies are near_dup_jaccard); not measured against a saved --baseline. Two "
    "copies of one document with 6% of tokens substituted in each are at about 0.37, below the near-duplicate "
    "join's --threshold, while natural near copies inside one shard are rare.",
}

_F, _P, _FL = "frac", "pos", "flag"

#: The oriented families (tail where an anomaly lives) of the row signals.
FAMILIES: tuple[Family, ...] = (
    Family("row_len", "high", _P), Family("row_len", "low", _P),
    Family("longest_doc", "high", _P), Family("doc_len_mean", "low", _P),
    Family("token_entropy", "high", _P), Family("token_entropy", "low", _P),
    Family("top_token_share", "high", _F),
    Family("distinct_token_ratio", "high", _F), Family("distinct_token_ratio", "low", _F),
    Family("baseline_xent", "high", _P), Family("baseline_xent", "low", _P),
    Family("rare_token_share", "high", _F),
    Family("eos_density", "high", _F), Family("pad_density", "high", _F),
    Family("repeat_token_frac", "high", _F), Family("repeat_any_token_frac", "high", _F),
    Family("max_repeat_run", "high", _P), Family("repeat_run_row", "high", _FL),
    Family("dup_in_batch", "high", _FL), Family("dup_doc_frac", "high", _F),
    Family("near_dup_jaccard", "high", _F), Family("seen_elsewhere", "high", _FL),
    Family("chars_per_token", "low", _P), Family("replay_rows", "high", _P),
    *(Family(k, "high", _F) for k in text_mod.SIGNALS if k.startswith("gopher_")),
    Family("non_alnum_frac", "high", _F),
    Family("mean_word_len", "high", _P), Family("mean_word_len", "low", _P),
    Family("compression_ratio", "high", _P), Family("compression_ratio", "low", _P),
    Family("non_latin_frac", "high", _F), Family("max_char_run", "high", _P),
    Family("digit_frac", "high", _F), Family("upper_frac", "high", _F), Family("encoded_frac", "high", _F),
    Family("near_dup_in_shard", "high", _FL),  # last: the families before it keep their indices
)

FAMILY_NAMES: tuple[str, ...] = tuple(f.name for f in FAMILIES)

def rows_markdown() -> str:
    """The README's table of row signals with the tails they are judged in (generated: a test keeps it in sync)."""
    tails: dict[str, list[str]] = {}
    for f in FAMILIES:
        tails.setdefault(f.signal, []).append(f.tail)
    lines = ["| row signal | anomalous tail | definition |", "|---|---|---|"]
    for k, v in ROW_SIGNALS.items():
        lines.append(f"| `{k}` | {', '.join(tails.get(k, [])) or '-'} | {v} |")
    return "\n".join(lines) + "\n"


#: Estimated Jaccard similarity below which a row's best partner in its batch is no near duplicate (0): rows of
#: code, tables or boilerplate share common 5-grams (similarities of 0.02-0.15 between unrelated rows of real
#: text), while two copies of one document with 6% of tokens substituted keep about 0.37 (1% quantile 0.22).
NEAR_DUP_FLOOR = 0.2


#: Families whose rows are later copies of an earlier row of the batch (:attr:`RowScores.partner`): a row flagged on
#: one of them brings its partner into the skip list.
PAIRED_SIGNALS: tuple[str, ...] = ("dup_in_batch", "near_dup_jaccard", "dup_doc_frac", "replay_rows")

#: Row signals in a fixed column order (the columns of :meth:`RowScores.matrix`).
SIGNAL_ORDER: tuple[str, ...] = tuple(ROW_SIGNALS)


@dataclass
class RowScores:
    """Every row signal of a batch (``values[name]``: float64 per row), each row's 64-bit token hash and its
    ``partner``: the earlier row it copies (identical, else its most similar earlier row at or above the near
    duplicate floor), -1 for none."""

    values: dict[str, np.ndarray]
    hash: np.ndarray
    partner: np.ndarray | None = None

    @property
    def n_rows(self) -> int:
        return len(self.hash)

    def matrix(self, names=SIGNAL_ORDER) -> np.ndarray:
        """``rows x signals`` float64 in the order of ``names`` (NaN for a signal not computed)."""
        out = np.full((self.n_rows, len(names)), np.nan)
        for j, k in enumerate(names):
            v = self.values.get(k)
            if v is not None:
                out[:, j] = v
        return out


def max_jaccard_all(sig: np.ndarray, block: int = 256) -> np.ndarray:
    """Per row: the largest share of equal values between its MinHash signature (``rows x K`` uint32) and
    another row's (the estimated Jaccard similarity of their shingle sets); every pair, in blocks."""
    n, k = sig.shape
    best = np.zeros(n, dtype=np.int64)
    for a in range(0, n, block):
        x = sig[a:a + block]
        for b in range(a, n, block):
            y = sig[b:b + block]
            eq = (x[:, None, :] == y[None, :, :]).sum(axis=2)
            if a == b:
                np.fill_diagonal(eq, 0)
            best[a:a + block] = np.maximum(best[a:a + block], eq.max(axis=1))
            best[b:b + block] = np.maximum(best[b:b + block], eq.max(axis=0))
    return best / k


def chars_per_token(text, lengths: np.ndarray) -> np.ndarray:
    """Characters of each row's text per token (NaN for a missing text or a row without tokens)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = text if isinstance(text, (pa.Array, pa.ChunkedArray)) else pa.array(list(text), type=pa.string())
    try:
        chars = pc.utf8_length(arr)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # not a string column: no text to measure
        return np.full(len(lengths), np.nan)
    if isinstance(chars, pa.ChunkedArray):
        chars = chars.combine_chunks()
    c = np.asarray(chars.to_numpy(zero_copy_only=False), dtype=np.float64)
    lengths = np.asarray(lengths, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(lengths > 0, c / np.where(lengths > 0, lengths, 1.0), np.nan)


def max_jaccard_earlier(sig: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the largest share of equal MinHash values with an *earlier* row (``rows x K`` uint32
    signatures) and that row's index (the earliest of equally similar rows; -1 when no earlier row shares a
    value). Exact, from the pairs that share a value: the (column, value, row) triples are sorted once and
    every run of equal values yields its pairs, so the cost follows the shared values (a few per row in
    natural text) instead of ``rows^2 x K``; where most pairs share values (a batch of copies), or the triple
    does not fit 64 bits, every pair is compared in blocks."""
    n, k = sig.shape
    best = np.zeros(n, dtype=np.int64)
    arg = np.full(n, -1, dtype=np.int64)
    if n < 2 or k == 0:
        return best / max(k, 1), arg
    rb, cb = int(n - 1).bit_length(), int(k - 1).bit_length()
    if rb + cb + 32 > 64:
        return _max_jaccard_earlier_blocks(sig)
    trip = np.arange(k, dtype=np.uint64)[None, :] << np.uint64(32 + rb)
    trip = trip | (sig.astype(np.uint64) << np.uint64(rb)) | np.arange(n, dtype=np.uint64)[:, None]
    trip = np.sort(trip.ravel())  # by column, then value, then row
    cv = trip >> np.uint64(rb)  # (column, value): a run of equal cv is rows sharing one value
    rows = (trip & np.uint64((1 << rb) - 1)).astype(np.int64)
    start = np.ones(cv.size, dtype=bool)
    start[1:] = cv[1:] != cv[:-1]
    pos = np.arange(cv.size, dtype=np.int64)
    run_first = np.maximum.accumulate(np.where(start, pos, 0))
    r = pos - run_first  # earlier positions of the same run: the pairs this position closes
    n_pairs = int(r.sum())
    if n_pairs == 0:
        return best / k, arg
    if n_pairs > (n * n * k) // 8:
        return _max_jaccard_earlier_blocks(sig)
    first = np.cumsum(r) - r
    earlier = np.repeat(run_first - first, r) + np.arange(n_pairs, dtype=np.int64)
    key = rows[earlier] * n + np.repeat(rows, r)  # earlier row * n + later row (rows ascend within a run)
    key.sort()
    new = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    cnt = np.diff(np.r_[new, key.size])
    ii, jj = np.divmod(key[new], n)
    o = np.lexsort((ii, -cnt, jj))  # per later row: most shared values first, then the earliest row
    jj_o = jj[o]
    top = o[np.flatnonzero(np.r_[True, jj_o[1:] != jj_o[:-1]])]
    best[jj[top]] = cnt[top]
    arg[jj[top]] = ii[top]
    return best / k, arg


def _max_jaccard_earlier_blocks(sig: np.ndarray, block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """:func:`max_jaccard_earlier` comparing every pair of rows, in blocks (``O(rows^2 K)``)."""
    n, k = sig.shape
    best = np.zeros(n, dtype=np.int64)
    arg = np.full(n, -1, dtype=np.int64)
    for b in range(0, n, block):
        y = sig[b:b + block]
        jy = np.arange(b, b + len(y))
        for a in range(0, b + len(y), block):
            x = sig[a:min(a + block, b + len(y))]
            ix = np.arange(a, a + len(x))
            eq = (x[:, None, :] == y[None, :, :]).sum(axis=2)
            eq = np.where(ix[:, None] < jy[None, :], eq, -1)
            top = eq.argmax(axis=0)
            val = eq[top, np.arange(len(y))]
            upd = val > best[jy]
            best[jy[upd]] = val[upd]
            arg[jy[upd]] = ix[top[upd]]
    return best / k, arg


class RowScorer:
    """One scoring pass over the rows of a batch (see the module docstring)."""

    def __init__(self, eos_id: int | None = None, pad_id: int | None = None, vocab_size: int | None = None,
                 seed: int = 0, near_threshold: float = 0.3, ngram: int = 5, num_perm: int = 128, text: bool = True,
                 max_pairwise_rows: int = 4096, near_dup: bool = True):
        self.eos_id, self.pad_id, self.vocab_size, self.seed = eos_id, pad_id, vocab_size, seed
        self.near_threshold, self.ngram, self.num_perm, self.text = near_threshold, ngram, num_perm, text
        self.max_pairwise_rows, self.near_dup = max_pairwise_rows, near_dup
        self._repetition = Repetition()
        self._dedup = ExactDup(eos_id=eos_id, seed=seed)

    def score(self, batch: TokenBatch, baseline_hist: np.ndarray | None = None,
              cache: BatchCache | None = None) -> RowScores:
        cache = cache if cache is not None else BatchCache(batch)
        n = batch.n_rows
        base = baseline_hist if baseline_hist is not None and int(np.sum(baseline_hist)) > 0 else None
        out: dict[str, np.ndarray] = {}
        ts = TokenStats(vocab_size=self.vocab_size, baseline_hist=base, eos_id=self.eos_id, pad_id=self.pad_id)
        out.update(ts.row_signals(batch))
        lengths = cache.lengths().astype(np.float64)
        if self.eos_id is not None:
            s, e, drow = cache.docs(self.eos_id)
            longest = np.zeros(n)
            np.maximum.at(longest, drow, (e - s).astype(np.float64))
            out["longest_doc"] = longest
        else:
            out["longest_doc"] = lengths.copy()
        rep = self._repetition.row_signals(batch, cache)
        out["repeat_token_frac"] = rep["repeat_token_frac"]
        out["repeat_any_token_frac"] = rep["repeat_any_token_frac"]
        out["max_repeat_run"] = rep["max_repeat_run"]
        out["repeat_run_row"] = rep["repeat_run_rows_frac"]
        h, dh, drow = hash_rows_and_docs(cache, self.seed, self.eos_id)
        d = self._dedup.row_signals(batch, cache)
        h = np.asarray(h, dtype=np.uint64)
        # exact copies: every copy after the first of its group (a pair is one duplicate, counted once)
        _, first, inv = np.unique(h, return_index=True, return_inverse=True)
        first_of = first[np.asarray(inv).reshape(-1)] if n else np.zeros(0, np.int64)
        later = (d["dup_row_frac"] > 0) & (first_of != np.arange(n))
        out["dup_in_batch"] = later.astype(np.float64)
        doc_partner = np.full(n, -1, dtype=np.int64)
        if self.eos_id is None or not len(dh):
            out["dup_doc_frac"] = d["dup_doc_frac"]
        else:  # documents that copy an earlier document of the batch (in row, then position order)
            dh, drow = np.asarray(dh), np.asarray(drow, dtype=np.int64)
            _, dfirst, dinv = np.unique(dh, return_index=True, return_inverse=True)
            dfirst_of = dfirst[np.asarray(dinv).reshape(-1)]
            dlater = dfirst_of != np.arange(len(dh))
            per_row_docs = np.bincount(drow, minlength=n).astype(np.float64)
            per_row_later = np.bincount(drow, weights=dlater.astype(np.float64), minlength=n)
            with np.errstate(invalid="ignore", divide="ignore"):
                out["dup_doc_frac"] = np.where(per_row_docs > 0, per_row_later / per_row_docs, np.nan)
            src = drow[dfirst_of[dlater]]
            lat = drow[dlater]
            ok = src != lat  # a copy of an earlier document of another row: that row is its partner
            doc_partner[lat[ok][::-1]] = src[ok][::-1]  # the first such document's row wins
        partner = np.full(n, -1, dtype=np.int64)
        if self.near_dup:
            out["near_dup_jaccard"], partner = self._near_dup(batch, cache)
        else:
            out["near_dup_jaccard"] = np.full(n, np.nan)
        partner = np.where(later, first_of, np.where(partner >= 0, partner, doc_partner))
        out["seen_elsewhere"] = np.full(n, np.nan)
        out["replay_rows"] = np.full(n, np.nan)
        out["near_dup_in_shard"] = np.full(n, np.nan)
        out["chars_per_token"] = np.full(n, np.nan)
        if self.text and batch.text is not None:
            out.update(text_mod.TextStats().row_signals(batch, cache))
            out["chars_per_token"] = chars_per_token(batch.text, lengths)
        return RowScores(out, h, partner)

    def _near_dup(self, batch: TokenBatch, cache: BatchCache) -> tuple[np.ndarray, np.ndarray]:
        """Per row: the best estimated Jaccard with an earlier row (0 under the floor) and that row (-1)."""
        n = batch.n_rows
        out = np.zeros(n)
        partner = np.full(n, -1, dtype=np.int64)
        ne = np.flatnonzero(cache.lengths() > 0)
        if len(ne) < 2:
            return out, partner
        sig = signatures(batch, self.ngram, self.num_perm, self.seed, cache=cache)[ne]
        if len(ne) <= self.max_pairwise_rows:
            j, arg = max_jaccard_earlier(sig)
            ok = (j >= NEAR_DUP_FLOOR) & (arg >= 0)
            out[ne] = np.where(ok, j, 0.0)
            partner[ne[ok]] = ne[arg[ok]]
            return out, partner
        # very large batches: LSH candidates at ``near_threshold``, their estimated Jaccard (lower pairs: 0)
        from spike_audit.auditors.minhash import band_keys, near_duplicates

        keys = band_keys(sig, max(self.near_threshold, NEAR_DUP_FLOOR), self.seed)
        lo, hi, jac = near_duplicates(keys, (sig & 0xFF).astype(np.uint8), max(self.near_threshold, NEAR_DUP_FLOOR))
        best = np.zeros(len(ne))
        arg = np.full(len(ne), -1, dtype=np.int64)
        a, b = np.minimum(lo, hi), np.maximum(lo, hi)  # the later row of each pair gets its earlier partner
        order = np.lexsort((a, -np.asarray(jac)))  # best similarity first, then the earliest partner
        b_o, a_o, j_o = b[order], a[order], np.asarray(jac)[order]
        _, first = np.unique(b_o, return_index=True)
        best[b_o[first]] = j_o[first]
        arg[b_o[first]] = a_o[first]
        out[ne] = np.clip(best, 0.0, 1.0)
        ok = arg >= 0
        partner[ne[ok]] = ne[arg[ok]]
        return out, partner
