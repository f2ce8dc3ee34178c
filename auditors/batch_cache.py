"""Arrays derived from one batch that several auditors need, each computed at most once."""

from __future__ import annotations

import sys
import numpy as np

from spike_audit.auditors.hashing import token_mix
from spike_audit.auditors.segments import segments_from_mask


class BatchCache:
    """Arrays derived from one batch that several auditors need, each computed at most once.

    ``Suite.add`` builds one per batch and hands it to every auditor; an auditor used alone builds
    its own. Entries are keyed by what they depend on (a hash key, a separator id), so auditors with
    different parameters never share a wrong array. Cached arrays must not be modified.
    """

    __slots__ = ("_memo", "batch", "n", "offsets", "values")

    def __init__(self, batch):
        self.batch = batch
        self.offsets = np.asarray(batch.offsets, dtype=np.int64)
        self.n = int(self.offsets[-1]) if len(self.offsets) else 0
        self.values = batch.values[: self.n]
        self._memo: dict = {}

    def memo(self, key, fn):
        try:
            return self._memo[key]
        except KeyError:
            out = self._memo[key] = fn()
            return out

    def lengths(self) -> np.ndarray:
        return self.memo("lengths", lambda: np.diff(self.offsets))

    def token_mix(self, key: int, hi32: bool = False) -> np.ndarray:
        """:func:`token_mix` of the batch's tokens; the uint32 high halves reuse the uint64 mixes
        when those are already cached."""
        if hi32 and ("mix", key, False) in self._memo and sys.byteorder == "little":
            full = self._memo[("mix", key, False)]
            return self.memo(("mix", key, True), lambda: np.ascontiguousarray(full.view(np.uint32)[1::2]))
        return self.memo(("mix", key, hi32), lambda: token_mix(self.values, key, hi32))

    def docs(self, sep_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:func:`segments_from_mask` of the batch at ``sep_id`` tokens: ``(starts, ends, row)``."""
        return self.memo(("docs", sep_id), lambda: segments_from_mask(self.offsets, self.values == sep_id))
