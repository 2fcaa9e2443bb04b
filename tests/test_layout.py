"""The package's import graph (the CLI and the demo do not import each other; no
circle, not even through type-only imports) and the shape of ``Run``: the replay
engine behind one interface, and feature modules that use nothing else of it."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "pgjournal"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def walk_all(tree: ast.AST) -> list[ast.AST]:
    """Every node, ``if TYPE_CHECKING:`` blocks included."""
    return list(ast.walk(tree))


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


def imports(path: Path, *, top_level_only: bool, type_only: bool = False) -> set[str]:
    """pgjournal modules that ``path`` imports (relative imports resolved); with
    ``type_only``, those imported for type checking only count too."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else \
        module_name(path).rsplit(".", 1)[0]
    nodes = tree.body if top_level_only else \
        walk_all(tree) if type_only else walk_runtime(tree)
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


def graph(*, top_level_only: bool, type_only: bool = False) -> dict[str, set[str]]:
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    return {name: {m for m in imports(path, top_level_only=top_level_only, type_only=type_only)
                   if m in files}
            for name, path in files.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``g`` (as a path that ends where it starts), or None.
    Imports of the package ``pgjournal`` (which re-exports everything) are not
    module cycles."""
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(g.get(node, ())):
            if nxt in ("pgjournal", node):
                continue
            if state.get(nxt) == 1:
                return [*path, node, nxt]
            if not state.get(nxt):
                found = visit(nxt, [*path, node])
                if found:
                    return found
        state[node] = 2
        return None

    for name in sorted(g):
        if not state.get(name):
            found = visit(name, [])
            if found:
                return found
    return None


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
    cycle = find_cycle(graph(top_level_only=False))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_import_cycle_even_counting_type_only_imports() -> None:
    """A circle that only type checking closes is still one in the picture a
    reader draws: what a module needs of another above it is a protocol."""
    cycle = find_cycle(graph(top_level_only=False, type_only=True))
    assert cycle is None, "import cycle (type-only imports counted): " + " -> ".join(cycle or [])


# -- Run: the replay engine and the features on its interface --------------------------

RUN = PKG / "_run"
ENGINE = ("engine", "journal")   # the engine, and the journal reader only it uses
FEATURES = sorted(p for p in RUN.glob("*.py") if p.stem not in ("__init__", *ENGINE))


def engine_interface() -> tuple[frozenset[str], frozenset[str]]:
    from pgjournal._run import engine

    return engine.INTERFACE, engine.LIFECYCLE


def engine_uses(tree: ast.AST, holders: set[str]) -> list[tuple[int, str]]:
    """``(line, attribute)`` of every attribute taken of the engine: of a name in
    ``holders`` (``engine``) or of an attribute so named (``self.engine``)."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        base = node.value
        if (isinstance(base, ast.Name) and base.id in holders) or \
                (isinstance(base, ast.Attribute) and base.attr in holders):
            found.append((node.lineno, node.attr))
    return found


def test_run_is_an_engine_and_features_of_a_few_hundred_lines() -> None:
    assert {p.stem for p in FEATURES} >= {"steps", "streams", "waits", "flow", "family",
                                          "patches"}
    sizes = {p.name: len(p.read_text().splitlines()) for p in RUN.glob("*.py")}
    assert sizes["engine.py"] <= 500, sizes
    assert all(n <= 400 for name, n in sizes.items() if name != "engine.py"), sizes
    assert len((PKG / "run.py").read_text().splitlines()) <= 400


def test_the_interface_is_public_members_of_the_engine() -> None:
    from pgjournal._run.engine import Engine

    interface, lifecycle = engine_interface()
    for name in interface | lifecycle:
        assert not name.startswith("_"), name
    members = set(dir(Engine)) | set(Engine.__init__.__code__.co_names)
    assert interface | lifecycle <= members, (interface | lifecycle) - members


def test_features_touch_the_engine_only_through_its_interface() -> None:
    """A feature module takes of the engine only what ``INTERFACE`` lists, never
    its private state, and reaches it no other way (``run._engine``, the journal
    reader); the engine knows no feature."""
    interface, _ = engine_interface()
    for path in FEATURES:
        tree = ast.parse(path.read_text())
        bad = [(line, attr) for line, attr in engine_uses(tree, {"engine"})
               if attr not in interface]
        assert not bad, f"{path.name} takes of the engine what its interface lacks: {bad}"
        sneaky = [n.lineno for n in ast.walk(tree)
                  if isinstance(n, ast.Attribute) and n.attr == "_engine"]
        assert not sneaky, f"{path.name} reaches the engine behind Run's back at {sneaky}"
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "engine":
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports {private} of the engine"
        assert "pgjournal._run.journal" not in imports(path, top_level_only=False,
                                                       type_only=True), path.name
    for part in ENGINE:
        found = imports(RUN / f"{part}.py", top_level_only=False, type_only=True)
        features = {f"pgjournal._run.{p.stem}" for p in FEATURES}
        assert not found & features, f"the engine ({part}.py) imports features: {found}"


def test_run_uses_the_engine_through_its_interface_and_lifecycle() -> None:
    interface, lifecycle = engine_interface()
    tree = ast.parse((PKG / "run.py").read_text())
    bad = [(line, attr) for line, attr in engine_uses(tree, {"_engine"})
           if attr not in interface | lifecycle]
    assert not bad, f"run.py takes of the engine what its interface lacks: {bad}"
