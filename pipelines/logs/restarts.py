"""The restart rule: within one (run, metric), a value survives only if no later line logs a step ``<=``
its step (a repeated step is replaced by the later value; a resume replaces every value from the resume point on)."""

from __future__ import annotations

import numpy as np


def _resolve_restarts(steps: np.ndarray) -> np.ndarray:
    """Keep mask: a value survives iff every later value (same run and metric) has a larger step."""
    n = len(steps)
    keep = np.ones(n, bool)
    if n > 1:
        later_min = np.minimum.accumulate(steps[::-1])[::-1]
        keep[:-1] = steps[:-1] < later_min[1:]
    return keep
