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
