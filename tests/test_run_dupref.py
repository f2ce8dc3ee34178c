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
    assert replay_rows(ref, h, pos).tolist() == [3, 3, 3, 1, 1, 0]
    assert np.isnan(replay_rows(None, h, pos)).all()
    # the same position consumed at another step (another epoch) is not elsewhere
    ref2 = _ref([(6, 106, 12), (6, 106, 700)])
    assert seen_elsewhere(ref2, h, pos)[5] == 0 and replay_rows(ref2, h, pos)[5] == 0


def test_replay_counts_are_invariant_to_the_order_of_the_batch_rows():
    rng = np.random.default_rng(0)
    trip = [(int(rng.integers(1, 30)), int(rng.integers(1000, 2000)), int(rng.integers(0, 6))) for _ in range(80)]
    ref = _ref(trip)
    h = rng.integers(1, 30, 16).astype(np.uint64)
    pos = rng.integers(0, 999, 16).astype(np.uint64)
    want = replay_rows(ref, h, pos)
    perm = rng.permutation(16)
    assert replay_rows(ref, h[perm], pos[perm]).tolist() == want[perm].tolist()


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
