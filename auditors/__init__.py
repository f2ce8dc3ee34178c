"""The science of spike-audit: pure, vectorised numpy over token arrays and Arrow batches.

No Beam import anywhere in this package (a test enforces it). See :mod:`.base` for the
mergeable-accumulator contract every auditor follows.

Modules: the signal families, one per module (``tokens``, ``dedup``, ``minhash``, ``repetition``, ``text`` with
its parts ``text_repeats``, ``text_chars``, ``text_arrays``) and ``suite`` (all of them as one accumulator); the
statistics (``robust``: location and scale with exact leave-one-out; ``scales``; ``verdict``; ``scoring``;
``attribution``) and spike detection (``spikes``); and helpers named for what they do (``hashing``, ``segments``,
``segment_hashes``, ``batch_cache``, ``sampling``, ``components``).

May import: numpy, pyarrow and :mod:`spike_audit.schemas` only; never Beam, pandas or the pipelines.
"""

from spike_audit.auditors.base import Auditor, TokenBatch

__all__ = ["Auditor", "TokenBatch"]
