"""Attribution: which of a spike's flagged rows carry the anomaly its verdict names (top step, top signal)."""

from __future__ import annotations


def attributed(flags: list[dict], top_step, top_signal) -> list[dict]:
    """The rows that carry a spike's anomaly: flagged rows at the verdict's top step whose flagging
    signals include the top signal; if none has a per-row value of that signal, every flagged row at
    the top step. Sorted by score (highest first), then shard and row."""
    at_step = [f for f in flags if f["step"] == top_step]
    on_signal = [f for f in at_step if top_signal in f["signals"]]
    rows = on_signal or at_step
    return sorted(rows, key=lambda f: (-f["score"], f["shard"], f["row"]))
