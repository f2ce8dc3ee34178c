"""Scoring glue shared by the run and shard pipelines: Arrow batch -> TokenBatch, the auditor suite
finished against a baseline histogram, and robust z across entities. Pure functions, picklable."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spike_audit.auditors.base import TokenBatch
from spike_audit.auditors.scales import to_scoring_scale
from spike_audit.auditors.robust import loo_z


def to_token_batch(rb: pa.RecordBatch, tokens_col: str = "tokens", text_col: str = "text") -> TokenBatch:
    """A reader batch (``pipelines.shards.SLICES_SCHEMA``) as a TokenBatch with row identities,
    vectorised (no Python object per row).

    Text-only rows (no tokens at all in the batch) are audited as UTF-8 bytes, so duplication,
    repetition and distribution signals still apply to text shards. A reader batch names its columns
    ``tokens`` / ``text`` whatever the shard's columns were called (``tokens_col`` / ``text_col``)."""
    names = rb.schema.names
    if tokens_col not in names and "tokens" in names:
        tokens_col = "tokens"
    if text_col not in names and "text" in names:
        text_col = "text"
    tb = TokenBatch.from_arrow(rb, tokens=tokens_col, text=text_col)
    shard = None
    if "shard" in rb.schema.names:
        enc = pc.dictionary_encode(rb.column("shard"))
        shard = np.asarray(enc.dictionary.to_pylist(), dtype=object)[enc.indices.to_numpy(zero_copy_only=False)]
    row = np.asarray(rb.column("row"), dtype=np.int64) if "row" in rb.schema.names else None
    if tb.n_tokens == 0 and tb.text is not None and len(tb.text):
        text = pa.array(tb.text, type=pa.large_string()) if not isinstance(tb.text, pa.Array) else tb.text
        raw = pc.fill_null(text.cast(pa.large_binary()), b"")
        offsets = np.frombuffer(raw.buffers()[1], dtype=np.int64)[raw.offset : raw.offset + len(raw) + 1]
        data = np.frombuffer(raw.buffers()[2], dtype=np.uint8) if raw.buffers()[2] is not None else np.zeros(0, np.uint8)
        if offsets[-1] > offsets[0]:
            values = data[offsets[0] : offsets[-1]].astype(np.int64)
            return TokenBatch(values, offsets - offsets[0], tb.text, shard, row)
    return TokenBatch(tb.values, tb.offsets, tb.text, shard, row)


def make_suite(cfg: dict, baseline_hist=None):
    from spike_audit.auditors.suite import Suite

    if baseline_hist is not None and int(np.sum(baseline_hist)) <= 0:
        baseline_hist = None
    return Suite(vocab_size=cfg.get("vocab_size"), baseline_hist=baseline_hist, eos_id=cfg.get("eos_id"),
                 pad_id=cfg.get("pad_id"), seed=cfg.get("seed", 0), threshold=cfg.get("threshold", 0.8))


def suite_histogram(acc: dict) -> np.ndarray:
    """The unigram histogram inside a Suite accumulator."""
    return acc["tokens"]["hist"]


def finish(key_acc, hist, cfg: dict, in_baseline=frozenset(), all_in_baseline: bool = False):
    """(key, suite_acc) -> (key, n_rows, n_tokens, {signal: value}) against the baseline ``hist``.

    Leave-one-out: when the entity's own tokens are part of the baseline (``key in in_baseline`` or
    ``all_in_baseline``), they are subtracted first, so baseline-relative signals (JS divergence,
    rare-token share, cross-entropy) treat baseline members and other entities alike."""
    from spike_audit.auditors.suite import COUNTS

    key, acc = key_acc
    if all_in_baseline or key in in_baseline:
        own = suite_histogram(acc)
        hist = sum_histograms([hist])
        hist[: len(own)] -= own[: len(hist)]
    res = make_suite(cfg, baseline_hist=hist).result(acc)
    sig = {k: float(v) for k, v in res.items() if k not in COUNTS}
    return key, int(acc["n_rows"]), int(acc["n_tokens"]), sig


def unique_by_key(items) -> list:
    """A side-input list as a runner-independent list: sorted by key (``item[0]``), exact duplicates
    collapsed, and two different items under one key refused. A guard: a runner that repeats
    elements (Beam 2.77's DaskRunner did, see :mod:`pipelines.dask_compat`) must not change a
    verdict silently."""
    out: dict = {}
    for it in items:
        k = it[0]
        if k in out and out[k] != it:
            raise RuntimeError(f"side input holds two different items for key {k!r}")
        out[k] = it
    return [out[k] for k in sorted(out)]


def signal_names(rows) -> list[str]:
    return sorted({k for r in rows for k in r})


def matrix(sigs: list[dict], names: list[str]) -> np.ndarray:
    return np.array([[s.get(n, np.nan) for n in names] for s in sigs], dtype=np.float64).reshape(len(sigs), len(names))


def opt_float(v) -> float | None:
    v = float(v)
    return v if np.isfinite(v) else None


def entity_scores(items, key_name: str, reference: list[dict] | None = None):
    """[(key, n_rows, n_tokens, signals)] -> records with the leave-one-out robust z of each signal
    (each item against all the others; with ``reference``, a list of signal dicts such as a saved baseline's
    shards, against those instead), the combined anomaly score (max |z|), the top signal, a reason and a
    1-based rank."""
    from spike_audit.auditors.robust import robust_z

    items = sorted(items, key=lambda it: it[0])
    names = signal_names([it[3] for it in items])
    m = matrix([it[3] for it in items], names)
    if not len(items):
        return []
    if reference:
        zall = robust_z(to_scoring_scale(names, m), to_scoring_scale(names, matrix(reference, names)))
    else:
        zall = loo_z(to_scoring_scale(names, m))  # each entity against all the others
    out = []
    for k, (key, n_rows, n_tokens, _) in enumerate(items):
        z = zall[k]
        az = np.where(np.isfinite(z), np.abs(z), -1.0)
        j = int(np.argmax(az)) if len(names) else -1
        ok = j >= 0 and az[j] >= 0
        top3 = [i for i in np.argsort(-az, kind="stable")[:3] if az[i] >= 0] if len(names) else []
        reason = "; ".join(f"{names[i]} = {m[k][i]:.4g} (z={_z(z[i])})" for i in top3)
        out.append({key_name: key, "n_rows": n_rows, "n_tokens": n_tokens, "top_rows": 0, "families": [],
                    "anomaly_score": float(az[j]) if ok else 0.0, "top_signal": names[j] if ok else "",
                    "reason": reason,
                    "signals": [{"name": n, "value": opt_float(v), "z": opt_float(zz)}
                                for n, v, zz in zip(names, m[k], z)]})
    out.sort(key=lambda r: (-r["anomaly_score"], r[key_name]))
    for rank, rec in enumerate(out, 1):
        rec["rank"] = rank
    return out


def _z(z: float) -> str:
    return f"{z:+.1f}" if abs(z) < 1e4 else ("> +1e4" if z > 0 else "< -1e4")


def sum_histograms(hists) -> np.ndarray:
    """Sum histograms of different lengths (a CombineGlobally function: associative, commutative)."""
    hists = [np.asarray(h, dtype=np.int64) for h in hists]
    n = max((len(h) for h in hists), default=0)
    out = np.zeros(n, dtype=np.int64)
    for h in hists:
        out[: len(h)] += h
    return out


def filter_eq(table: pa.Table, column: str, value) -> pa.Table:
    return table.filter(pc.equal(table.column(column), value))


def hash_buckets(kv, tokens_col: str, text_col: str, buckets: int, seed: int):
    """(int key, RecordBatch) -> (bucket, (row hashes, keys)) per non-empty hash bucket."""
    from spike_audit.auditors.dedup import row_hashes

    key, rb = kv
    h = row_hashes(to_token_batch(rb, tokens_col, text_col), seed)
    yield from split_by_bucket(h, buckets, h, np.full(len(h), key, dtype=np.int64))


def split_by_bucket(key: np.ndarray, buckets: int, *arrays: np.ndarray):
    """Partition parallel ``arrays`` by ``key % buckets`` (``key`` uint64, one per element): one
    ``(bucket, tuple of the arrays' elements in it)`` per non-empty bucket, vectorised."""
    b = (key % np.uint64(buckets)).astype(np.int64)
    order = bucket_order(b, buckets)
    cuts = np.flatnonzero(np.diff(b[order])) + 1
    for idx in np.split(order, cuts):
        if len(idx):
            yield int(b[idx[0]]), tuple(a[idx] for a in arrays)


def bucket_order(b: np.ndarray, buckets: int) -> np.ndarray:
    """``np.argsort(b, kind="stable")`` of bucket numbers ``0 <= b < buckets``: sorted as the narrowest unsigned
    type that holds them (numpy's radix sort for 8- and 16-bit keys; about 10x faster than on int64), the same
    order."""
    if buckets <= 1 << 8:
        return np.argsort(b.astype(np.uint8), kind="stable")
    if buckets <= 1 << 16:
        return np.argsort(b.astype(np.uint16), kind="stable")
    return np.argsort(b, kind="stable")


def concat_parts(parts) -> tuple[np.ndarray, ...] | None:
    """The grouped values of a GroupByKey, each a tuple of parallel arrays, concatenated column by
    column (None when there are none)."""
    parts = list(parts)
    if not parts:
        return None
    return tuple(np.concatenate(col) for col in zip(*parts))


def seen_elsewhere_counts(kv):
    """One hash bucket -> (key, rows of that key whose hash another key shares)."""
    from spike_audit.auditors.dedup import seen_elsewhere

    cols = concat_parts(kv[1])
    if cols is None:
        return
    keys, counts = seen_elsewhere(*cols)
    yield from zip(keys.tolist(), counts.tolist())


def with_cross_dup(kv):
    """CoGroupByKey of finished scores and seen-elsewhere counts -> scores with ``cross_dup_frac``."""
    key, grouped = kv
    for _, n_rows, n_tokens, sig in grouped["scores"]:
        sig = dict(sig, cross_dup_frac=(sum(grouped["seen"]) / n_rows) if n_rows else float("nan"))
        yield key, n_rows, n_tokens, sig


def make_scorer(cfg: dict):
    from spike_audit.auditors.rows import RowScorer

    return RowScorer(eos_id=cfg.get("eos_id"), pad_id=cfg.get("pad_id"), vocab_size=cfg.get("vocab_size"),
                     seed=cfg.get("seed", 0), near_threshold=cfg.get("near_threshold", 0.3),
                     near_dup=cfg.get("row_near_dup", True))


def score_batch(tb: TokenBatch, cfg: dict, baseline_hist=None, suite_acc: bool = False, cache=None):
    """The one scoring pass over a batch's rows, shared by ``run`` (a step) and ``shards`` (a chunk):
    every row signal (:class:`spike_audit.auditors.rows.RowScores`) and, with ``suite_acc``, the suite's
    accumulator of the same batch built from the same :class:`BatchCache` (no per-row work done twice); pass
    ``cache`` to share it with further work on the batch."""
    from spike_audit.auditors.batch_cache import BatchCache

    cache = cache if cache is not None else BatchCache(tb)
    rows = make_scorer(cfg).score(tb, baseline_hist, cache)
    if not suite_acc:
        return rows, None
    suite = make_suite(cfg, baseline_hist=baseline_hist)
    return rows, suite.add(suite.create(), tb, cache)
