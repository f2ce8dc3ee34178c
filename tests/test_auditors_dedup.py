"""Exact duplication: row/document hashes and duplicate fractions."""

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from spike_audit.auditors.base import TokenBatch
from spike_audit.auditors.dedup import ExactDup, cross_dup_frac, doc_hashes, row_hashes


def test_hash_is_stable_across_runs_and_platforms():
    # Pipelines persist these hashes (cluster ids, cross-step joins): the value of a fixed input
    # must never change. This pins the definition documented in auditors/dedup.py.
    b = TokenBatch.from_lists([[1, 2, 3]], dtype=np.uint16)
    assert int(row_hashes(b, seed=0)[0]) == 14030968743081938021


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(0, 60000), max_size=30), min_size=1, max_size=20), st.integers(0, 2**40))
def test_hash_depends_on_tokens_not_on_dtype_or_batch(rows, seed):
    h16 = row_hashes(TokenBatch.from_lists(rows, dtype=np.uint16), seed)
    h64 = row_hashes(TokenBatch.from_lists(rows, dtype=np.int64), seed)
    assert h16.dtype == np.uint64 and np.array_equal(h16, h64)
    # each row hashed alone gives the same value
    alone = np.concatenate([row_hashes(TokenBatch.from_lists([r], dtype=np.uint32), seed) for r in rows])
    assert np.array_equal(alone, h16)
    # equal rows <=> equal hashes
    for i in range(len(rows)):
        for j in range(len(rows)):
            assert (rows[i] == rows[j]) == (h16[i] == h16[j])


def test_order_length_and_seed_matter():
    b = TokenBatch.from_lists([[1, 2], [2, 1], [1, 2, 0], [1, 2]], dtype=np.uint16)
    h = row_hashes(b)
    assert len(set(h[:3].tolist())) == 3 and h[0] == h[3]
    assert row_hashes(b, seed=1)[0] != h[0]


def test_large_token_ids_use_the_same_definition():
    rows = [[5, 2**31 + 7, 3], [5, 7, 3]]
    h = row_hashes(TokenBatch.from_lists(rows, dtype=np.int64))
    small = row_hashes(TokenBatch.from_lists([rows[1]], dtype=np.int64))
    assert h[1] == small[0] and h[0] != h[1]


def test_duplicate_fractions_batch_accumulator_and_docs():
    a = ExactDup(eos_id=0)
    b1 = TokenBatch.from_lists([[1, 2, 0, 3], [1, 2, 0, 3], [4, 5]], dtype=np.uint16)
    b2 = TokenBatch.from_lists([[4, 5], [6, 0, 1, 2]], dtype=np.uint16)
    acc = a.merge([a.add(a.create(), b1), a.add(a.create(), b2)])
    r = a.result(acc)
    assert r["dup_row_frac"] == 2 / 5  # only the pair inside b1
    assert r["dup_row_frac_acc"] == 4 / 5  # [4, 5] is duplicated across batches
    # documents: [1,2] [3] [1,2] [3] [4,5] [4,5] [6] [1,2] -> all but [6] duplicated
    assert r["dup_doc_frac"] == 7 / 8
    rs = a.row_signals(b1)
    assert rs["dup_row_frac"].tolist() == [1.0, 1.0, 0.0]
    assert rs["dup_doc_frac"].tolist() == [1.0, 1.0, 0.0]


def test_documents_split_at_eos_and_row_ends():
    b = TokenBatch.from_lists([[0, 1, 2, 0, 0, 3], [4], [], [0]], dtype=np.uint16)
    h, row = doc_hashes(b, eos_id=0)
    assert row.tolist() == [0, 0, 1]
    ref = row_hashes(TokenBatch.from_lists([[1, 2], [3], [4]], dtype=np.uint16))
    assert np.array_equal(h, ref)


def test_cross_dup_frac():
    a = ExactDup()
    s1 = a.add(a.create(), TokenBatch.from_lists([[1], [2], [3]], dtype=np.uint16))
    s2 = a.add(a.create(), TokenBatch.from_lists([[3], [4]], dtype=np.uint16))
    everything = a.merge([s1, s2])
    assert cross_dup_frac(s1, everything) == 1 / 3
    assert cross_dup_frac(s2, everything) == 1 / 2


def test_from_arrow_slice():
    t = pa.table({"tokens": pa.array([[1, 2], [3, 4], [1, 2]], type=pa.list_(pa.uint32()))})
    sl = TokenBatch.from_arrow(t.slice(1, 2).to_batches()[0])
    h = row_hashes(sl)
    assert np.array_equal(h, row_hashes(TokenBatch.from_lists([[3, 4], [1, 2]], dtype=np.uint32)))


def _literal_docs(rows, eos):
    """Documents as (row, tokens): maximal runs of non-EOS tokens inside each row."""
    out = []
    for r, row in enumerate(rows):
        cur = []
        for t in list(row) + [eos]:
            if t == eos:
                if cur:
                    out.append((r, cur))
                cur = []
            else:
                cur.append(t)
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.integers(0, 6), max_size=40), min_size=1, max_size=12), st.booleans(),
       st.integers(0, 2**40), st.sampled_from([0, 3]))
def test_row_and_document_hashes_match_the_reference_definition(rows, packed, seed, eos):
    # packed=True gives equal-length rows (the 2-D path); small alphabets make many documents, so both
    # document paths run (documents beginning their row reuse the row products, or all recomputed)
    import spike_audit.auditors.segment_hashes as u

    if packed:
        width = max(len(r) for r in rows) or 1
        rows = [(r * width)[:width] if r else [1] * width for r in rows]
    b = TokenBatch.from_lists(rows, dtype=np.uint16)
    off = np.asarray(b.offsets)
    ref_rows = u.hash_segments(b.values, off[:-1], off[1:], seed)
    docs = _literal_docs(rows, eos)
    db = TokenBatch.from_lists([d for _, d in docs], dtype=np.int64)
    ref_docs = u.hash_segments(db.values, db.offsets[:-1], db.offsets[1:], seed)
    for chunk in (1 << 17, 7):  # one row group, or many (rows longer than a group)
        old, u._CHUNK = u._CHUNK, chunk
        try:
            assert np.array_equal(row_hashes(b, seed), ref_rows)
            h, drow = doc_hashes(b, eos, seed)
        finally:
            u._CHUNK = old
        assert drow.tolist() == [r for r, _ in docs]
        assert np.array_equal(h, ref_docs)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 4)), max_size=60))
def test_seen_elsewhere_matches_the_definition(rows):
    from spike_audit.auditors.dedup import seen_elsewhere

    hashes = np.array([h for h, _ in rows], dtype=np.uint64)
    keys = np.array([k for _, k in rows], dtype=np.int64)
    got = dict(zip(*(a.tolist() for a in seen_elsewhere(hashes, keys))))
    want = {}
    for h, k in rows:
        if any(h2 == h and k2 != k for h2, k2 in rows):
            want[k] = want.get(k, 0) + 1
    assert got == want


@settings(max_examples=120, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 8), st.integers(0, 5)), max_size=80), st.integers(2, 6),
       st.sampled_from([(0, 1), (2**62, 1), (-(2**40), 2**41 + 3)]))
def test_shared_blocks_match_the_definition(rows, max_keys, key_map):
    """Per ordered pair of different keys: the distinct hashes both hold, among hashes held by 2..max_keys keys,
    sorted by the first key then the second; small keys, keys near 2^62 and keys spread wider than 2^32 (negative
    too); hashes over the whole 64-bit range."""
    from spike_audit.auditors.dedup import shared_blocks

    off, mul = key_map
    rows = [(h * 0x9E3779B97F4A7C15 % 2**64, off + mul * k) for h, k in rows]
    hashes = np.array([h for h, _ in rows], dtype=np.uint64)
    keys = np.array([k for _, k in rows], dtype=np.int64)
    a, b, c = shared_blocks(hashes, keys, max_keys)
    assert a.dtype == b.dtype == c.dtype == np.int64
    assert list(zip(a.tolist(), b.tolist())) == sorted(zip(a.tolist(), b.tolist()))
    got = dict(zip(zip(a.tolist(), b.tolist()), c.tolist()))
    holders = {}
    for h, k in rows:
        holders.setdefault(h, set()).add(k)
    want = {}
    for h, ks in holders.items():
        if 2 <= len(ks) <= max_keys:
            for x in ks:
                for y in ks - {x}:
                    want[(x, y)] = want.get((x, y), 0) + 1
    assert got == want
    # expanded a few hashes at a time (a chunk of 1 to 7 pairs) the counts are the same
    for chunk in (1, 7):
        a2, b2, c2 = shared_blocks(hashes, keys, max_keys, chunk=chunk)
        assert dict(zip(zip(a2.tolist(), b2.tolist()), c2.tolist())) == want
    # bucketed (as the pipelines call it: equal hashes share a bucket) the counts add up to the same
    summed = {}
    for bucket in range(3):
        m = (hashes % np.uint64(3)) == np.uint64(bucket)
        for x, y, n in zip(*(v.tolist() for v in shared_blocks(hashes[m], keys[m], max_keys))):
            summed[(x, y)] = summed.get((x, y), 0) + n
    assert summed == want
