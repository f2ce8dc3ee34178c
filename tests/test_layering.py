"""The design card's layering: auditors and schemas never import Beam or pipelines."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(pkg: str) -> set[tuple[str, str]]:
    found = set()
    for path in (ROOT / pkg).rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {(str(path.relative_to(ROOT)), a.name.split(".")[0]) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add((str(path.relative_to(ROOT)), node.module.split(".")[0]))
    return found


def test_auditors_import_neither_beam_nor_pipelines():
    bad = {(f, m) for f, m in _imports("auditors") if m in {"apache_beam", "pipelines", "pandas"}}
    assert not bad, f"auditors must stay pure numpy: {sorted(bad)}"


def test_schemas_import_nothing_of_ours_but_pyarrow():
    bad = {(f, m) for f, m in _imports("schemas") if m in {"apache_beam", "pipelines", "auditors"}}
    assert not bad, sorted(bad)
