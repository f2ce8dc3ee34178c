"""Progress of the long steps (the pipelines' reads), through :mod:`logging`.

Two halves:

* :func:`tick` is called where the work is done (inside Beam DoFns: a shard read, a row chunk read). It logs a
  DEBUG record on the logger ``spike_audit.progress.events`` carrying the counts (rows, tokens, shards, bytes)
  in ``record.progress``. It holds no state: on a runner whose workers are other processes the records simply
  go to the workers' logs.
* :class:`Progress` runs on the driver around a pipeline: while it is open, a handler on that logger adds the
  events of workers in this process (the default in-process runner) to its totals, and it logs a summary line
  on ``spike_audit.progress`` (rows done of planned, tokens, shards, rate, ETA) at most every ``interval``
  seconds, and once at the end. The line is an ordinary INFO record with ``record.live = True``: the command
  line's stderr handler redraws it in place on a terminal (:class:`LiveLineHandler`); anywhere else (a
  scheduler, a notebook with logging configured) it is a periodic log line.

May import: nothing of spike-audit (standard library only).
"""

from __future__ import annotations

import logging
import sys
import threading
import time

EVENTS = "spike_audit.progress.events"
LINE = "spike_audit.progress"

_events = logging.getLogger(EVENTS)
_line = logging.getLogger(LINE)


def tick(label: str = "read", *, rows: int = 0, tokens: int = 0, shards: int = 0, nbytes: int = 0) -> None:
    """Report work done (from anywhere, also inside a DoFn)."""
    if _events.isEnabledFor(logging.DEBUG):
        _events.debug("%s: %d rows, %d tokens, %d shards", label, rows, tokens, shards,
                      extra={"progress": {"rows": int(rows), "tokens": int(tokens), "shards": int(shards),
                                          "bytes": int(nbytes)}})


def _si(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def live_display() -> bool:
    """Whether a handler redraws progress in place (a terminal): then lines are worth sending often."""
    lg: logging.Logger | None = _line
    while lg is not None:
        if any(isinstance(h, LiveLineHandler) and h.is_tty for h in lg.handlers):
            return True
        lg = lg.parent if lg.propagate else None
    return False


class _Collector(logging.Handler):
    def __init__(self, progress: "Progress"):
        super().__init__(logging.DEBUG)
        self.progress = progress

    def emit(self, record):
        p = getattr(record, "progress", None)
        if isinstance(p, dict):
            self.progress.add(**p)


class Progress:
    """Totals of one long step, shown as rows/tokens/shards done, rate and ETA (see the module docstring).

    ``total_rows`` / ``total_shards`` / ``total_bytes`` are what the plan says will be read (None when
    unknown); the ETA is from the rows when known, else the shards."""

    def __init__(self, label: str, *, total_rows: int | None = None, total_shards: int | None = None,
                 total_bytes: int | None = None, total_tokens: int | None = None, interval: float | None = None):
        self.label = label
        self.total = {"rows": total_rows, "shards": total_shards, "bytes": total_bytes, "tokens": total_tokens}
        self.done = {"rows": 0, "tokens": 0, "shards": 0, "bytes": 0}
        self.interval = interval
        self._lock = threading.Lock()
        self._t0 = self._last = 0.0
        self._handler = None
        self._saved = None

    # -- counting
    def add(self, rows: int = 0, tokens: int = 0, shards: int = 0, bytes: int = 0) -> None:  # noqa: A002
        with self._lock:
            self.done["rows"] += rows
            self.done["tokens"] += tokens
            self.done["shards"] += shards
            self.done["bytes"] += bytes
            now = time.monotonic()
            due = now - self._last >= self._interval()
            if due:
                self._last = now
        if due:
            self._emit(final=False)

    def _interval(self) -> float:
        if self.interval is not None:
            return self.interval
        return 0.2 if live_display() else 10.0

    # -- rendering
    def line(self) -> str:
        d, t = dict(self.done), self.total
        el = max(time.monotonic() - self._t0, 1e-9)
        parts = []
        if t["rows"]:
            parts.append(f"{d['rows']:,}/{t['rows']:,} rows ({100.0 * d['rows'] / t['rows']:.0f}%)")
        else:
            parts.append(f"{d['rows']:,} rows")
        if d["tokens"]:
            parts.append(f"{_si(d['tokens'])} tokens")
        if t["shards"]:
            parts.append(f"{d['shards']:,}/{t['shards']:,} shards")
        elif d["shards"]:
            parts.append(f"{d['shards']:,} shards")
        rate = d["tokens"] / el if d["tokens"] else d["rows"] / el
        parts.append(f"{_si(rate)} {'tokens' if d['tokens'] else 'rows'}/s")
        frac = None
        if t["rows"]:
            frac = d["rows"] / t["rows"]
        elif t["shards"]:
            frac = d["shards"] / t["shards"]
        if frac is not None and 0 < frac < 1:
            parts.append(f"ETA {_hms(el * (1 - frac) / frac)}")
        parts.append(f"{_hms(el)} elapsed")
        return f"{self.label}: " + ", ".join(parts)

    def _emit(self, final: bool) -> None:
        _line.info("%s", self.line(), extra={"live": not final, "progress_final": final})

    # -- lifetime
    def __enter__(self) -> "Progress":
        self._t0 = self._last = time.monotonic()
        self._handler = _Collector(self)
        self._saved = (_events.level, _events.propagate)
        _events.setLevel(logging.DEBUG)
        _events.propagate = False  # events are counted here, not printed one by one
        _events.addHandler(self._handler)
        self._emit(final=False)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        _events.removeHandler(self._handler)
        _events.setLevel(self._saved[0])
        _events.propagate = self._saved[1]
        if exc_type is None:
            self._emit(final=True)
        else:
            LiveLineHandler.clear_all()
        return False


class LiveLineHandler(logging.StreamHandler):
    """A stderr handler that redraws ``live`` records in place on a terminal (one line, ``\\r``) and prints every
    other record normally (clearing the live line first). Off a terminal, live records are printed as ordinary
    lines, but only every ``plain_interval`` seconds (the :class:`Progress` already throttles them)."""

    def __init__(self, stream=None, tty: bool | None = None):
        super().__init__(stream or sys.stderr)
        self._follow = stream is None  # write to whatever sys.stderr is now (it may be replaced, e.g. captured)
        self._tty = tty
        self._shown = 0

    @property
    def is_tty(self) -> bool:
        if self._tty is not None:
            return bool(self._tty)
        try:
            return bool(self.stream.isatty())
        except (AttributeError, ValueError):
            return False

    @staticmethod
    def clear_all() -> None:
        """End any live line (before printing something that is not a log record, e.g. an error)."""
        lg: logging.Logger | None = _line
        while lg is not None:
            for h in lg.handlers:
                if isinstance(h, LiveLineHandler):
                    h._clear()
            lg = lg.parent if lg.propagate else None

    def _clear(self) -> None:
        if self._shown:
            try:
                self.stream.write("\r" + " " * self._shown + "\r")
                self.stream.flush()
            except (OSError, ValueError):
                pass
            self._shown = 0

    def emit(self, record):
        if self._follow:
            self.stream = sys.stderr
        try:
            if self.is_tty and getattr(record, "live", False):
                msg = record.getMessage()
                width = 200
                try:
                    import shutil

                    width = max(20, shutil.get_terminal_size().columns - 1)
                except OSError:
                    pass
                msg = msg[:width]
                self.stream.write("\r" + msg + " " * max(0, self._shown - len(msg)))
                self.stream.flush()
                self._shown = len(msg)
                return
            self._clear()
            super().emit(record)
        except Exception:
            self.handleError(record)
