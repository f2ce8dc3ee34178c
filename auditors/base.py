"""The auditor contract and the batch type every auditor consumes.

An auditor is a small, picklable object with a mergeable accumulator::

    acc = auditor.create()
    acc = auditor.add(acc, batch)          # any number of times
    acc = auditor.merge([acc_a, acc_b])    # any grouping, any order
    out = auditor.result(acc)              # {signal_name: float}

so that ``pipelines`` can wrap it unchanged in a Beam ``CombineFn`` and tests can check that merging
in any order gives the same answer. ``row_signals(batch)`` gives per-row values of the same signals
(where a signal has a per-row meaning) for attribution: which rows of a batch carry an anomaly.

Nothing here imports Beam. Accumulators must be picklable (numpy arrays, tuples, dicts, ints).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Protocol, Sequence

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class TokenBatch:
    """A batch of token sequences as flat values + offsets (Arrow list layout), plus optional text.

    ``values[offsets[i]:offsets[i + 1]]`` are the tokens of row ``i``. ``offsets`` starts at 0.
    ``text`` (optional) holds one string per row where the source has text: an Arrow string array
    when built from Arrow (no Python object per row), or any sequence of ``str``/``None``.
    ``shard``/``row`` (optional) identify where each row came from, for attribution.
    """

    values: np.ndarray
    offsets: np.ndarray
    text: Sequence[str] | pa.Array | None = None
    shard: np.ndarray | None = None  # object/str array, one per row
    row: np.ndarray | None = None  # int64, one per row

    @property
    def n_rows(self) -> int:
        return int(len(self.offsets) - 1)

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1] - self.offsets[0]) if len(self.offsets) else 0

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row_index(self) -> np.ndarray:
        """Row id of every token (length ``n_tokens``), vectorised."""
        return np.repeat(np.arange(self.n_rows, dtype=np.int64), self.lengths)

    @classmethod
    def from_arrow(
        cls, batch: pa.RecordBatch | pa.Table, tokens: str = "tokens", text: str | None = "text"
    ) -> "TokenBatch":
        """Zero-copy view of an Arrow ``list<int>`` token column (and a ``text`` column if present).

        Sliced list arrays are handled: offsets are rebased to start at 0 and values are cut to the
        referenced range, both without copying the token buffer.
        """
        if isinstance(batch, pa.Table):
            batch = batch.combine_chunks().to_batches()[0] if batch.num_rows else None
            if batch is None:
                return cls(np.zeros(0, np.int64), np.zeros(1, np.int64))
        names = batch.schema.names
        txt = None
        if text and text in names:
            txt = batch.column(text)  # stays Arrow: the text auditor works on Arrow string arrays
        if tokens not in names:
            if txt is None:
                raise ValueError(f"batch has neither a {tokens!r} nor a {text!r} column")
            return cls(np.zeros(0, np.int64), np.zeros(len(txt) + 1, np.int64), text=txt)
        col = batch.column(tokens)
        if col.null_count:
            col = col.fill_null(pa.scalar([], type=col.type))
        offsets = np.asarray(col.offsets, dtype=np.int64)
        values = col.values.to_numpy(zero_copy_only=False)
        start, end = int(offsets[0]), int(offsets[-1])
        if start or end != len(values):
            values = values[start:end]
            offsets = offsets - start
        return cls(values=values, offsets=offsets, text=txt)

    @classmethod
    def from_lists(cls, rows: Iterable[Sequence[int]], dtype=np.int64, text=None) -> "TokenBatch":
        """Convenience constructor (tests, small inputs)."""
        rows = [np.asarray(r, dtype=dtype) for r in rows]
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.concatenate(rows) if rows else np.zeros(0, dtype=dtype)
        return cls(values=values.astype(dtype, copy=False), offsets=offsets, text=text)


class Auditor(Protocol):
    """What every auditor provides (structural type; no base class needed)."""

    name: str

    def create(self) -> Any: ...

    def add(self, acc: Any, batch: TokenBatch) -> Any: ...

    def merge(self, accs: Iterable[Any]) -> Any: ...

    def result(self, acc: Any) -> dict[str, float]: ...

    def row_signals(self, batch: TokenBatch) -> dict[str, np.ndarray]: ...
