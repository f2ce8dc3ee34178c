"""Repeated n-gram runs must match OLMo's instance filter (find_periodic_sequences + max_count)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spike_audit.auditors.base import TokenBatch
from spike_audit.auditors.repetition import Repetition, find_runs


def olmo_literal(arr, max_period=13, min_period=1):
    """Slow, literal transcription of OLMo's algorithm with Python lists: aligned chunks of p
    tokens (padded with -1), compare each chunk with the previous one (chunk 0 with the last,
    as np.roll does), group consecutive all-equal chunks, extend by the trailing equal tokens of
    the chunk before and the leading equal tokens of the chunk after, keep times > 2."""
    arr = [int(x) for x in arr]
    n = len(arr)
    found = []
    for p in range(min_period, min(max_period, n // 3) + 1):
        padded = arr + [-1] * (p - n % p)
        chunks = [padded[i : i + p] for i in range(0, len(padded), p)]
        eq = [[chunks[k][j] == chunks[k - 1][j] for j in range(p)] for k in range(len(chunks))]
        full = [all(e) for e in eq]
        k = 0
        while k < len(chunks):
            if not full[k]:
                k += 1
                continue
            first = k
            while k + 1 < len(chunks) and full[k + 1]:
                k += 1
            last = k
            trail = 0
            while trail < p and eq[first - 1][p - 1 - trail]:
                trail += 1
            if trail == p:
                trail = 0
            lead = 0
            while lead < p and eq[last + 1][lead]:
                lead += 1
            start = (first - 1) * p - trail
            end = (last + 1) * p + lead
            if (end - start) // p > 2:
                found.append((start, end, p, (end - start) // p))
            k += 1
    return found


def ours(rows):
    batch = TokenBatch.from_lists(rows, dtype=np.int64)
    r = find_runs(batch)
    out = [[] for _ in rows]
    for row, s, e, p, t in zip(r["row"], r["start"], r["end"], r["period"], r["times"]):
        o = batch.offsets[row]
        out[row].append((int(s - o), int(e - o), int(p), int(t)))
    return [sorted(x) for x in out]


def test_worked_vectors():
    # a 0 repeated 5 times at [1, 6)
    assert ours([[5, 0, 0, 0, 0, 0, 7]])[0] == [(1, 6, 1, 5)] == olmo_literal([5, 0, 0, 0, 0, 0, 7])
    # "01" three times: 5 0 1 0 1 0 1 2 7
    assert ours([[5, 0, 1, 0, 1, 0, 1, 2, 7]])[0] == [(1, 7, 2, 3)] == olmo_literal([5, 0, 1, 0, 1, 0, 1, 2, 7])
    # two repeats only: not reported (OLMo needs >= 3)
    assert ours([[9, 1, 2, 1, 2, 8]])[0] == []


def test_alignment_rule_matches_olmo():
    # the run "3 4" x3 starts at an odd position, so with period 2 no aligned chunk of it is whole
    # in some layouts; OLMo and we must agree on exactly which runs are seen
    for prefix in range(0, 5):
        row = list(range(100, 100 + prefix)) + [3, 4] * 3 + [7]
        assert ours([row])[0] == sorted(olmo_literal(row))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 13), st.integers(0, 40), st.integers(0, 6)),
                min_size=1, max_size=6), st.integers(0, 2**31))
def test_matches_literal_on_random_rows_with_planted_runs(specs, seed):
    rng = np.random.default_rng(seed)
    rows = []
    for pre, period, reps, alphabet in specs:
        unit = rng.integers(0, 3 + alphabet, period)
        body = np.tile(unit, reps)[: reps * period - int(rng.integers(0, period))] if reps else []
        row = np.concatenate([rng.integers(0, 3 + alphabet, pre), body, rng.integers(0, 3 + alphabet, 3)])
        rows.append(row.astype(np.int64))
    got = ours(rows)
    for row, g in zip(rows, got):
        assert g == sorted(olmo_literal(row)), row


def test_rows_do_not_leak_into_each_other():
    # each row alone has 20 repeats of 7; concatenated they would make 40
    rows = [[7] * 20, [7] * 20]
    r = Repetition()
    res = r.result(r.add(r.create(), TokenBatch.from_lists(rows, dtype=np.uint16)))
    assert res["max_repeat_run"] == 20
    assert res["repeat_run_rows_frac"] == 0.0


def test_flag_threshold_is_times_at_least_32():
    r = Repetition()
    for reps, flagged in ((31, 0.0), (32, 1.0)):
        row = [1, 2] + [5, 6, 7] * reps + [8]
        b = TokenBatch.from_lists([row], dtype=np.uint32)
        res = r.result(r.add(r.create(), b))
        assert res["repeat_run_rows_frac"] == flagged
        assert res["max_repeat_run"] == reps
        olmo_drops = any(t >= 32 for *_, t in olmo_literal(row))
        assert olmo_drops == bool(flagged)
        rs = r.row_signals(b)
        assert rs["repeat_run_rows_frac"][0] == flagged
        # the repeated span is exactly the 3*reps tokens of the planted run
        expect = 3 * reps / len(row) if flagged else 0.0
        assert rs["repeat_token_frac"][0] == pytest.approx(expect)
        assert rs["repeat_any_token_frac"][0] == pytest.approx(3 * reps / len(row))


def test_empty_and_short_rows():
    r = Repetition()
    b = TokenBatch.from_lists([[], [1], [1, 1], [1, 1, 1]], dtype=np.uint16)
    rs = r.row_signals(b)
    assert rs["max_repeat_run"].tolist() == [0, 0, 0, 3]
    assert np.isnan(rs["repeat_token_frac"][0])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 13), st.integers(0, 12)), min_size=1, max_size=10),
       st.integers(0, 2**31))
def test_many_rows_with_empty_rows_and_runs_at_row_edges(specs, seed):
    # runs touching the start and end of rows, next to empty and short rows: no run may cross a row
    rng = np.random.default_rng(seed)
    rows = []
    for kind, period, reps in specs:
        if kind == 0:
            rows.append(np.zeros(0, np.int64))
        elif kind == 1:
            rows.append(rng.integers(0, 3, int(rng.integers(1, 5))))
        else:
            run = np.tile(rng.integers(0, 3, period), reps)
            noise = rng.integers(0, 4, int(rng.integers(0, 6)))
            rows.append(np.concatenate([run, noise] if kind == 2 else [noise, run]))
    got = ours(rows)
    for row, g in zip(rows, got):
        assert g == sorted(olmo_literal(row)), row


def test_row_coverage_is_counted_in_the_row_of_each_run():
    # a run ending a row right where the next row's run starts: each row covers its own tokens (the
    # batch total was right before, the per-row split gave row 0 both runs)
    rows = [[1, 2, 3, 4, 5, 6, 7, 8] * 4, [1, 2, 3, 4, 5, 6, 7, 8] * 4, list(range(100, 140))]
    rs = Repetition().row_signals(TokenBatch.from_lists(rows))
    assert rs["repeat_any_token_frac"].tolist() == [1.0, 1.0, 0.0]


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 40), st.integers(1, 12), st.integers(1, 13), st.integers(0, 2**31))
def test_packed_rows_of_one_length_match_literal_and_never_join(width, n_rows, period, seed):
    """Rows of one length (packed sequences, where the row boundaries are cleared through a strided view), short ones
    included (a width at or below the period): each row alone as OLMo sees it, even when one periodic stream runs
    through every row boundary."""
    rng = np.random.default_rng(seed)
    unit = rng.integers(0, 4, period)
    stream = np.tile(unit, -(-width * n_rows // period) + 1)[: width * n_rows]
    noise = rng.random(width * n_rows) < 0.1
    stream = np.where(noise, rng.integers(0, 4, width * n_rows), stream).astype(np.int64)
    rows = list(stream.reshape(n_rows, width))
    got = ours(rows)
    for row, g in zip(rows, got):
        assert g == sorted(olmo_literal(row)), row
