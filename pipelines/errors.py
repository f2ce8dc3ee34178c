"""User-facing errors: one line, naming the file, the line or row, and what was expected."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input or invocation. The CLI prints ``str(err)`` and exits 2, with no
    traceback. Build messages as ``f"{path}:{line}: expected ..., got ..."``. The message is one line by
    construction: a newline or carriage return in it (a shard name, a line of a log) is shown as ``\\n``."""

    def __init__(self, *args):
        if args and isinstance(args[0], str):
            args = (args[0].replace("\r", "\\r").replace("\n", "\\n"),) + args[1:]
        super().__init__(*args)


def where(path: object, line: int | None = None, row: int | None = None) -> str:
    """Format a location prefix: ``path:line`` or ``path: row N``."""
    if line is not None:
        return f"{path}:{line}"
    if row is not None:
        return f"{path}: row {row}"
    return str(path)


def reason(err: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (third-party messages can span lines), for a one-line error."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return (lines[0] if lines else type(err).__name__)[:limit]


# -- text from data, shown safely (on the terminal: pipelines.cli.terminal re-exports these; in the reports) ---------
# Control characters, C1 controls (``\\x9b`` is an 8-bit CSI) and bidirectional overrides are shown as escapes,
# never raw, so a row of training data cannot move the cursor, retitle the window, hide text or reorder what is
# shown after it.

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
