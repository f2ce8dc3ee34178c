"""``python -m spike_audit.schemas``: print the Markdown reference of every table (kept in docs/schemas.md)."""

from spike_audit.schemas.core import markdown
from spike_audit.schemas.tables import TABLES

if __name__ == "__main__":
    print(markdown(TABLES), end="")
