"""Connected components of a graph given as edge arrays, bounded and vectorised: used by the MinHash auditor
(clusters of near-duplicate rows) and by the shard audit's cross-shard clusters."""

from __future__ import annotations

import numpy as np


def components(n: int, lo: np.ndarray, hi: np.ndarray, max_iter: int | None = None) -> tuple[np.ndarray, bool]:
    """Connected components of the graph on ``n`` nodes with edges ``(lo[i], hi[i])``: the label of
    each node is the smallest node of its component (min-label propagation with pointer jumping,
    each round vectorised). Returns ``(labels, converged)``; with ``max_iter`` at most that many
    rounds run, and ``converged`` says whether the labels were final."""
    lab = np.arange(n, dtype=np.int64)
    if not len(lo):
        return lab, True
    rounds = 0
    while max_iter is None or rounds < max_iter:
        rounds += 1
        new = lab.copy()
        np.minimum.at(new, lo, lab[hi])
        np.minimum.at(new, hi, lab[lo])
        new = new[new]
        new = new[new]
        if np.array_equal(new, lab):
            return lab, True
        lab = new
    return lab, False
