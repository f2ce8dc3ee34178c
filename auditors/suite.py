"""All auditors behind one mergeable accumulator, and the registry of every signal's definition.

``Suite`` runs the token-id auditors (exact and near duplication, repeated n-gram runs, token
distribution) on every batch, and the text auditor when the batch has a text column and
``text=True``. Its accumulator is a dict of the sub-accumulators plus row/token counts, so a Beam
``CombineFn`` can wrap it unchanged::

    suite = Suite(eos_id=0, baseline_hist=hist)
    acc = suite.merge([suite.add(suite.create(), b) for b in batches])
    suite.result(acc)        # {signal: float} for every name in SIGNALS, plus n_rows / n_tokens

``Suite.add`` builds one :class:`auditors._util.BatchCache` per batch and hands it to every
auditor, so the per-token work they share (the 64-bit token mix of exact dedup and MinHash, row
lengths, EOS-separated documents of dedup and token stats) is done once per batch; every auditor
gives the same result as alone.

``SIGNALS`` maps each signal name to its exact definition (the README's signal table is generated
from it: :func:`signals_markdown`); ``COUNTS`` lists the non-signal entries of ``result``.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from spike_audit.auditors import dedup, minhash, repetition, tokens
from spike_audit.auditors import text as text_mod
from spike_audit.auditors.batch_cache import BatchCache
from spike_audit.auditors.base import TokenBatch

SIGNALS: dict[str, str] = {
    **dedup.SIGNALS,
    **minhash.SIGNALS,
    **repetition.SIGNALS,
    **tokens.SIGNALS,
    **text_mod.SIGNALS,
}

COUNTS: dict[str, str] = {
    "n_rows": "Rows (sequences) audited.",
    "n_tokens": "Tokens audited.",
}

#: Which module defines each signal (for documentation).
SOURCES: dict[str, str] = {
    k: mod.__name__ for mod in (dedup, minhash, repetition, tokens, text_mod) for k in mod.SIGNALS
}


def signals_markdown() -> str:
    """The signal table for the README, generated from :data:`SIGNALS`."""
    lines = ["| signal | module | definition |", "|---|---|---|"]
    for k, v in SIGNALS.items():
        lines.append(f"| `{k}` | `{SOURCES[k]}` | {v} |")
    return "\n".join(lines) + "\n"


class Suite:
    """Every auditor with one combined accumulator (see module docstring)."""

    name = "suite"

    def __init__(self, vocab_size: int | None = None, baseline_hist: np.ndarray | None = None,
                 eos_id: int | None = None, pad_id: int | None = None, ngram: int = 5, num_perm: int = 128,
                 threshold: float = 0.8, seed: int = 0, text: bool = True):
        self.text = text
        self.auditors = {
            "dedup": dedup.ExactDup(eos_id=eos_id, seed=seed),
            "minhash": minhash.NearDup(ngram=ngram, num_perm=num_perm, threshold=threshold, seed=seed),
            "repetition": repetition.Repetition(),
            "tokens": tokens.TokenStats(vocab_size=vocab_size, baseline_hist=baseline_hist, eos_id=eos_id,
                                        pad_id=pad_id),
        }
        self.text_auditor = text_mod.TextStats()

    def create(self) -> dict:
        acc = {k: a.create() for k, a in self.auditors.items()}
        acc["text"] = self.text_auditor.create()
        acc["n_rows"] = 0
        acc["n_tokens"] = 0
        return acc

    def add(self, acc: dict, batch: TokenBatch, cache: BatchCache | None = None) -> dict:
        """Add a batch. Pass the ``BatchCache`` a row scorer used on the same batch (:mod:`.rows`) and no
        per-row work is done twice: token mixes, hashes, documents, repeated runs, MinHash sketches and
        text signals are computed once per batch, whoever asks first."""
        cache = cache if cache is not None else BatchCache(batch)
        out = {k: a.add(acc[k], batch, cache=cache) for k, a in self.auditors.items()}
        out["text"] = self.text_auditor.add(acc["text"], batch, cache) if self.text else acc["text"]
        out["n_rows"] = acc["n_rows"] + batch.n_rows
        out["n_tokens"] = acc["n_tokens"] + batch.n_tokens
        return out

    def merge(self, accs: Iterable[dict]) -> dict:
        accs = list(accs)
        if not accs:
            return self.create()
        out = {k: a.merge([x[k] for x in accs]) for k, a in self.auditors.items()}
        out["text"] = self.text_auditor.merge([x["text"] for x in accs])
        out["n_rows"] = sum(x["n_rows"] for x in accs)
        out["n_tokens"] = sum(x["n_tokens"] for x in accs)
        return out

    def result(self, acc: dict) -> dict[str, float]:
        out = dict.fromkeys(SIGNALS, float("nan"))
        for k, a in self.auditors.items():
            out.update(a.result(acc[k]))
        out.update(self.text_auditor.result(acc["text"]))
        out["n_rows"] = float(acc["n_rows"])
        out["n_tokens"] = float(acc["n_tokens"])
        return out

    def row_signals(self, batch: TokenBatch, cache: BatchCache | None = None) -> dict[str, np.ndarray]:
        cache = cache if cache is not None else BatchCache(batch)
        out: dict[str, np.ndarray] = {}
        for a in self.auditors.values():
            out.update(a.row_signals(batch, cache) if a.name != "tokens" else a.row_signals(batch))
        if self.text and batch.text is not None:
            out.update(self.text_auditor.row_signals(batch, cache))
        return out
