"""``python -m pipelines.docs``: regenerate the generated documentation: ``docs/schemas.md`` from
:mod:`schemas`, and the signal table in ``README.md`` from :data:`auditors.suite.SIGNALS`."""

from __future__ import annotations

from pathlib import Path

from auditors.suite import signals_markdown
from schemas.core import markdown
from schemas.tables import TABLES

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- signals:begin -->\n", "<!-- signals:end -->"


def update_readme(text: str) -> str:
    start = text.index(BEGIN) + len(BEGIN)
    return text[:start] + signals_markdown() + text[text.index(END):]


def main() -> None:
    (ROOT / "docs" / "schemas.md").write_text(markdown(TABLES))
    readme = ROOT / "README.md"
    readme.write_text(update_readme(readme.read_text()))
    print("updated docs/schemas.md and README.md")


if __name__ == "__main__":
    main()
