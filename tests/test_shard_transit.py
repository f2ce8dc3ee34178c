"""What a shard's accumulator carries between the shard audit's stages: count arrays packed (non-zero cells only, or
dense where that is smaller), restored exactly. The in-process runner holds every shard's element of a grouped stage
in memory, so a dense 47 x 769 row-bin histogram per shard (289 KB) made peak memory grow with the number of
shards."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from spike_audit.pipelines.shard_audit.graph import (ReadChunk, ScoreShard, expand_acc, finish_shard, group_chunks,
                                                     pack_counts, unpack_counts)

_counts = hnp.arrays(np.int64, hnp.array_shapes(min_dims=1, max_dims=2, min_side=0, max_side=40),
                     elements=st.one_of(st.just(0), st.integers(0, 5), st.integers(0, 2**40)))


@settings(max_examples=200, deadline=None)
@given(_counts, st.booleans())
def test_packed_counts_restore_the_int64_array_exactly(a, dense_ok):
    back = unpack_counts(pack_counts(a, dense_ok=dense_ok))
    assert back.dtype == np.int64 and back.shape == a.shape and np.array_equal(back, a)
    back2 = unpack_counts(pickle.loads(pickle.dumps(pack_counts(a, dense_ok=dense_ok))))
    assert np.array_equal(back2, a)


def test_a_dense_array_from_older_state_is_read_as_it_is():
    old = np.array([3, 0, 7], dtype=np.int32)  # what compact accumulators held before the packing
    assert unpack_counts(old).dtype == np.int64 and unpack_counts(old).tolist() == [3, 0, 7]


def test_dense_ok_keeps_a_mostly_non_zero_histogram_dense_and_packs_a_sparse_one():
    full = np.arange(1, 1001, dtype=np.int64)
    assert isinstance(pack_counts(full, dense_ok=True), np.ndarray)
    sparse = np.zeros(1000, dtype=np.int64)
    sparse[[3, 500]] = 9
    assert isinstance(pack_counts(sparse, dense_ok=True), tuple)


def test_a_finished_shard_carries_its_row_bins_packed_and_small(tmp_path):
    rng = np.random.default_rng(0)
    rows = [rng.integers(2, 500, rng.integers(20, 200)).tolist() for _ in range(300)]
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"tokens": pa.array(rows, pa.list_(pa.uint16()))}), path)
    cfg = {"vocab_size": None, "eos_id": None, "pad_id": None, "seed": 0, "threshold": 0.8, "tokens_col": "tokens",
           "text_col": "text"}
    item = next(group_chunks("s.parquet", str(path), 300, [(0, 100), (100, 200), (200, 300)]))
    (name, acc), _, _ = ScoreShard(cfg, {"s.parquet": 0}, ReadChunk("tokens", "text", None, None))(item)
    dense = expand_acc(acc)["rows"]
    assert dense.ndim == 2 and dense.sum(axis=1).max() == 300  # every row binned on every family it has
    hist = np.zeros(500, dtype=np.int64)
    done = finish_shard((name, acc), hist + 1, cfg, own_in_hist=False)
    assert np.array_equal(unpack_counts(done[4]), dense)
    assert len(pickle.dumps(done[4])) < dense.nbytes / 10
