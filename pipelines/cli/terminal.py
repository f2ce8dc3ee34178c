"""Text from data (training text, shard names, lines of a log) printed safely: control characters, C1 controls
(``\\x9b`` is an 8-bit CSI) and bidirectional overrides are shown as escapes, never sent to the terminal raw, so a
row of training data cannot move the cursor, retitle the window, hide text or reorder what is shown."""

from __future__ import annotations

_BIDI = (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
_UNSAFE = [c for c in range(0x20) if c not in (0x09, 0x0A)] + [0x7F, *range(0x80, 0xA0), *_BIDI]

_TEXT = {c: (f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}") for c in _UNSAFE}
# In JSON the C0 controls are escaped by the encoder already; the rest become JSON escapes (the same string).
_JSON = {c: f"\\u{c:04x}" for c in _UNSAFE if c >= 0x7F}


def printable(text: str) -> str:
    """``text`` with every terminal control character written as a visible escape (``\\x1b``, ``\\u202e``)."""
    return text.translate(_TEXT)


def json_printable(text: str) -> str:
    """A JSON document (from ``json.dumps``) with the characters C0 escaping misses written as ``\\uXXXX``:
    the same JSON value, safe on a terminal."""
    return text.translate(_JSON)


def one_line_text(text) -> str:
    """A data value (a shard, run or file name, a log's metric) inside one printed line: :func:`printable`, and its
    newlines written as ``\\n`` too, so a name cannot start a line of its own."""
    return printable(str(text)).replace("\n", "\\n")
