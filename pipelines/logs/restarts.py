"""The restart rule: within one (run, metric), a step logged again replaces the earlier value, and a resume (the log
goes back to an earlier step and carries on from there) replaces every value from the resume point on.

A line that goes back without carrying on is no resume: a late or stray line (a rank flushing late, two lines
swapped) after which the log goes on past where it was. Read as a resume it would delete every step between the
step it names and the end of the old branch, though nothing logs them again. Such *out-of-order* lines are told
apart from a resume by what follows them: the lines from the step going back up to the line that passes the old
maximum again. Out-of-order lines cover less than half of the old branch's step range before that, and the line
after them continues the old branch (within two of its last intervals); a resume covers more, or the log ends or goes
back once more first, or it passes the old maximum far beyond it (an excerpt of a log). Out-of-order lines replace
only values at their own steps."""

from __future__ import annotations

import numpy as np


def resolve_restarts(steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(keep, out_of_order) masks over ``steps`` (file order): a value survives iff no later value logs its step
    and every later value that is not out of order has a larger step."""
    steps = np.asarray(steps, dtype=np.int64)
    n = len(steps)
    ooo = np.zeros(n, dtype=bool)
    if n < 2:
        return np.ones(n, dtype=bool), ooo
    pm = np.empty(n + 1, dtype=np.int64)  # pm[t] = max(steps[:t]); pm[0] below every step
    pm[0] = np.iinfo(np.int64).min
    np.maximum.accumulate(steps, out=pm[1:])
    rw = np.flatnonzero(steps[1:] <= steps[:-1]) + 1  # lines that go back from the line before (or repeat it)
    if len(rw):
        top = pm[rw]  # the old branch's maximum before each
        back = np.searchsorted(pm, top, side="right") - 1  # first line past that maximum again (n: none)
        nxt = np.append(rw[1:], n)  # the next line that goes back
        by_jump = back < nxt
        last = steps[np.maximum(back - 1, 0)]
        # the old branch's last interval before going back, and the line that passes its maximum again: out of
        # order when that line continues the old branch (within two of its intervals: the log picks up where it
        # was), not when it is far past it (an excerpt of a log, lines left out)
        gap = np.maximum(steps[rw - 1] - steps[np.maximum(rw - 2, 0)], 1)
        resumes_old = (steps[np.minimum(back, n - 1)] - top) <= 2 * gap
        stray = by_jump & resumes_old & ((last - steps[rw]) < (top - last))  # covered less than half of the range
        if stray.any():
            d = np.zeros(n + 1, dtype=np.int64)
            np.add.at(d, rw[stray], 1)
            np.add.at(d, back[stray], -1)
            ooo = np.cumsum(d[:n]) > 0
    later = np.where(ooo, np.iinfo(np.int64).max, steps)  # out-of-order values never push others out
    later_min = np.empty(n, dtype=np.int64)
    later_min[-1] = np.iinfo(np.int64).max
    later_min[:-1] = np.minimum.accumulate(later[::-1])[::-1][1:]
    rest = np.cumsum((~ooo)[::-1])[::-1]  # values at or after each that are not out of order
    no_later = np.append(rest[1:], 0) == 0
    keep = (steps < later_min) | no_later  # (the sentinel alone does not drop a step of 2^63 - 1)
    order = np.lexsort((np.arange(n), steps))  # equal steps in file order: all but the last are replaced
    dup = np.zeros(n, dtype=bool)
    dup[order[:-1]] = steps[order[:-1]] == steps[order[1:]]
    return keep & ~dup, ooo


def _resolve_restarts(steps: np.ndarray) -> np.ndarray:
    """Keep mask of :func:`resolve_restarts`."""
    return resolve_restarts(steps)[0]
