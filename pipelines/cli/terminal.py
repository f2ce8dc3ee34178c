"""Text from data (training text, shard names, lines of a log) printed safely: control characters, C1 controls
(``\\x9b`` is an 8-bit CSI) and bidirectional overrides are shown as escapes, never sent to the terminal raw, so a
row of training data cannot move the cursor, retitle the window, hide text or reorder what is shown. The functions
live in :mod:`spike_audit.pipelines.errors` (the bottom layer), so the reports use the same rule."""

from __future__ import annotations

from spike_audit.pipelines.errors import _JSON, _TEXT, json_printable, one_line_text, printable  # noqa: F401
