"""The layout's import rules (README, Layout): imports run one way, top to bottom,

    cli -> api -> demo -> run / shard_audit -> report -> beam -> builders -> manifest
        -> logs / shards / tokenizer -> outdir / records -> files -> settings / progress -> io -> fs -> errors
        -> auditors -> schemas

a module may import its own package (its unit below) or any unit in a lower layer, never a unit in its own
layer or above; the report is fed tables and imports only auditors, schemas, io and errors; auditors and
schemas never import Beam; and there is no import cycle between modules. Every import counts, including
the ones inside functions (a lazy import against the direction is still a loop in the design).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = ("schemas", "auditors", "pipelines")
P = "spike_audit.pipelines"

#: Top to bottom. Each entry is one layer: the units (module prefixes) in it.
LAYERS: list[tuple[str, ...]] = [
    (f"{P}.cli", f"{P}.docs"),
    (f"{P}.api",),
    (f"{P}.demo",),
    (f"{P}.run", f"{P}.shard_audit"),
    (f"{P}.report",),
    (f"{P}.beam",),
    (f"{P}.builders",),
    (f"{P}.manifest",),
    (f"{P}.logs", f"{P}.shards", f"{P}.tokenizer"),
    (f"{P}.outdir", f"{P}.records"),
    (f"{P}.files",),
    (f"{P}.settings", f"{P}.progress"),
    (f"{P}.io",),
    (f"{P}.fs",),
    (f"{P}.errors",),
    (P,),  # the package docstring
    ("spike_audit.auditors",),
    ("spike_audit.schemas",),
]
#: Units that may import only these units, whatever their layer.
ONLY: dict[str, tuple[str, ...]] = {
    f"{P}.report": (f"{P}.report", f"{P}.io", f"{P}.errors", "spike_audit.auditors", "spike_audit.schemas"),
}
#: Third-party imports a unit must never make.
FORBIDDEN_THIRD_PARTY: dict[str, tuple[str, ...]] = {
    "spike_audit.auditors": ("apache_beam", "pandas", "pyarrow.dataset"),
    "spike_audit.schemas": ("apache_beam", "numpy"),
    f"{P}.report": ("apache_beam",),
    f"{P}.logs": ("apache_beam",),
    f"{P}.shards": ("apache_beam",),
    f"{P}.manifest": ("apache_beam",),
    f"{P}.builders": ("apache_beam",),
    f"{P}.progress": ("apache_beam",),
    f"{P}.fs": ("apache_beam",),
    f"{P}.settings": ("apache_beam",),
}


def source_modules(root: Path = ROOT) -> dict[str, Path]:
    """Installed module name -> source file, for every module of the three folders."""
    found = {}
    for top in TOP:
        for path in (root / top).rglob("*.py"):
            parts = path.with_suffix("").relative_to(root).parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(("spike_audit",) + parts)] = path
    return found


def imports_of(path: Path, name: str, modules) -> list[tuple[str, int]]:
    """(imported module, line) for every import in a file, resolved to our modules where they are ours
    (``from pkg import sub`` is an import of ``pkg.sub`` when that is a module), else the import's name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                out.append((full if full in modules else base, node.lineno))
    return out


def unit_of(module: str) -> tuple[int, str] | None:
    """(layer index, unit) of one of our modules: the longest unit prefix that matches."""
    best = None
    for i, units in enumerate(LAYERS):
        for u in units:
            if (module == u or module.startswith(u + ".")) and (best is None or len(u) > len(best[1])):
                best = (i, u)
    return best


def violations(graph: dict[str, list[tuple[str, int]]]) -> list[str]:
    bad = []
    for src, targets in graph.items():
        where = unit_of(src)
        if where is None:
            bad.append(f"{src}: in no layer (add its unit to LAYERS)")
            continue
        layer, unit = where
        for dst, line in targets:
            top = dst.split(".")[0]
            if top in TOP:
                bad.append(f"{src}:{line}: imports `{dst}`: use the installed name spike_audit.{dst}")
                continue
            for u, banned in FORBIDDEN_THIRD_PARTY.items():
                if (unit == u or unit.startswith(u + ".")) and any(dst == b or dst.startswith(b + ".") for b in banned):
                    bad.append(f"{src}:{line}: imports `{dst}`, which {u} must never import")
            if top != "spike_audit":
                continue
            to = unit_of(dst)
            if to is None:
                bad.append(f"{src}:{line}: imports `{dst}`, which is in no layer")
                continue
            if unit in ONLY and to[1] not in ONLY[unit]:
                bad.append(f"{src}:{line}: imports `{dst}`: {unit} may import only {', '.join(ONLY[unit])}")
            elif to[1] != unit and to[0] <= layer:
                bad.append(f"{src}:{line}: imports `{dst}` ({to[1]}) against the direction of the layers")
    return bad


def cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself)."""
    edges = {m: sorted({d for d, _ in ts if d in graph}) for m, ts in graph.items()}
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):  # Tarjan; the graph is small, recursion depth is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges[v]:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def import_graph(root: Path = ROOT) -> dict[str, list[tuple[str, int]]]:
    modules = source_modules(root)
    return {name: imports_of(path, name, modules) for name, path in sorted(modules.items())}


def test_imports_run_one_way():
    bad = violations(import_graph())
    assert not bad, "imports against the layout:\n" + "\n".join(bad)


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checks_catch_a_planted_bad_import_and_a_cycle():
    graph = import_graph()
    shards = f"{P}.shards.read"
    assert shards in graph and f"{P}.logs.read" in graph
    planted = {**graph, shards: graph[shards] + [(f"{P}.logs.read", 1)]}  # sideways, same layer
    assert any("against the direction" in v for v in violations(planted))
    planted = {**graph, "spike_audit.auditors.base": graph["spike_audit.auditors.base"] + [(f"{P}.io", 1)]}
    assert any("spike_audit.auditors.base:1" in v for v in violations(planted))
    planted = {**graph, "spike_audit.auditors.base": [("apache_beam", 1)]}
    assert any("never import" in v for v in violations(planted))
    planted = {**graph, f"{P}.errors": graph[f"{P}.errors"] + [(f"{P}.progress", 1)],
               f"{P}.progress": graph[f"{P}.progress"] + [(f"{P}.errors", 1)]}
    assert [f"{P}.errors", f"{P}.progress"] in cycles(planted)


def test_every_package_docstring_says_what_lives_there_and_what_it_may_import():
    for init in sorted(p for top in TOP for p in (ROOT / top).rglob("__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "may import" in doc.lower(), f"{init.relative_to(ROOT)}: docstring must say what it may import"


def test_no_module_is_a_grab_bag():
    names = [p.stem for top in TOP for p in (ROOT / top).rglob("*.py")]
    assert not [n for n in names if n.strip("_") in {"util", "utils", "helpers", "misc", "common"}], names
