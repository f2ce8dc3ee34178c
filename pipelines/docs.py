"""``python -m spike_audit.pipelines.docs``: regenerate the generated documentation: ``docs/schemas.md`` from
:mod:`schemas`, and the signal tables in ``README.md`` from :data:`auditors.suite.SIGNALS` and :data:`auditors.rows.ROW_SIGNALS`."""

from __future__ import annotations

from pathlib import Path

from spike_audit.auditors.rows import rows_markdown
from spike_audit.auditors.suite import signals_markdown
from spike_audit.schemas.core import markdown
from spike_audit.schemas.tables import TABLES

BEGIN, END = "<!-- signals:begin -->\n", "<!-- signals:end -->"
ROWS_BEGIN, ROWS_END = "<!-- rows:begin -->\n", "<!-- rows:end -->"


def update_readme(text: str) -> str:
    start = text.index(BEGIN) + len(BEGIN)
    text = text[:start] + signals_markdown() + text[text.index(END):]
    start = text.index(ROWS_BEGIN) + len(ROWS_BEGIN)
    return text[:start] + rows_markdown() + text[text.index(ROWS_END):]


def main() -> None:
    # Run from the checkout: the installed package does not know where its source tree is.
    root = Path.cwd()
    if not (root / "README.md").is_file() or not (root / "schemas").is_dir():
        raise SystemExit("run `python -m spike_audit.pipelines.docs` from the root of a spike-audit checkout")
    (root / "docs" / "schemas.md").write_text(markdown(TABLES))
    readme = root / "README.md"
    readme.write_text(update_readme(readme.read_text()))
    print("updated docs/schemas.md and README.md")


if __name__ == "__main__":
    main()
