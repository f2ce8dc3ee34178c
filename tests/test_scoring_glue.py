import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spike_audit.pipelines.beam.scoring import entity_scores, sum_histograms, to_token_batch, unique_by_key


def test_unique_by_key_sorts_and_collapses_exact_duplicates():
    items = [(3, "c"), (1, "a"), (3, "c"), (2, "b"), (3, "c")]
    assert unique_by_key(items) == [(1, "a"), (2, "b"), (3, "c")]


def test_unique_by_key_refuses_conflicting_duplicates():
    with pytest.raises(RuntimeError, match="two different items for key 3"):
        unique_by_key([(3, "c"), (3, "d")])


def test_sum_histograms_pads_to_the_longest():
    out = sum_histograms([np.array([1, 2]), np.array([0, 0, 5]), np.zeros(0, np.int64)])
    assert out.tolist() == [1, 2, 5]


def test_text_only_rows_are_audited_as_utf8_bytes():
    rb = pa.record_batch({"text": ["ab", "é", None], "shard": ["s"] * 3, "row": [0, 1, 2]})
    tb = to_token_batch(rb)
    assert tb.lengths.tolist() == [2, 2, 0]
    assert tb.values.tolist() == [97, 98, 0xC3, 0xA9]


def test_entity_scores_rank_the_outlier_first_with_its_reason():
    rng = np.random.default_rng(0)
    items = [(f"s{i:02d}", 10, 100, {"a": float(rng.normal()), "b": float(rng.normal())}) for i in range(30)]
    items.append(("zz", 10, 100, {"a": 0.1, "b": 50.0}))
    recs = entity_scores(items, "shard")
    assert recs[0]["shard"] == "zz" and recs[0]["rank"] == 1 and recs[0]["top_signal"] == "b"
    assert recs[0]["reason"].startswith("b = 50")
    assert [r["rank"] for r in recs] == list(range(1, 32))


def test_token_batch_keeps_text_in_arrow_and_shard_names_per_row():
    rb = pa.record_batch({"tokens": pa.array([[1, 2], [3]], pa.list_(pa.int64())), "text": ["ab", None],
                          "shard": ["s1", "s2"], "row": [4, 9]})
    tb = to_token_batch(rb)
    assert isinstance(tb.text, pa.Array) and tb.text.to_pylist() == ["ab", None]
    assert tb.shard.tolist() == ["s1", "s2"] and tb.row.tolist() == [4, 9]
    assert tb.values.tolist() == [1, 2, 3]


def test_sliced_text_only_batches_give_their_own_bytes():
    rb = pa.record_batch({"text": ["xx", "ab", "é"], "shard": ["s"] * 3, "row": [0, 1, 2]}).slice(1)
    tb = to_token_batch(rb)
    assert tb.offsets.tolist() == [0, 2, 4]
    assert tb.values.tolist() == [97, 98, 0xC3, 0xA9]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([1, 2, 16, 256, 257, 65536, 65537, 1 << 20]), st.integers(0, 3000), st.integers(0, 2**32 - 1))
def test_bucket_order_is_the_stable_argsort(buckets, n, seed):
    from spike_audit.pipelines.beam.scoring import bucket_order, split_by_bucket

    rng = np.random.default_rng(seed)
    b = rng.integers(0, buckets, n)
    assert np.array_equal(bucket_order(b, buckets), np.argsort(b, kind="stable"))
    key = rng.integers(0, 2**63, n, dtype=np.uint64)
    got = list(split_by_bucket(key, buckets, np.arange(n)))
    rows = [r for _, (r,) in got]
    assert [k for k, _ in got] == sorted({int(k) for k in key % np.uint64(buckets)})
    assert all((np.diff(r) > 0).all() for r in rows)  # within a bucket, in input order
    assert sorted(np.concatenate(rows).tolist() if rows else []) == list(range(n))
