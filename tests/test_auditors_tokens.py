"""Token distribution signals."""

import math

import numpy as np
import pytest

from spike_audit.auditors.base import TokenBatch
from spike_audit.auditors.tokens import Histogram, TokenStats, jensen_shannon, log_bucket


def run(aud, rows, dtype=np.uint16):
    b = TokenBatch.from_lists(rows, dtype=dtype)
    return aud.result(aud.add(aud.create(), b)), aud.row_signals(b)


def test_entropy_top_share_distinct():
    r, rs = run(TokenStats(), [[0, 1, 2, 3], [0, 1, 2, 3]])
    assert r["token_entropy"] == pytest.approx(2.0)
    assert r["top_token_share"] == 0.25
    assert r["distinct_token_ratio"] == 0.5
    assert rs["token_entropy"].tolist() == pytest.approx([2.0, 2.0])
    assert rs["distinct_token_ratio"].tolist() == [1.0, 1.0]
    r, rs = run(TokenStats(), [[5, 5, 5, 5]])
    assert r["token_entropy"] == 0.0 and r["top_token_share"] == 1.0
    assert math.isnan(r["token_jsd"])  # no baseline


def test_jsd_bounds_and_baseline_signals():
    assert jensen_shannon(np.array([1, 1]), np.array([2, 2])) == pytest.approx(0.0)
    assert jensen_shannon(np.array([1, 0]), np.array([0, 1])) == pytest.approx(1.0)
    base = np.array([0, 1_000_000_0, 1_000_000_0, 1])  # token 0 unseen, token 3 very rare
    r, rs = run(TokenStats(baseline_hist=base), [[1, 2, 1, 2], [0, 3, 3, 1]])
    assert r["rare_token_share"] == pytest.approx(3 / 8)
    assert 0 < r["token_jsd"] < 1
    assert rs["rare_token_share"].tolist() == pytest.approx([0.0, 0.75])
    assert rs["baseline_xent"][1] > rs["baseline_xent"][0]
    assert r["baseline_xent"] == pytest.approx(np.mean(rs["baseline_xent"]))


def test_vocab_grows_beyond_the_given_size():
    aud = TokenStats(vocab_size=4, eos_id=70000, pad_id=9)
    r, _ = run(aud, [[1, 70000, 2, 9]], dtype=np.uint32)
    assert r["eos_density"] == 0.25 and r["pad_density"] == 0.25
    h = Histogram(vocab_size=4)
    acc = h.merge([h.add(h.create(), TokenBatch.from_lists([[1, 10]], dtype=np.uint16)), h.create()])
    assert h.histogram(acc).tolist() == [0, 1] + [0] * 8 + [1]


def test_lengths_packing_and_documents():
    rows = [[1] * 8, [1] * 8, [1] * 8, [1] * 3, [1, 0, 1, 1, 0, 1, 1, 1, 1, 1]]
    r, rs = run(TokenStats(eos_id=0, short_row_len=4), rows)
    assert r["row_len_mean"] == pytest.approx(37 / 5)
    assert r["row_len_p50"] == 8 and r["row_len_p95"] == 10
    assert r["offmodal_row_frac"] == pytest.approx(2 / 5)
    assert r["short_row_frac"] == pytest.approx(1 / 5)
    # documents: 8, 8, 8, 3, 1, 2, 5 -> mean 35/7
    assert r["doc_len_mean"] == pytest.approx(5.0)
    assert r["doc_len_p50"] == pytest.approx(5, rel=0.045)  # sorted 1 2 3 5 8 8 8
    assert r["doc_len_p95"] == pytest.approx(8, rel=0.045)
    assert rs["doc_len_mean"][4] == pytest.approx(8 / 3)


def test_log_buckets_are_monotone_and_fine():
    lens = np.arange(1, 5000)
    k = log_bucket(lens)
    assert np.all(np.diff(k) >= 0)
    centre = 2.0 ** ((k + 0.5) / 8)
    assert np.all(np.abs(centre / lens - 1) < 0.045)
    assert len(np.unique(log_bucket(np.arange(1, 17)))) == 16


from hypothesis import given, settings, strategies as st


@settings(max_examples=120, deadline=None)
@given(n_rows=st.integers(1, 40), width=st.integers(1, 300), hi=st.sampled_from([2, 50, 32000, 65536, 70000, 2**31]),
       dtype=st.sampled_from(["uint16", "int32", "uint32", "int64"]), ragged=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_row_token_counts_equal_unique_of_row_token_keys(n_rows, width, hi, dtype, ragged, seed):
    """The flat key sort gives np.unique's (row, count) order exactly, for rows of one length and of many, ids
    below and above 16 bits."""
    from spike_audit.auditors.tokens import _row_token_counts

    if hi > 65536 and dtype == "uint16":
        dtype = "int64"
    rng = np.random.default_rng(seed)
    ln = rng.integers(1, width + 1, n_rows) if ragged else np.full(n_rows, width)
    v = rng.integers(0, hi, int(ln.sum())).astype(dtype)
    row = np.repeat(np.arange(n_rows), ln)
    uk, cnt = np.unique((row.astype(np.uint64) << np.uint64(32)) | v.astype(np.uint64), return_counts=True)
    krow, got = _row_token_counts(v, ln, row)
    assert krow.dtype == np.int64 and got.dtype == np.int64
    assert np.array_equal(krow, (uk >> np.uint64(32)).astype(np.int64)) and np.array_equal(got, cnt)


def test_row_token_counts_beyond_16_bit_row_indices():
    """More than 65,536 rows in one batch: the row index no longer fits a 32-bit key's upper half."""
    from spike_audit.auditors.tokens import _row_token_counts

    n_rows = 70_000
    v = (np.arange(2 * n_rows) % 5).astype(np.uint16)
    ln = np.full(n_rows, 2)
    krow, cnt = _row_token_counts(v, ln, np.repeat(np.arange(n_rows), 2))
    assert np.array_equal(krow, np.repeat(np.arange(n_rows), 2)) and (cnt == 1).all()
    v[1::2] = v[::2]  # each row: one token twice
    krow, cnt = _row_token_counts(v, ln, np.repeat(np.arange(n_rows), 2))
    assert np.array_equal(krow, np.arange(n_rows)) and (cnt == 2).all()


def test_row_signals_same_for_packed_and_ragged_paths():
    """Packed rows (2-D path) and the same rows with one row cut shorter (unique path) agree on the untouched rows."""
    rng = np.random.default_rng(3)
    rows = [list(rng.integers(0, 40, 64)) for _ in range(20)]
    ts = TokenStats(vocab_size=40, eos_id=0)
    packed = ts.row_signals(TokenBatch.from_lists(rows))
    ragged = ts.row_signals(TokenBatch.from_lists(rows[:-1] + [rows[-1][:10]]))
    for k in ("token_entropy", "top_token_share", "distinct_token_ratio"):
        assert packed[k][:-1].tobytes() == ragged[k][:-1].tobytes()


@settings(max_examples=80, deadline=None)
@given(n_rows=st.integers(1, 30), width=st.integers(0, 200), ragged=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_row_densities_equal_a_per_row_count(n_rows, width, ragged, seed):
    """eos_density, pad_density and rare_token_share per row are exactly (count of such tokens in the row) / length,
    bit for bit, for rows of one length (row sums) and of many; empty rows give NaN."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(0, width + 1, n_rows) if ragged else np.full(n_rows, width)
    rows = [list(rng.integers(0, 12, k)) for k in lens]
    baseline = np.r_[np.zeros(3), rng.integers(1, 1000, 9)].astype(np.int64)  # ids 0-2 never seen: rare
    rs = TokenStats(vocab_size=12, eos_id=0, pad_id=1, baseline_hist=baseline).row_signals(TokenBatch.from_lists(rows))
    with np.errstate(invalid="ignore", divide="ignore"):
        for name, ids in (("eos_density", [0]), ("pad_density", [1]), ("rare_token_share", [0, 1, 2])):
            want = np.array([sum(t in ids for t in r) for r in rows], np.float64) / lens.astype(np.float64)
            assert rs[name].tobytes() == want.tobytes(), name
