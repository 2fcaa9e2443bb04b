"""The package's import graph: the CLI and the demo do not import each other."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "pgjournal"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def walk_runtime(tree: ast.AST) -> list[ast.AST]:
    """Every node, except ``if TYPE_CHECKING:`` blocks (never imported at run time)."""
    out: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) \
                and node.test.id == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        out.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return out


def imports(path: Path, *, top_level_only: bool) -> set[str]:
    """pgjournal modules that ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else \
        module_name(path).rsplit(".", 1)[0]
    nodes = tree.body if top_level_only else list(walk_runtime(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level \
                else (node.module or "")
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m == "pgjournal" or m.startswith("pgjournal.")}


def graph(*, top_level_only: bool) -> dict[str, set[str]]:
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    return {name: {m for m in imports(path, top_level_only=top_level_only) if m in files}
            for name, path in files.items()}


def test_cli_is_a_package_of_command_groups() -> None:
    groups = {p.stem for p in (PKG / "cli").glob("*.py")}
    assert {"__init__", "runs", "queues", "worker", "admin", "dev"} <= groups
    assert not (PKG / "cli.py").exists()


def test_cli_and_demo_do_not_import_each_other() -> None:
    g = graph(top_level_only=False)
    for demo in ("pgjournal.demo", "pgjournal._demo_app"):
        assert not {m for m in g[demo] if m == "pgjournal.cli" or m.startswith("pgjournal.cli.")}
    # the queries both use live in one place
    assert "pgjournal._queries" in g["pgjournal.demo"]
    assert "pgjournal._queries" in g["pgjournal.cli"]


def test_no_import_cycle_even_counting_lazy_imports() -> None:
    g = graph(top_level_only=False)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in g.get(node, ()):
            if nxt in ("pgjournal", node):
                continue   # the package __init__ re-exports everything; not a module cycle
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, node, nxt]))
            if not state.get(nxt):
                visit(nxt, [*path, node])
        state[node] = 2

    for name in g:
        if not state.get(name):
            visit(name, [])
