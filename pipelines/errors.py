"""User-facing errors: one line, naming the file, the line or row, and what was expected."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input or invocation. The CLI prints ``str(err)`` and exits 2, with no
    traceback. Build messages as ``f"{path}:{line}: expected ..., got ..."``."""


def where(path: object, line: int | None = None, row: int | None = None) -> str:
    """Format a location prefix: ``path:line`` or ``path: row N``."""
    if line is not None:
        return f"{path}:{line}"
    if row is not None:
        return f"{path}: row {row}"
    return str(path)
