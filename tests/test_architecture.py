"""The import graph of distill (callbacks/ and kernels/ included): no cycles, and the layers pyproject declares.

The graph is read from the sources (every import statement, in functions too, except those under
``if TYPE_CHECKING:``), so it sees the checkout's callbacks/ and kernels/ as the distill.callbacks and
distill.kernels they install as. ``[tool.importlinter]`` in pyproject.toml states the layers, in import-linter's
format.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"distill": ROOT / "distill", "distill.callbacks": ROOT / "callbacks", "distill.kernels": ROOT / "kernels"}


def module_files() -> dict[str, Path]:
    modules = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            modules[".".join((package, *parts)).removesuffix(".__init__")] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_names(tree: ast.AST) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            node.body = []  # typing-only imports are not dependencies at run time
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def import_graph() -> dict[str, set[str]]:
    """Each distill module and the distill modules it imports (the root package itself left out)."""
    modules = module_files()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in imported_names(ast.parse(path.read_text())):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported not in ("", "distill", name):
                targets.add(imported)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        edges = packages.setdefault(package_of(module), set())
        edges |= {package_of(target) for target in targets} - {package_of(module)}
    return packages


def declared_layers() -> list[list[str]]:
    """The layers contract of pyproject.toml, top first, each a list of its packages."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [contract for contract in config["contracts"] if contract["type"] == "layers"]
    return [[name.strip() for name in layer.replace(":", "|").split("|")] for layer in contract["layers"]]


def layer_violations(graph: dict[str, set[str]], layers: list[list[str]]) -> list[str]:
    """Imports from a higher layer, and between siblings a ``|`` layer declares independent."""
    rank = {package: depth for depth, layer in enumerate(layers) for package in layer}
    independent = {
        package for layer, raw in zip(layers, declared_raw_layers(), strict=True) if "|" in raw for package in layer
    }
    bad = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            source, destination = package_of(module), package_of(target)
            if source == destination:
                continue
            upward = rank[destination] < rank[source]
            sibling = rank[destination] == rank[source] and source in independent
            if upward or sibling:
                bad.append(f"{module} imports {target}")
    return bad


def declared_raw_layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return next(contract["layers"] for contract in config["contracts"] if contract["type"] == "layers")


def test_no_two_modules_import_each_other() -> None:
    assert cycles(import_graph()) == []


def test_no_two_packages_import_each_other() -> None:
    assert cycles(package_graph(import_graph())) == []


def test_every_package_sits_in_a_declared_layer() -> None:
    declared = {package for layer in declared_layers() for package in layer}
    assert {package_of(module) for module in import_graph()} - {"distill"} <= declared


def test_imports_go_down_the_declared_layers() -> None:
    assert layer_violations(import_graph(), declared_layers()) == []


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"distill.a.x": {"distill.b.y"}, "distill.b.y": {"distill.a.x"}}, [["distill.a.x", "distill.b.y"]]),
        ({"distill.a.x": {"distill.b.y"}, "distill.b.y": {"distill.a.z"}}, []),
        ({"distill.a.x": {"distill.b.y"}, "distill.b.y": set()}, []),
    ],
)
def test_the_cycle_finder_finds_cycles(graph: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert cycles(graph) == expected
    assert cycles(package_graph({"distill.a.x": {"distill.b.y"}, "distill.b.z": {"distill.a.w"}})) == [
        ["distill.a", "distill.b"]
    ]


def test_an_upward_import_is_a_violation() -> None:
    layers = declared_layers()
    top, bottom = layers[1][0], layers[-1][0]
    assert layer_violations({f"{bottom}.m": {f"{top}.n"}}, layers) == [f"{bottom}.m imports {top}.n"]
    assert layer_violations({f"{top}.n": {f"{bottom}.m"}}, layers) == []
