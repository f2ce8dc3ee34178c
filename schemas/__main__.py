"""``python -m schemas``: print the Markdown reference of every table (kept in docs/schemas.md)."""

from schemas.core import markdown
from schemas.tables import TABLES

if __name__ == "__main__":
    print(markdown(TABLES), end="")
