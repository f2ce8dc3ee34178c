"""The fixed duplicate reference of `spike-audit run`: rows seen elsewhere, and rows consumed again together
(a replay of an earlier batch) as opposed to natural duplicates scattered over the run."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from spike_audit.pipelines.run.dupref import DupReference, replay_rows, seen_elsewhere


def _ref(triples):
    acc = DupReference()
    h = np.array([t[0] for t in triples], np.uint64)
    p = np.array([t[1] for t in triples], np.uint64)
    s = np.array([t[2] for t in triples], np.int64)
    half = len(triples) // 2  # merged from two parts, in any order
    a = acc.merge([acc.create(), (h[half:], p[half:], s[half:])])
    return acc.result(acc.merge([(h[:half], p[:half], s[:half]), a]))


def test_a_replayed_block_is_counted_together_and_natural_duplicates_are_not():
    # this batch: rows with hashes 1..6 at positions 101..106. Hashes 1, 2, 3 were consumed together at step 40
    # (a replay of that batch); 4 and 5 are natural duplicates seen at two different steps; 6 only at its own
    # position (in the reference too: a control's own rows are there)
    ref = _ref([(1, 501, 40), (2, 502, 40), (3, 503, 40), (4, 601, 7), (5, 702, 90), (5, 703, 91),
                (6, 106, 12), (1, 101, 12)])
    h = np.arange(1, 7, dtype=np.uint64)
    pos = np.arange(101, 107, dtype=np.uint64)
    assert seen_elsewhere(ref, h, pos).tolist() == [1, 1, 1, 1, 1, 0]
    # the block of 3 counted once: its first row 1, the two later ones 3 (like a group of copies in a batch)
    assert replay_rows(ref, h, pos).tolist() == [1, 3, 3, 1, 1, 0]
    vals, part = replay_rows(ref, h, pos, with_partner=True)
    assert part.tolist() == [-1, 0, 0, -1, -1, -1]  # the skip list names the block's first row with the others
    assert np.isnan(replay_rows(None, h, pos)).all()
    # the same position consumed at another step (another epoch) is not elsewhere
    ref2 = _ref([(6, 106, 12), (6, 106, 700)])
    assert seen_elsewhere(ref2, h, pos)[5] == 0 and replay_rows(ref2, h, pos)[5] == 0


def test_replay_counts_are_invariant_to_the_order_of_the_batch_rows():
    rng = np.random.default_rng(0)
    # every row's copies at one other step (the blocks are disjoint: which row heads a block follows the batch
    # order, the counts at every cut do not)
    trip = [(x, int(rng.integers(1000, 2000)), x % 6) for x in rng.integers(1, 30, 80).tolist()]
    ref = _ref(trip)
    h = rng.integers(1, 30, 16).astype(np.uint64)
    pos = rng.integers(0, 999, 16).astype(np.uint64)
    want = replay_rows(ref, h, pos)
    perm = rng.permutation(16)
    assert sorted(replay_rows(ref, h[perm], pos[perm]).tolist()) == sorted(want.tolist())


def test_natural_duplicates_consumed_together_elsewhere_are_one_odd_row():
    # rows 1 and 2 of this batch are natural duplicates (each also elsewhere) that happen to share step 50; the
    # batch also holds row 1 twice (an identical pair within the batch is dup_in_batch's, not a block of 2)
    ref = _ref([(1, 501, 50), (2, 502, 50), (3, 503, 60)])
    h = np.array([1, 2, 1, 3, 4], np.uint64)
    pos = np.arange(101, 106, dtype=np.uint64)
    v = replay_rows(ref, h, pos)
    assert int((v >= 2).sum()) == 1  # one row at the block's count, not two
    assert v.tolist() == [1, 2, 1, 1, 0]


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 12), n_nat=st.integers(0, 6), seed=st.integers(0, 2**16))
def test_a_replay_of_k_rows_gives_k_minus_1_rows_at_k(k, n_nat, seed):
    rng = np.random.default_rng(seed)
    n = k + n_nat + 3
    h = rng.permutation(np.arange(1, n + 1)).astype(np.uint64)
    pos = np.arange(1000, 1000 + n, dtype=np.uint64)
    rows = rng.permutation(n)
    replayed, natural = rows[:k], rows[k:k + n_nat]
    trip = [(int(h[r]), 5000 + i, 7) for i, r in enumerate(replayed)]  # consumed together at step 7
    trip += [(int(h[r]), 6000 + i, 100 + i) for i, r in enumerate(natural)]  # each at its own step
    ref = _ref(trip)
    v, part = replay_rows(ref, h, pos, with_partner=True)
    assert int((v >= k).sum()) == (k - 1 if k > 1 else k + n_nat)
    assert int((v > 0).sum()) == k + n_nat  # every row seen elsewhere
    head = int(replayed.min())
    if k > 1:
        assert set(np.flatnonzero(part >= 0).tolist()) == set(replayed.tolist()) - {head}
        assert set(part[part >= 0].tolist()) == {head}



@settings(max_examples=100, deadline=None)
@given(x=st.lists(st.integers(0, 2**64 - 1) | st.integers(0, 20), max_size=40),
       keys=st.lists(st.integers(0, 2**64 - 1) | st.integers(0, 20), max_size=40))
def test_membership_in_the_sorted_reference_is_isin(x, keys):
    """The reference lookups (is this row hash audited? is this (hash, position) pair the row's own?) answer
    exactly what np.isin answers, for any hashes, including none and repeated ones."""
    from spike_audit.pipelines.run.dupref import _in_sorted

    x = np.asarray(x, dtype=np.uint64)
    ref = np.unique(np.asarray(keys, dtype=np.uint64))
    np.testing.assert_array_equal(_in_sorted(x, ref), np.isin(x, ref))
