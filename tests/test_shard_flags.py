"""Row flags of a shard audit: the candidates kept by the scoring pass give exactly the flags that reading and
scoring the shard again gives, whatever the shard's anomalous families and cuts turn out to be."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from spike_audit.pipelines.shard_audit.flags import (_flag_records, flag_scored, merge_candidates, select_candidates,
                                                     strongest_rows)


def _reread(name, bins, chunks, fams):
    """The flags as the second pass gives them: each chunk's records, then the shard's strongest."""
    parts = []
    for a, b in chunks:
        out = _flag_records(name, bins[a:b], np.arange(a, b), fams, lambda i, a=a: f"row {a + i}")
        if out:
            parts.append(out)
    return [r for _, r in strongest_rows((name, parts))] if parts else []


def _from_candidates(name, bins, chunks, fams, order):
    cands = []
    for a, b in chunks:
        c = select_candidates(np.arange(a, b), bins[a:b])
        c["excerpt"] = [f"row {a + int(i)}" for i in c.pop("pos").tolist()]
        cands.append(c)
    merged = None
    for k in order(len(cands)):  # merged in any order, as a combine may
        merged = merge_candidates([merged, cands[k]])
    out = list(flag_scored((name, merged), {name: ("p", len(bins), fams)}))
    return [r for _, r in strongest_rows((name, [out[0][1]]))] if out else []


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 60), st.integers(1, 6), st.integers(0, 2**32 - 1), st.integers(1, 3), st.integers(1, 25),
       st.booleans())
def test_candidates_give_the_reread_flags(n, n_fam, seed, n_cut, chunk, reverse):
    rng = np.random.default_rng(seed)
    bins = rng.integers(0, 6, size=(n, n_fam)) * rng.integers(0, 2, size=(n, n_fam))  # many ties and zeros
    fam_ids = rng.permutation(n_fam)[:n_cut]
    fams = [(int(f), int(rng.integers(0, 6)), float(rng.random() * 10), float(rng.random())) for f in fam_ids]
    chunks = [(a, min(a + chunk, n)) for a in range(0, n, chunk)]
    order = (lambda m: range(m - 1, -1, -1)) if reverse else range
    assert _from_candidates("s", bins, chunks, fams, order) == _reread("s", bins, chunks, fams)
