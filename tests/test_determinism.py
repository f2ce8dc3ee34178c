"""Identical inputs give identical outputs, whatever order a runner delivers batches in: the Suite's
results must be bit-identical (not merely close) for every order and grouping of its inputs."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spike_audit.auditors.base import TokenBatch
from spike_audit.auditors.suite import Suite

words = st.sampled_from(["the", "data", "spike", "loss", "\\\\", "def", "return", "x = 1", "0.125", "\n", "  "])
text = st.lists(words, max_size=30).map(" ".join)
row = st.lists(st.integers(0, 300), max_size=40)


@st.composite
def batches(draw):
    out, pool = [], []
    for _ in range(draw(st.integers(2, 5))):
        rows = draw(st.lists(row, min_size=1, max_size=6))
        rows += draw(st.lists(st.sampled_from(pool), max_size=2)) if pool else []
        pool += rows
        out.append(TokenBatch.from_lists(rows, text=[draw(text) for _ in rows]))
    return out


def _bits(d: dict) -> dict:
    return {k: np.float64(v).tobytes() for k, v in d.items()}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches(), st.randoms(use_true_random=False))
def test_suite_results_are_bit_identical_in_any_order(bs, rnd):
    suite = Suite(eos_id=0, baseline_hist=np.arange(1, 302))
    ref = suite.result(suite.merge([suite.add(suite.create(), b) for b in bs]))
    order = bs[:]
    rnd.shuffle(order)
    seq = suite.create()
    for b in order:
        seq = suite.add(seq, b)
    parts = [suite.add(suite.create(), b) for b in order]
    cut = rnd.randint(0, len(parts))
    regrouped = suite.merge([suite.merge(parts[cut:]), suite.merge(parts[:cut])])
    assert _bits(suite.result(seq)) == _bits(ref)
    assert _bits(suite.result(regrouped)) == _bits(ref)
