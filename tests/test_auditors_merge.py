"""Every auditor gives the same result whatever the accumulation path (Beam CombineFn contract)."""

import math
import pickle

import numpy as np
import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spike_audit.auditors.base import TokenBatch
from spike_audit.auditors.dedup import ExactDup
from spike_audit.auditors.minhash import NearDup
from spike_audit.auditors.repetition import Repetition
from spike_audit.auditors.suite import SIGNALS, Suite
from spike_audit.auditors.text import TextStats
from spike_audit.auditors.tokens import Histogram, TokenStats

BASE = np.arange(1, 41, dtype=np.int64)

AUDITORS = {
    "dedup": lambda: ExactDup(eos_id=0, seed=3),
    "minhash": lambda: NearDup(ngram=3, num_perm=32, threshold=0.6),
    "repetition": lambda: Repetition(max_count=4),
    "tokens": lambda: TokenStats(vocab_size=8, baseline_hist=BASE, eos_id=0, pad_id=1),
    "histogram": lambda: Histogram(vocab_size=4),
    "text": lambda: TextStats(),
    "suite": lambda: Suite(vocab_size=16, baseline_hist=BASE, eos_id=0, pad_id=1, num_perm=16, ngram=3),
}

row = st.lists(st.integers(0, 12), max_size=40)
words = st.sampled_from(["a", "b", "ab", "a b", "x\n", "\n\n", "z z z", "!", "é"])
text = st.lists(words, max_size=12).map(" ".join)


@st.composite
def batches(draw):
    out = []
    pool = []
    for _ in range(draw(st.integers(1, 5))):
        rows = draw(st.lists(row, max_size=8))
        # re-use earlier rows so that duplicates (within and across batches) happen
        rows += draw(st.lists(st.sampled_from(pool), max_size=3)) if pool else []
        pool += rows
        texts = [draw(text) for _ in rows]
        dtype = draw(st.sampled_from([np.uint16, np.uint32, np.int64]))
        out.append(TokenBatch.from_lists(rows, dtype=dtype, text=texts))
    return out


def same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        assert (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12), (k, x, y)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches(), st.randoms(use_true_random=False))
def test_three_paths_agree(bs, rnd):
    for name, make in AUDITORS.items():
        aud = make()
        per_batch = [aud.add(aud.create(), b) for b in bs]
        merged = aud.merge(per_batch)
        shuffled = per_batch[:]
        rnd.shuffle(shuffled)
        cut = rnd.randint(0, len(shuffled))
        regrouped = aud.merge([aud.merge(shuffled[:cut]), aud.merge(shuffled[cut:])])
        seq = aud.create()
        for b in bs:
            seq = aud.add(seq, b)
        roundtrip = pickle.loads(pickle.dumps(merged))
        r = aud.result(merged)
        same(r, aud.result(regrouped))
        same(r, aud.result(seq))
        same(r, aud.result(roundtrip))
        rs = aud.row_signals(bs[0])
        for k, v in rs.items():
            assert len(v) == bs[0].n_rows, (name, k)


def test_suite_result_has_every_signal_and_nan_where_not_applicable():
    s = Suite()  # no eos, no baseline, no pad
    b = TokenBatch.from_lists([[1, 2, 3], [4, 5]], dtype=np.uint16)
    r = s.result(s.add(s.create(), b))
    assert set(SIGNALS) <= set(r)
    for k in ("dup_doc_frac", "token_jsd", "rare_token_share", "eos_density", "pad_density", "doc_len_mean",
              "gopher_dup_line_frac", "compression_ratio"):
        assert math.isnan(r[k]), k
    assert r["n_rows"] == 2 and r["n_tokens"] == 5
    assert r["row_len_mean"] == 2.5


def test_suite_on_arrow_slice_matches_lists():
    rows = [[1, 2, 3], [4, 5, 6, 7], [1, 2, 3], [9] * 40]
    table = pa.table({"tokens": pa.array(rows, type=pa.list_(pa.uint16())),
                      "text": ["a a", "b", "a a", "c"]})
    s = Suite(eos_id=9, num_perm=16)
    sliced = TokenBatch.from_arrow(table.slice(1, 3).to_batches()[0])
    direct = TokenBatch.from_lists(rows[1:], dtype=np.uint16, text=["b", "a a", "c"])
    same(s.result(s.add(s.create(), sliced)), s.result(s.add(s.create(), direct)))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_suite_shares_per_batch_work_without_changing_any_auditor(bs):
    # Suite.add computes token mixes and documents once per batch for all auditors: every signal
    # must equal what the auditor gives alone
    suite = Suite(vocab_size=16, baseline_hist=BASE, eos_id=0, pad_id=1, num_perm=16, ngram=3, seed=5, text=False)
    alone = [ExactDup(eos_id=0, seed=5), NearDup(ngram=3, num_perm=16, seed=5), Repetition(),
             TokenStats(vocab_size=16, baseline_hist=BASE, eos_id=0, pad_id=1)]
    acc = suite.create()
    for b in bs:
        acc = suite.add(acc, b)
    r = suite.result(acc)
    for aud in alone:
        a = aud.create()
        for b in bs:
            a = aud.add(a, b)
        for k, v in aud.result(a).items():
            assert (math.isnan(v) and math.isnan(r[k])) or v == r[k], (aud.name, k)
