""":class:`BottomK` is a deterministic, mergeable sample (the ``k`` items with the smallest seeded hash
of their key, :func:`hash64`) used for row-level baselines; merging in any order gives the same sample."""

from __future__ import annotations

from typing import Iterable
import numpy as np


def hash64(keys: np.ndarray, seed: int = 0) -> np.ndarray:
    """Deterministic 64-bit mix (splitmix64 finaliser) of integer keys, vectorised."""
    x = np.asarray(keys).astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        x += np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


class BottomK:
    """Deterministic mergeable sample: keeps the ``k`` items with the smallest hash of their key.

    Accumulator: ``(hashes uint64[<=k], values float64[<=k, d])``. The sample depends only on the set
    of (key, value) pairs added, never on order or grouping."""

    def __init__(self, k: int = 4096, dims: int = 1, seed: int = 0):
        self.k, self.dims, self.seed = k, dims, seed

    def create(self):
        return (np.zeros(0, np.uint64), np.zeros((0, self.dims), np.float64))

    def _trim(self, h, v):
        order = np.lexsort((v[:, 0] if v.shape[1] else h, h)) if len(h) else np.zeros(0, np.int64)
        h, v = h[order], v[order]
        if len(h) > self.k:
            h, v = h[: self.k], v[: self.k]
        return h, v

    def add(self, acc, keys: np.ndarray, values: np.ndarray):
        values = np.asarray(values, dtype=np.float64).reshape(len(keys), self.dims)
        h = hash64(keys, self.seed)
        return self._trim(np.concatenate([acc[0], h]), np.vstack([acc[1], values]))

    def merge(self, accs: Iterable):
        accs = list(accs)
        if not accs:
            return self.create()
        return self._trim(np.concatenate([a[0] for a in accs]), np.vstack([a[1] for a in accs]))

    def result(self, acc) -> np.ndarray:
        return acc[1]
