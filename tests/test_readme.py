"""The README's promises that code can check."""

from pathlib import Path

from spike_audit.auditors.rows import rows_markdown
from spike_audit.auditors.suite import signals_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def _signals_block(text: str) -> str:
    start = text.index("<!-- signals:begin -->") + len("<!-- signals:begin -->\n")
    return text[start : text.index("<!-- signals:end -->")]


def test_signal_table_is_generated_from_the_registry():
    assert _signals_block(README.read_text()) == signals_markdown(), (
        "README signal table is stale: run `python -m spike_audit.pipelines.docs`")


def test_row_signal_table_is_generated_from_the_registry():
    text = README.read_text()
    start = text.index("<!-- rows:begin -->") + len("<!-- rows:begin -->\n")
    assert text[start:text.index("<!-- rows:end -->")] == rows_markdown(), (
        "README row-signal table is stale: run `python -m spike_audit.pipelines.docs`")


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    text = README.read_text()
    setup = text[text.index("## Set up") : text.index("## Commands")]
    commands = [line.strip() for line in setup.splitlines() if line.startswith("    ")]
    assert len(commands) == 2
    assert "spike-audit demo" in commands[0]
    ci = (README.parent / ".ci" / "run").read_text()
    test_cmd = commands[1].split("&& ", 3)[-1]
    assert test_cmd in ci, (test_cmd, ci)


def test_readme_images_exist_and_are_small():
    """The report screenshots the README shows are checked in (docs/screenshots.py writes them) and stay small."""
    import re

    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README.read_text())
    assert {"docs/report-run.png", "docs/report-shards.png"} <= set(images)
    for rel in images:
        path = README.parent / rel
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", rel
        assert path.stat().st_size < 200_000, (rel, path.stat().st_size)
