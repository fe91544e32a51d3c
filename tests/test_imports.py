"""The package's import graph: no cycles, and every import points down the layers."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "rabbitflow"
# Layers, lowest first: a module imports only modules of its own layer or below. The first
# prefix that matches a module names its layer.
LAYERS: tuple[tuple[str, ...], ...] = (
    # the vocabulary: errors, names, settings, specs, the transport interface
    (
        "rabbitflow.errors",
        "rabbitflow.names",
        "rabbitflow.urls",
        "rabbitflow.logs",
        "rabbitflow.message",
        "rabbitflow.codec",
        "rabbitflow.retry",
        "rabbitflow.breaker",
        "rabbitflow.settings",
        "rabbitflow.spec",
        "rabbitflow.depends",
        "rabbitflow.transport.base",
    ),
    # the transports, the topology (pure planning, and applying a plan on a channel) and the
    # registry of an app's consumers that compiles it
    ("rabbitflow.transport", "rabbitflow.topology", "rabbitflow.registry", "rabbitflow.sql"),
    # running a service, and the operators' walks over parking queues
    ("rabbitflow.middleware.base", "rabbitflow.runtime", "rabbitflow.parking"),
    # what users hold: the app, its admin, the middlewares and the HTTP endpoints
    (
        "rabbitflow.app",
        "rabbitflow.admin",
        "rabbitflow.asyncapi",
        "rabbitflow.http",
        "rabbitflow.console",
        "rabbitflow.middleware",
        "rabbitflow.prometheus",
        "rabbitflow.opentelemetry",
    ),
    # tools around an app
    ("rabbitflow.testing", "rabbitflow.cli", "rabbitflow.__main__"),
)


def _layer(module: str) -> int:
    for level, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return level
    raise AssertionError(f"{module} is in no layer of tests/test_imports.py: add it")


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


def test_imports_point_down_the_layers() -> None:
    upward = [
        f"{name} imports {target}"
        for name, targets in _imports().items()
        if name != "rabbitflow"
        for target in targets
        if target != "rabbitflow" and _layer(target) > _layer(name)
    ]
    assert not upward, upward


def test_the_two_transports_know_nothing_of_each_other() -> None:
    for name, targets in _imports().items():
        for one, other in (("amqp", "memory"), ("memory", "amqp")):
            if name.startswith(f"rabbitflow.transport.{one}"):
                assert not [t for t in targets if t.startswith(f"rabbitflow.transport.{other}")], name


def test_there_are_no_import_cycles() -> None:
    graph = _imports()
    # The package __init__ files re-export: an edge into one is an edge into what it re-exports.
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if target == "rabbitflow":
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
