"""The science of spike-audit: pure, vectorised numpy over token arrays and Arrow batches.

No Beam import anywhere in this package (a test enforces it). See :mod:`auditors.base` for the
mergeable-accumulator contract every auditor follows.
"""

from spike_audit.auditors.base import Auditor, TokenBatch

__all__ = ["Auditor", "TokenBatch"]
