"""The shard audit's Beam graph (see the package docstring): row chunks, per-shard suite accumulators, the corpus
baseline, row keys for the cross-shard duplicate joins, and the single sink."""

from __future__ import annotations

import logging
import numpy as np
import pyarrow as pa

from spike_audit.pipelines.progress import tick
from spike_audit.pipelines.beam.scoring import (concat_parts, entity_scores, finish, make_suite, score_batch,
                                                split_by_bucket, suite_histogram, sum_histograms, to_token_batch)
from spike_audit.pipelines.shard_audit.clusters import (cluster_pairs, exact_records, near_clusters,
                                                        near_member_counts, near_pairs)
from spike_audit.pipelines.shard_audit.config import NODE_SHIFT, Shard, ShardAuditConfig
from spike_audit.pipelines.shard_audit.state import _portable_keys, _reindex, all_fp, load_state_records


log = logging.getLogger(__name__)


class ReadChunk:
    """(shard_name, path, start, end, n_rows[, token_start, token_end]) -> (shard_name, RecordBatch) with the
    shard's name in `shard`; logs each shard as its last chunk is read (progress of long runs). With a token
    range (a flat file of EOS-delimited documents, cut by :func:`document_chunks`), rows ``start..end`` are
    the documents in that range: one contiguous read, split at the EOS tokens (vectorised)."""

    def __init__(self, tokens_col: str, text_col: str, dtype: str | None, rows=None):
        self.tokens_col, self.text_col, self.dtype, self.rows = tokens_col, text_col, dtype, rows

    def __call__(self, item, reader=None):
        from spike_audit.pipelines.shards.read import read_slices

        name, path, start, end, n = item[:5]
        if len(item) > 5:
            rb = _documents_batch(path, item[5], item[6], start, end, self.rows, self.dtype, name)
        elif reader is not None:  # the shard opened once for all its chunks (ScoreShard)
            rb = reader.read(np.array([[start, end]], dtype=np.int64), "row")
        else:
            rb = read_slices(None, path, np.array([[start, end]], dtype=np.int64), unit="row",
                             tokens_col=self.tokens_col, text_col=self.text_col, dtype=self.dtype, rows=self.rows)
        rb = rb.set_column(rb.schema.get_field_index("shard"), "shard", pa.array([name] * rb.num_rows, pa.string()))
        tokens = rb.column("tokens")
        n_tok = 0 if tokens.null_count == len(tokens) else int(tokens.offsets[-1].as_py() - tokens.offsets[0].as_py())
        tick("shards", rows=rb.num_rows, tokens=n_tok, shards=int(end == n))  # the driver's progress line
        if end == n:
            log.debug("read shard %s (%d rows)", name, n)
        else:
            log.debug("read %s rows %d..%d of %s", name, start, end, n if n is not None else "?")
        return name, rb


def _documents_batch(path, tok_a, tok_b, row_a, row_b, rows, dtype, name) -> pa.RecordBatch:
    from spike_audit.pipelines.shards.read import read_slices
    from spike_audit.pipelines.shards.slices import SLICES_SCHEMA, _list_array
    from spike_audit.pipelines.shards.tokens import split_documents

    rb = read_slices(None, path, np.array([[tok_a, tok_b]], dtype=np.int64), unit="token", dtype=dtype, rows=rows)
    values = rb.column("tokens").values.to_numpy(zero_copy_only=False)
    offsets = split_documents(values, rows.eos_id)
    if len(offsets) - 1 != row_b - row_a:  # the file changed between cutting and reading
        raise RuntimeError(f"{name}: tokens [{tok_a}, {tok_b}) hold {len(offsets) - 1} documents, expected "
                           f"{row_b - row_a}")
    k = row_b - row_a
    idx = np.arange(row_a, row_b, dtype=np.int64)
    return pa.RecordBatch.from_arrays(
        [_list_array(values, offsets), pa.nulls(k, pa.string()), pa.array([name] * k, pa.string()),
         pa.array(idx), pa.array(idx + 1), pa.array(["row"] * k, pa.string())], schema=SLICES_SCHEMA)


def document_chunk_items(shard, rows, dtype, batch_rows: int):
    """One flat token file of EOS-delimited documents -> its chunk items, cut on a worker by one streaming
    scan for EOS tokens (the driver never scans: it does not know the number of rows)."""
    from spike_audit.pipelines.shards.read import open_shard
    from spike_audit.pipelines.shards.tokens import document_chunks

    name, path = shard
    reader = open_shard(None, path, dtype=dtype, rows=rows)
    n = None
    items = []
    for a, b, ta, tb, last in document_chunks(reader.tf, rows.eos_id, batch_rows):
        items.append((a, b, ta, tb))
        if last:
            n = b
    yield from group_chunks(name, path, n, items)


#: Chunks scored by one element of the shard audit (a whole shard up to this many chunks of ``batch_rows`` rows):
#: a shard scored in one element has its within-shard state (exact hashes, MinHash sketches) finished there, so only
#: a few numbers per shard cross the pipeline's stages.
GROUP_CHUNKS = 64


def group_chunks(name, path, n, ranges, per: int = GROUP_CHUNKS):
    """A shard's chunk ranges ``(start, end)`` (or ``(start, end, token_start, token_end)``) -> its work elements
    ``(name, path, n, ranges, whole)``: consecutive chunks, at most ``per`` each; ``whole`` when one element holds
    every chunk of the shard."""
    ranges = [tuple(r) for r in ranges]
    whole = len(ranges) <= per
    for i in range(0, len(ranges), per):
        yield name, path, n, tuple(ranges[i:i + per]), whole


class ShardAcc:
    """Per shard: the suite's accumulator and the histogram of every row's bins on every family (one scoring
    pass per chunk gives both, :func:`score_chunk`); merged by the suite's merge and addition. The result is
    :func:`compact_acc`: no per-row state leaves the combine."""

    name = "shard_acc"

    def __init__(self, cfg_dict: dict):
        self.cfg_dict = cfg_dict

    def create(self):
        return None

    def add(self, acc, x):
        return self.merge([acc, x])

    def merge(self, accs):
        accs = [a for a in accs if a is not None]
        if not accs:
            return None
        if len(accs) == 1:
            return accs[0]
        if any("pre" in a for a in accs):
            raise RuntimeError("a finished shard accumulator merged with another (a shard scored twice?)")
        suite = make_suite(self.cfg_dict)
        return {"suite": suite.merge([a["suite"] for a in accs]), "rows": sum(a["rows"] for a in accs)}

    def result(self, acc):
        return compact_acc(acc, self.cfg_dict)


#: The suite auditors whose state is per row (hashes, sketches) and whose result needs no baseline: a whole shard's
#: state is finished into their signals by :func:`compact_acc`.
ROW_STATE = ("dedup", "minhash")


def compact_acc(acc, cfg_dict: dict):
    """A whole shard's accumulator with its per-row state (exact row and document hashes, MinHash band keys and
    sketches) replaced by what the audit reads from it: those auditors' signals (``pre``) and the rows that copy
    an earlier row of the shard (``later``). Every later use of the accumulator (the baseline, the shard's signals,
    the state) sees the same values; an accumulator already compact is returned as it is."""
    from spike_audit.auditors.dedup import later_copies
    from spike_audit.auditors.minhash import near_copies_within

    if acc is None or "pre" in acc:
        return acc
    suite = make_suite(cfg_dict)
    sub = acc["suite"]
    pre = {}
    for k in ROW_STATE:
        pre.update({n: float(v) for n, v in suite.auditors[k].result(sub[k]).items()})
    small = dict(sub, **{k: suite.auditors[k].create() for k in ROW_STATE})
    small["tokens"] = dict(small["tokens"], hist=pack_counts(small["tokens"]["hist"], dense_ok=True))
    # most (family, bin) cells of a shard are empty: the bins travel as (cell, count)
    mh = sub["minhash"]["sketch"]
    near_in = near_copies_within(np.concatenate(mh) if len(mh) > 1 else mh[0]) if mh else 0
    return {"suite": small, "rows": pack_counts(acc["rows"]), "pre": pre, "later": later_copies(sub["dedup"]),
            "near_in": near_in}


def _narrow(a: np.ndarray) -> np.ndarray:
    """Counts as int32 in transit where they fit (:func:`expand_acc` restores the int64 arrays exactly)."""
    return a.astype(np.int32) if a.dtype == np.int64 and (not a.size or (a.min() >= 0 and a.max() < 2**31)) else a


def pack_counts(a: np.ndarray, dense_ok: bool = False):
    """A count array in transit: ``(shape, non-zero cells as int32 (int64 past 2^31 cells), their counts)``, the
    counts narrowed where they fit; with ``dense_ok``, the dense array (narrowed) when that is smaller (a shard's
    unigram histogram over a small vocabulary is mostly non-zero). A shard's row-bin histogram (48 families x 769
    bins, 295 KB dense) is a few hundred cells: dense, it was most of what the in-process runner held per shard
    between stages.
    :func:`unpack_counts` restores the int64 array exactly."""
    a = np.asarray(a)
    nz = np.flatnonzero(a)
    if dense_ok and 2 * len(nz) >= a.size:
        return _narrow(a)
    cells = nz.astype(np.int32) if a.size < 2**31 else nz.astype(np.int64)
    return tuple(int(d) for d in a.shape), cells, _narrow(a.ravel()[nz])


def unpack_counts(packed) -> np.ndarray:
    """The int64 array of :func:`pack_counts` (a dense array, as older state holds, is taken as it is)."""
    if isinstance(packed, np.ndarray):
        return packed.astype(np.int64, copy=False)
    shape, nz, vals = packed
    out = np.zeros(int(np.prod(shape)), dtype=np.int64)
    out[np.asarray(nz, dtype=np.int64)] = vals
    return out.reshape(tuple(shape))


def expand_acc(acc):
    """A compact accumulator with its count arrays as the suite and the evidence compute with them (int64, the row
    bins dense): exactly the arrays :func:`compact_acc` was given."""
    tokens = dict(acc["suite"]["tokens"], hist=unpack_counts(acc["suite"]["tokens"]["hist"]))
    return dict(acc, suite=dict(acc["suite"], tokens=tokens), rows=unpack_counts(acc["rows"]))


def score_chunk(name_rb, cfg_dict: dict, shard_index: dict | None = None):
    """(shard, RecordBatch) -> (shard, {suite accumulator, row-bin histogram}): the one scoring pass per row.
    With ``shard_index``, also the chunk's row keys (:func:`_row_keys`) from the same batch cache (row hashes and
    MinHash signatures computed once) and its row-flag candidates (``flags.flag_candidates``):
    ``((shard, acc), keys, candidates)``."""
    from spike_audit.auditors.batch_cache import BatchCache
    from spike_audit.auditors.evidence import bin_hist, bin_matrix
    from spike_audit.auditors.rows import FAMILIES, SIGNAL_ORDER

    name, rb = name_rb
    tb = to_token_batch(rb, cfg_dict["tokens_col"], cfg_dict["text_col"])
    cache = BatchCache(tb)
    # near duplicates within a shard come from the shard's own MinHash accumulator (with_shard_counts), not
    # from every pair of a chunk's rows
    rows, acc = score_batch(tb, dict(cfg_dict, row_near_dup=False), None, suite_acc=True, cache=cache)
    bins = bin_matrix(rows.matrix(), SIGNAL_ORDER, FAMILIES)
    scored = name, {"suite": acc, "rows": bin_hist(bins)}
    if shard_index is None:
        return scored
    from spike_audit.pipelines.shard_audit.flags import flag_candidates

    return scored, _row_keys(name, rb, tb, shard_index, cfg_dict, cache), flag_candidates(rb, bins)


class ScoreShard:
    """A work element ``(name, path, n, ranges, whole)`` (:func:`group_chunks`) -> ``((shard, accumulator), keys,
    [(shard, row-flag candidates)])``: each chunk read (the shard opened once) and scored by :func:`score_chunk` as
    its own batch, the chunks' accumulators merged, their row keys concatenated and their row-flag candidates
    merged (none for EOS-delimited documents, whose flags are read as before); an element holding the whole shard
    gives the compact
    accumulator (:func:`compact_acc`), so the shard's per-row state never leaves it. With ``tokenizer``, token-only
    rows are decoded first (:class:`~spike_audit.pipelines.beam.read.DecodeText`, loaded once per instance)."""

    def __init__(self, cfg_dict: dict, shard_index: dict, read: ReadChunk, tokenizer: str | None = None):
        self.cfg_dict, self.shard_index, self.read, self.tokenizer = cfg_dict, shard_index, read, tokenizer
        self._tok = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_tok"}

    def __setstate__(self, state):
        self.__dict__.update(state, _tok=None)

    def __call__(self, item):
        from spike_audit.pipelines.shards.read import _close, open_shard

        name, path, n, ranges, whole = item
        reader = None
        if ranges and len(ranges[0]) == 2:
            reader = open_shard(None, path, tokens_col=self.read.tokens_col, text_col=self.read.text_col,
                                dtype=self.read.dtype, rows=self.read.rows)
        from spike_audit.pipelines.shard_audit.flags import merge_candidates

        accs, keys, cands = [], [], []
        try:
            for r in ranges:
                kv = self.read((name, path, r[0], r[1], n, *r[2:]), reader)
                if self.tokenizer:
                    kv = (kv[0], self._decode(kv[1], name))
                (_, acc), k, c = score_chunk(kv, self.cfg_dict, self.shard_index)
                accs.append(acc)
                keys.append(k)
                cands.append(c)
        finally:
            if reader is not None:
                _close(reader)
        fn = ShardAcc(self.cfg_dict)
        acc = fn.merge(accs)
        c = merge_candidates(cands) if reader is not None else None  # row chunks only (see flags.flag_chunks)
        return (name, fn.result(acc) if whole else acc), concat_keys(keys), [(name, c)] if c is not None else []

    def _decode(self, rb, name):
        from spike_audit.pipelines.beam.read import fill_text
        from spike_audit.pipelines.tokenizer import load_tokenizer

        if self._tok is None:
            self._tok = load_tokenizer(self.tokenizer)
        return fill_text(rb, self._tok, source=rb.column("shard")[0].as_py() if rb.num_rows else "")


def concat_keys(keys: list[dict]) -> dict:
    """Row keys of consecutive chunks of one shard as one record (the same arrays, in chunk order)."""
    if len(keys) == 1:
        return keys[0]
    out = {"shard": keys[0]["shard"]}
    for k in ("nodes", "hash", "ne_nodes", "bands", "sketch"):
        out[k] = np.concatenate([r[k] for r in keys])
    return out


def finish_shard(key_acc, hist, cfg: dict, own_in_hist: bool = True):
    """(shard, ShardAcc) -> (shard, n_rows, n_tokens, signals, row-bin histogram); suite signals leave-one-out
    against the corpus histogram (or against a saved baseline's, which the shard is not part of)."""
    key, acc = key_acc
    acc = compact_acc(acc, cfg)
    k, n_rows, n_tokens, sig = finish((key, expand_acc(acc)["suite"]), hist, cfg, frozenset(), own_in_hist)
    sig.update(acc["pre"])  # (same keys, same order: the suite's result lists every signal)
    # the row bins packed (pack_counts); near copies within the shard (``near_dup_in_shard``)
    return k, n_rows, n_tokens, sig, acc["rows"], acc["later"], acc["near_in"]


def keyed_finish_shard(key_acc, hist, cfg: dict, own_in_hist: bool = True):
    """:func:`finish_shard`, keyed by its shard (for the join with the seen-elsewhere counts)."""
    it = finish_shard(key_acc, hist, cfg, own_in_hist)
    return it[0], it


def with_shard_counts(kv):
    """CoGroupByKey of finished shards and their seen-elsewhere counts -> the finished shard with
    ``cross_dup_frac`` and its shard-level binary families set in the histogram: rows seen in another shard
    (``seen_elsewhere``), later copies of a row within the shard (``dup_in_batch``: a group of ``k`` copies
    counts ``k - 1``, as in a step), rows with a near duplicate (``near_dup_jaccard``: a verified near duplicate
    anywhere in the audited shards, from the near-duplicate join at the ``--threshold`` Jaccard, or within the
    shard by the suite's MinHash LSH, whichever counts more); and, without a saved baseline, copied blocks
    (``replay_rows``: of the most distinct rows the shard shares with one other shard, ``c``, the ``c - 1`` later
    ones are 1, the first counted once as in a step). A flag, not the value ``c``: a block's rows move together,
    so a graded value would make the largest block of a corpus whose shards all share rows look like a rare tail
    (in a test corpus where every shard shares about 15 rows with each of 15 others, 52 of 256 shards were
    quarantined at e = 66 with the value; none with the flag)."""
    from spike_audit.auditors.evidence import NBINS, to_bins
    from spike_audit.auditors.rows import FAMILY_NAMES

    key, grouped = kv
    one = int(to_bins(1.0))
    for _, n_rows, n_tokens, sig, hist, later, near_in in grouped["scores"]:
        seen = int(sum(grouped["seen"]))
        sig = dict(sig, cross_dup_frac=(seen / n_rows) if n_rows else float("nan"))
        hist = unpack_counts(hist).copy()
        def count(k):
            v = sig.get(k)
            return int(round(v * n_rows)) if v is not None and v == v else 0

        near = max(count("near_dup_frac"), int(sum(grouped.get("near", []))))
        for fam, c in (("seen_elsewhere", seen), ("dup_in_batch", later), ("near_dup_jaccard", near)):
            f = FAMILY_NAMES.index(fam)
            hist[f] = np.zeros(NBINS, dtype=hist.dtype)
            hist[f, 0], hist[f, one] = n_rows - c, c
        if "block" in grouped:  # the later rows of the shard's largest block (c distinct rows shared with one shard)
            block = max(0, min(max(grouped["block"], default=0), seen, n_rows) - 1)
            f = FAMILY_NAMES.index("replay_rows")
            hist[f] = np.zeros(NBINS, dtype=hist.dtype)
            hist[f, 0], hist[f, one] = n_rows - block, block
            # near copies within the shard: measured, like blocks, only among the audited shards (a saved
            # baseline's reference has no such counts)
            f = FAMILY_NAMES.index("near_dup_in_shard")
            c = min(int(near_in), n_rows)
            hist[f] = np.zeros(NBINS, dtype=hist.dtype)
            hist[f, 0], hist[f, one] = n_rows - c, c
        yield key, n_rows, n_tokens, sig, pack_counts(hist)


def shard_evidence(item, corpus, own_in_corpus: bool = True) -> dict:
    """A shard's rows against every other shard's rows (its own out of the corpus histogram), or, with
    ``own_in_corpus`` False, against a saved baseline's rows (``corpus`` is then the baseline's reference)."""
    from spike_audit.auditors.evidence import candidates_from_hists, cut_value, hist_to_tail, scan
    from spike_audit.auditors.rows import FAMILIES

    key, n_rows, n_tokens, sig, hist = item
    hist = unpack_counts(hist)
    R = int(corpus.sum(axis=1).max()) if corpus.size else 0
    tail = hist_to_tail(corpus)
    ev = scan([candidates_from_hists(hist[None], tail, np.full(1, own_in_corpus))], np.array([n_rows]),
              np.array([R - n_rows if own_in_corpus else R]), len(FAMILIES))
    e = ev.e[0]
    order = [int(f) for f in np.lexsort((np.arange(len(e)), -e)) if e[f] > 0][:8]
    fams = [{"name": FAMILIES[f].name, "rows": int(ev.k[0, f]), "cut": float(cut_value(FAMILIES[f], int(ev.cut[0, f]))),
             "natural_rate": float(ev.rate[0, f]), "evidence": float(min(e[f], 300.0))} for f in order]
    return {"shard": key, "n_rows": n_rows, "n_tokens": n_tokens, "signals_raw": sig, "families": fams,
            "anomaly_score": float(min(ev.T[0], 300.0)), "top_signal": fams[0]["name"] if fams else "",
            "top_rows": fams[0]["rows"] if fams else 0, "natural_rate": fams[0]["natural_rate"] if fams else None,
            "reason": "; ".join(f"{x['rows']} of {n_rows} rows on {x['name']} (natural rate "
                                f"{100 * x['natural_rate']:.2g}%, e={x['evidence']:.1f})" for x in fams[:3])
            if (R - n_rows if own_in_corpus else R) > 0 else
            "no other rows to judge it against (audit it with other shards, or against --baseline)"}


def shard_signal_record(item):
    """A finished shard -> its suite signals, for a saved baseline."""
    return "baseline_shard_signals", {"shard": item[0], "signals": {k: float(v) for k, v in item[3].items()}}


def rank_shards(recs, fps, reference=None):
    """Shards ranked by evidence (ties by name), with their suite signals' robust z across shards (or, with
    ``reference``, a saved baseline's shards' signals, against those)."""
    zs = {r["shard"]: r for r in entity_scores([(r["shard"], r["n_rows"], r["n_tokens"], r["signals_raw"])
                                               for r in recs], "shard", reference)}
    out = sorted(recs, key=lambda r: (-r["anomaly_score"], r["shard"]))
    for rank, r in enumerate(out, 1):
        rec = {k: v for k, v in r.items() if k != "signals_raw"}
        rec.update(rank=rank, signals=zs[r["shard"]]["signals"], fingerprint=fps.get(r["shard"]))
        yield "shard_scores", rec


def _row_keys(name, rb, tb, shard_index: dict, cfg_dict: dict, cache) -> dict:
    """A chunk's row keys, vectorised: node ids, exact row hashes, LSH band keys and 8-bit MinHash sketches
    (from ``cache``, the scoring pass's batch cache, where it already holds them)."""
    from spike_audit.auditors.dedup import row_hashes
    from spike_audit.auditors.minhash import NearDup

    nodes = (np.int64(shard_index[name]) << NODE_SHIFT) | np.asarray(rb.column("row"), dtype=np.int64)
    h = row_hashes(tb, cfg_dict["seed"], cache)
    # the suite's MinHash auditor (same shingles, permutations, threshold and seed) already computed them
    bands, sketch, ne = NearDup(threshold=cfg_dict["threshold"], seed=cfg_dict["seed"]).row_keys(tb, cache)
    return {"shard": name, "nodes": nodes, "hash": h, "ne_nodes": nodes[ne], "bands": bands, "sketch": sketch}


def sum_arrays(arrays):
    """Sum equal-shape count arrays (a CombineGlobally function); an empty input gives an empty array."""
    arrays = [a for a in arrays if np.size(a)]
    if not arrays:
        return np.zeros((0, 0), dtype=np.int64)
    out = np.zeros_like(arrays[0])
    for a in arrays:
        out += a
    return out


def split_exact(rec: dict, buckets: int):
    """Partition a chunk's (hash, node) pairs by hash bucket: one element per non-empty bucket."""
    yield from split_by_bucket(rec["hash"], buckets, rec["hash"], rec["nodes"])


def shard_seen_elsewhere(kv):
    """One exact-hash bucket -> (shard index, rows whose hash another shard shares)."""
    from spike_audit.auditors.dedup import seen_elsewhere

    cols = concat_parts(kv[1])
    if cols is None:
        return
    keys, counts = seen_elsewhere(cols[0], cols[1] >> NODE_SHIFT)
    yield from zip(keys.tolist(), counts.tolist())


def shard_block_pairs(kv):
    """One exact-hash bucket -> (shard index, (other shard indices, distinct row hashes shared with each)) for every
    shard with a common row (hashes held by at most ``MAX_BLOCK_KEYS`` shards): one element per shard and bucket,
    two arrays, summed over buckets by :func:`sum_partner_counts`."""
    from spike_audit.auditors.dedup import shared_blocks

    cols = concat_parts(kv[1])
    if cols is None:
        return
    a, b, c = shared_blocks(cols[0], cols[1] >> NODE_SHIFT)  # sorted by a, then b
    if not len(a):
        return
    cut = np.flatnonzero(np.diff(a)) + 1
    for lo, hi in zip(np.r_[0, cut], np.r_[cut, len(a)]):
        yield int(a[lo]), (b[lo:hi], c[lo:hi])


def sum_partner_counts(parts):
    """Combine (other shard indices, counts) parts of one shard: the counts per other shard added up (a
    CombinePerKey function: associative, and its output is again one part)."""
    parts = list(parts)
    if len(parts) == 1:
        return parts[0]
    b = np.concatenate([np.asarray(x[0], dtype=np.int64) for x in parts])
    c = np.concatenate([np.asarray(x[1], dtype=np.int64) for x in parts])
    u, inv = np.unique(b, return_inverse=True)
    return u, np.bincount(np.asarray(inv).reshape(-1), weights=c, minlength=len(u)).astype(np.int64)


def shard_seen_in_baseline(kv, base_node: int):
    """One exact-hash bucket of new shards' rows and a saved baseline's row hashes (node ``base_node``) ->
    (shard index, rows whose hash is in the baseline). Against a baseline, "seen elsewhere" is measured against
    that fixed reference only: a clean shard does not become anomalous because a new shard copied its rows
    (those copies are in the duplicates table)."""
    cols = concat_parts(kv[1])
    if cols is None:
        return
    h, nodes = np.asarray(cols[0], dtype=np.uint64), np.asarray(cols[1], dtype=np.int64)
    base = nodes == base_node
    if not base.any() or base.all():
        return
    hit = np.isin(h[~base], h[base])
    keys, counts = np.unique(nodes[~base][hit] >> NODE_SHIFT, return_counts=True)
    yield from zip(keys.tolist(), counts.tolist())


def build_pipeline(p, cfg: ShardAuditConfig, todo: list[tuple[Shard, int]], old_parts: dict[str, list[str]],
                   keep: frozenset, names: list[str], staging: str, roots: dict[str, str] | None = None,
                   baseline=None, paths: dict[str, str] | None = None):
    """The shard audit. ``baseline`` (a loaded :class:`~spike_audit.pipelines.beam.baseline.Baseline`): the
    shards are judged against its reference rows, unigram histogram and row hashes instead of against each
    other; ``cfg.save_baseline``: this corpus's accumulators are written out as one (kinds ``baseline_counts``
    and ``baseline_row_hashes``)."""
    import apache_beam as beam
    from apache_beam.pvalue import AsSingleton

    from spike_audit.pipelines.beam.combine import AuditorCombineFn
    from spike_audit.pipelines.beam.sink import WriteTables

    cfg_dict = {"vocab_size": cfg.vocab_size, "eos_id": cfg.eos_id, "pad_id": cfg.pad_id, "seed": cfg.seed,
                "threshold": cfg.threshold,
                "tokens_col": cfg.tokens_col, "text_col": cfg.text_col}
    shard_index = {n: i for i, n in enumerate(names)}
    fp = {s.name: s.fingerprint for s, _ in todo}
    chunks = [g for s, n in todo if n is not None
              for g in group_chunks(s.name, s.path, n, [(a, min(a + cfg.batch_rows, n))
                                                         for a in range(0, n, cfg.batch_rows)])]
    doc_files = [(s.name, s.path) for s, n in todo if n is None]  # EOS-delimited documents: cut on workers
    tokens_col, text_col = cfg.tokens_col, cfg.text_col

    if doc_files:
        doc_chunks = (p | "DocFiles" >> beam.Create(doc_files) | "SpreadFiles" >> beam.Reshuffle()
                      | "CutDocuments" >> beam.FlatMap(document_chunk_items, cfg.flat_rows, cfg.dtype, cfg.batch_rows))
        all_chunks = ((p | "Chunks" >> beam.Create(chunks), doc_chunks) | "AllChunks" >> beam.Flatten()
                      | "Spread" >> beam.Reshuffle())
    else:  # a Create of more than one element is already redistributed (its own Reshuffle): no second one
        all_chunks = p | "Chunks" >> beam.Create(chunks)
    # one scoring pass per chunk, a shard's chunks in one element: the suite accumulator, the row-bin histogram and
    # the row keys (one cache per chunk); one element out per work element, split by two Maps, not a tagged output
    # (Beam 2.77's DaskRunner, with the receivers shim of beam.dask_compat, hands a ParDo's tagged outputs to its
    # main output too)
    both = (all_chunks
            | "Score" >> beam.Map(ScoreShard(cfg_dict, shard_index, ReadChunk(cfg.tokens_col, cfg.text_col, cfg.dtype,
                                                                              cfg.flat_rows), cfg.tokenizer)))
    new_accs = (both | "Scores" >> beam.Map(lambda sk: sk[0])
                | "AuditShards" >> beam.CombinePerKey(AuditorCombineFn(ShardAcc(cfg_dict), output="accumulator")))
    old_accs = (p | "OldAccParts" >> beam.Create(old_parts.get("accs", []))
                | "LoadAccs" >> beam.FlatMap(load_state_records, keep)
                | "AccKV" >> beam.Map(lambda r: (r["shard"], r["acc"])))
    accs = (new_accs, old_accs) | "AllAccs" >> beam.Flatten()

    # the corpus baseline: every shard's histogram; each shard is then scored leave-one-out (or a saved one)
    if baseline is not None:
        hist = p | "SavedUnigram" >> beam.Create([baseline.unigram])
    else:
        hist = (accs | "Hists" >> beam.Map(lambda kv: suite_histogram(expand_acc(kv[1])["suite"]))
                | "Baseline" >> beam.CombineGlobally(sum_histograms))
    new_keys = both | "Keys" >> beam.Map(lambda sk: sk[1])
    if old_parts.get("keys"):
        old_keys = (p | "OldKeyParts" >> beam.Create(old_parts["keys"])
                    | "LoadKeys" >> beam.FlatMap(load_state_records, keep)
                    | "Reindex" >> beam.Map(_reindex, shard_index))
        keys = (new_keys, old_keys) | "AllKeys" >> beam.Flatten()
    else:  # no Flatten: the in-process runner materialises a Flatten's output, here every row's keys
        keys = new_keys
    exact_buckets = (keys | "ExactBuckets" >> beam.FlatMap(split_exact, cfg.buckets)
                     | "GroupExact" >> beam.GroupByKey())
    if baseline is not None:  # the baseline's row hashes, read by workers, as the fixed duplicate reference
        from spike_audit.pipelines.beam.baseline import baseline_hash_items

        base_node = len(names) << NODE_SHIFT
        saved = (p | "SavedHashParts" >> beam.Create(list(baseline.hash_parts))
                 | "SavedHashes" >> beam.FlatMap(baseline_hash_items, cfg.buckets, base_node))
        seen = ((keys | "SeenBuckets" >> beam.FlatMap(split_exact, cfg.buckets), saved)
                | "WithSaved" >> beam.Flatten() | "GroupSeen" >> beam.GroupByKey()
                | "SeenInBaseline" >> beam.FlatMap(shard_seen_in_baseline, base_node))
    else:
        seen = exact_buckets | "SeenElsewhere" >> beam.FlatMap(shard_seen_elsewhere)
    seen = (seen | "SumSeen" >> beam.CombinePerKey(sum)
            | "SeenByName" >> beam.Map(lambda kv, nm: (nm[kv[0]], kv[1]), names))
    # copied blocks: per shard, the most distinct rows it shares with any one other audited shard (``replay_rows``;
    # not measured against a saved baseline, whose reference has no such counts)
    join = {}
    if baseline is None:
        join["block"] = (exact_buckets | "BlockPairs" >> beam.FlatMap(shard_block_pairs)
                         | "SumPartners" >> beam.CombinePerKey(sum_partner_counts)
                         | "LargestBlock" >> beam.Map(lambda kv, nm: (nm[kv[0]], int(np.max(kv[1][1]))), names))
    finished = accs | "Finish" >> beam.Map(keyed_finish_shard, AsSingleton(hist), cfg_dict, baseline is None)
    # near duplicates: every element's band keys and sketches go to a key file (``spill``); per band bucket, the
    # keys two rows share are found in that bucket's slices of the files, and only those rows' sketches are read
    from apache_beam.pvalue import AsList

    from spike_audit.pipelines.shard_audit.spill import attach_file_sketches, band_bucket_candidates, write_key_file

    key_files = keys | "SpillKeys" >> beam.FlatMap(write_key_file, f"{staging}/spill", cfg.buckets)
    components = (p | "BandBuckets" >> beam.Create(list(range(cfg.buckets)))
                  | "Candidates" >> beam.FlatMap(band_bucket_candidates, AsList(key_files))
                  | "GroupByFile" >> beam.GroupByKey()
                  | "AttachSketches" >> beam.FlatMap(attach_file_sketches)
                  | "GroupCandidates" >> beam.GroupByKey()
                  | "NearPairs" >> beam.FlatMap(near_pairs, cfg.threshold)
                  | "GroupPairs" >> beam.GroupByKey()
                  | "Components" >> beam.FlatMap(cluster_pairs, cfg.cc_iterations))
    near = components | "NearRecords" >> beam.FlatMap(near_clusters, names, cfg.max_group)
    # rows with a near duplicate anywhere in the audited shards (against a saved baseline: among the audited
    # shards, whose keys are the only ones the join has; the baseline's own rates counted its shards' alike)
    near_rows = (components | "NearMembers" >> beam.FlatMap(near_member_counts)
                 | "SumNear" >> beam.CombinePerKey(sum)
                 | "NearByName" >> beam.Map(lambda kv, nm: (nm[kv[0]], kv[1]), names))
    join.update(scores=finished, seen=seen, near=near_rows)
    shards = (join | "JoinSeen" >> beam.CoGroupByKey()
              | "ShardCounts" >> beam.FlatMap(with_shard_counts))
    if baseline is not None:
        corpus = p | "SavedReference" >> beam.Create([baseline.reference])
    else:
        corpus = (shards | "RowHists" >> beam.Map(lambda it: unpack_counts(it[4]))
                  | "Corpus" >> beam.CombineGlobally(sum_arrays))
    # the ranked records as one list (the ranking needs every shard): the flags' targets are read from it, and its
    # records are the shard_scores table
    ranked = (shards | "Evidence" >> beam.Map(shard_evidence, AsSingleton(corpus), baseline is None)
              | "AllShards" >> beam.combiners.ToList()
              | "Rank" >> beam.Map(lambda recs, fps, ref: list(rank_shards(recs, fps, ref)), all_fp(names, todo, keep),
                                   baseline.shard_signals if baseline is not None else None))
    scores = ranked | "ShardScores" >> beam.FlatMap(lambda recs: recs)

    exact = exact_buckets | "ExactRecords" >> beam.FlatMap(exact_records, names, cfg.max_group)
    # the top shards' anomalous rows, read again on workers once the ranking is known (``flags``); ``paths``
    # names every shard's file, the ones the state kept too
    from spike_audit.pipelines.shard_audit.flags import (FlagCandidates, ReadFlagChunk, flag_chunks, flag_rows,
                                                         flag_scored, flag_targets, strongest_rows)

    paths = paths if paths is not None else {s.name: s.path for s, _ in todo}
    targets = ranked | "FlagTargets" >> beam.Map(flag_targets, paths)
    # shards scored here in row chunks: their flags from the candidates the scoring pass kept (no second read);
    # the others (kept by --state, EOS-delimited documents) are read and scored again
    scored = frozenset(s.name for s, n in todo if n is not None)
    flags_scored = (both | "FlagCandidates" >> beam.FlatMap(lambda sk: sk[2])
                    | "MergeCandidates" >> beam.CombinePerKey(AuditorCombineFn(FlagCandidates(), output="accumulator"))
                    | "FlagScored" >> beam.FlatMap(flag_scored, AsSingleton(targets)))
    if set(names) <= scored:  # every shard scored here: one candidate list per shard, nothing to read again
        flags = flags_scored | "StrongestRows" >> beam.FlatMap(lambda kv: strongest_rows((kv[0], [kv[1]])))
    else:
        flag_batches = (targets | "FlagChunks" >> beam.FlatMap(flag_chunks, cfg.batch_rows, scored)
                        | "SpreadFlagChunks" >> beam.Reshuffle()
                        | "ReadFlagChunks" >> beam.FlatMap(ReadFlagChunk(cfg.tokens_col, cfg.text_col, cfg.dtype,
                                                                         cfg.flat_rows)))
        if cfg.tokenizer:
            from spike_audit.pipelines.beam.read import DecodeText

            flag_batches = flag_batches | "DecodeFlagChunks" >> beam.ParDo(DecodeText(cfg.tokenizer))
        flags = ((flag_batches | "FlagRows" >> beam.FlatMap(flag_rows, AsSingleton(targets), cfg_dict), flags_scored)
                 | "AllFlags" >> beam.Flatten()
                 | "GroupFlags" >> beam.GroupByKey() | "StrongestRows" >> beam.FlatMap(strongest_rows))

    outputs = [scores, exact, near, flags]
    if cfg.state:
        outputs += [
            new_accs | "AccState" >> beam.Map(
                lambda kv, fps: ("state_accs", {"shard": kv[0], "fingerprint": fps[kv[0]], "acc": kv[1]}), fp),
            new_keys | "KeyState" >> beam.Map(
                lambda r, fps: ("state_keys", dict(_portable_keys(r), fingerprint=fps[r["shard"]])), fp),
        ]
    if cfg.save_baseline:
        from spike_audit.pipelines.beam.baseline import bucket_hashes

        counts = (p | "BaselineSeed" >> beam.Create([None])
                  | "BaselineCounts" >> beam.Map(lambda _, h, c: ("baseline_counts", {"unigram": h, "reference": c}),
                                                 AsSingleton(hist), AsSingleton(corpus)))
        outputs += [counts, exact_buckets | "BaselineHashes" >> beam.FlatMap(bucket_hashes),
                    shards | "BaselineSignals" >> beam.Map(shard_signal_record)]
    n_parts = max(1, min(64, len(todo)))
    (outputs | "AllOutputs" >> beam.Flatten()
     | "Write" >> WriteTables(staging, parts={"state_accs": n_parts, "state_keys": n_parts, "duplicates": 4,
                                                "baseline_row_hashes": cfg.buckets},
                              roots=roots))
