"""How signals are compared across entities (steps, shards): most on their own scale, a few on a
log scale.

Maxima and lengths (``max_repeat_run``, row and document lengths) are multiplicative quantities
with long right tails: a run of 22 repeats in one row of a clean shard is ordinary, where on a
linear scale it would sit many robust sigmas above a median of 9. Their robust z (and effect size)
is computed on ``log1p(value)``; reported values stay in their own units.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

LOG_SCALE = frozenset({
    "max_repeat_run",
    "row_len_mean", "row_len_p50", "row_len_p95",
    "doc_len_mean", "doc_len_p50", "doc_len_p95",
})


def to_scoring_scale(names: Sequence[str], m: np.ndarray) -> np.ndarray:
    """Columns of ``m`` (rows x signals, in the order of ``names``) on the scale z is computed on."""
    m = np.asarray(m, dtype=np.float64)
    cols = [j for j, n in enumerate(names) if n in LOG_SCALE]
    if not cols:
        return m
    out = m.copy()
    with np.errstate(invalid="ignore", divide="ignore"):
        out[:, cols] = np.log1p(np.clip(m[:, cols], 0, None))
    return out
