"""The package's import graph: no cycles, and production code never imports its test double."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "rabbitflow"
# The one seam through which production code reaches the in-memory broker: memory:// URLs.
SEAM = ("rabbitflow.app", "rabbitflow.testing.memory")


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the rabbitflow modules it imports (at any depth of the file, TYPE_CHECKING aside)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        tree = ast.parse(path.read_text())
        typing_only = {
            id(node)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for stmt in block.body
            for node in ast.walk(stmt)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    target = ".".join([*base, node.module] if node.module else base)
                else:
                    target = node.module or ""
                if target.startswith("rabbitflow"):
                    found.add(target)
                    found.update(f"{target}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("rabbitflow"))
        graph[name] = found
    modules = set(graph)
    return {name: {t for t in targets if t in modules and t != name} for name, targets in graph.items()}


def test_production_code_reaches_the_test_double_only_through_the_seam() -> None:
    for name, targets in _imports().items():
        if name.startswith("rabbitflow.testing"):
            continue
        for target in targets:
            if target.startswith("rabbitflow.testing"):
                assert (name, target) == SEAM, f"{name} imports {target}"


def test_there_are_no_import_cycles() -> None:
    graph = _imports()
    # The package __init__ files re-export: an edge into one is an edge into what it re-exports.
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if target == "rabbitflow" or (target, node) == (SEAM[1], SEAM[0]):
                continue
            if state.get(target) == 1:
                cycle = [*path[path.index(target) :], target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_no_module_is_over_about_400_lines() -> None:
    long = {
        _module(path): n for path in PACKAGE.rglob("*.py") if (n := len(path.read_text().splitlines())) > 450
    }
    assert not long, long
