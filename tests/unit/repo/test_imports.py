"""No import circles in authz_server/.

The graph has one node per module (a package is its `__init__.py`) and one edge per
`import authz_server...` or `from authz_server... import ...`, read with `ast`, never by
importing. What counts as an edge:
- every module-level import, including those under `if TYPE_CHECKING:`. With
  `from __future__ import annotations` such an import never runs, but the two modules
  still need each other to be read and type-checked, so it is a circle all the same;
- imports inside functions too (lazy imports). A lazy import is the usual way to hide a
  circle, so each one that closes a circle must be listed in `LAZY_ALLOWED` with the reason,
  and a listed edge that no longer exists fails the test, so the list only shrinks.
Parent packages that Python imports implicitly (`authz_server.store` before
`authz_server.store.sqlite`) are not edges: that would make every package that imports its
own submodules a circle.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

import authz_server

ROOT = Path(authz_server.__file__).parent
PACKAGE = "authz_server"

# (importer, imported): a lazy import that closes a circle, and why it is still there.
LAZY_ALLOWED: dict[tuple[str, str], str] = {
    ("authz_server.errors", "authz_server.crypto.keys"): (
        "errors.redact needs the key shape from crypto/keys.py, which raises errors.Denied; "
        "goes when the key-shape rule has a home that imports neither (issue 12)"
    ),
}


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    line: int
    kind: str  # "module", "type-checking" or "lazy"

    def __str__(self) -> str:
        where = self.importer.replace(".", "/") + ".py"
        return f"{self.importer} -> {self.imported}  ({where}:{self.line}, {self.kind})"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _edges(name: str, path: Path, modules: dict[str, Path]) -> list[Edge]:
    is_package = path.name == "__init__.py"
    edges: list[Edge] = []

    def target(module: str, names: list[str]) -> list[str]:
        # `from authz_server.envoy import servicer` imports the submodule; `from x import f` imports x.
        found = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules]
        if len(found) < len(names) and module in modules:
            found.append(module)
        return found

    def visit(node: ast.AST, kind: str) -> None:
        for child in ast.iter_child_nodes(node):
            child_kind = kind
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                child_kind = "lazy"
            elif isinstance(child, ast.If) and kind == "module" and _is_type_checking(child.test):
                for grandchild in child.body:
                    visit(ast.Module(body=[grandchild], type_ignores=[]), "type-checking")
                for grandchild in child.orelse:
                    visit(ast.Module(body=[grandchild], type_ignores=[]), kind)
                continue
            if isinstance(child, ast.Import):
                imported = [a.name for a in child.names if a.name in modules]
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - child.level + 1]
                    module = ".".join([*base, child.module] if child.module else base)
                else:
                    module = child.module or ""
                imported = target(module, [a.name for a in child.names])
            else:
                imported = []
            edges.extend(Edge(name, i, child.lineno, child_kind) for i in imported if i != name)
            visit(child, child_kind)

    visit(ast.parse(path.read_text(), str(path)), "module")
    return edges


def import_graph() -> dict[str, list[Edge]]:
    modules = _modules()
    return {name: _edges(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, list[Edge]]) -> list[list[Edge]]:
    """One cycle per strongly connected component of more than one module (Tarjan), as its edges."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for edge in graph[node]:
            if edge.imported not in index:
                connect(edge.imported)
                low[node] = min(low[node], low[edge.imported])
            elif edge.imported in on_stack:
                low[node] = min(low[node], index[edge.imported])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: dict[str, list[Edge]], component: set[str]) -> list[Edge]:
    """A shortest way round from the component's first module back to itself (breadth-first)."""
    start = min(component)
    came_by: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for edge in graph[node]:
                if edge.imported not in component:
                    continue
                if edge.imported == start:
                    path = [edge]
                    while path[0].importer != start:
                        path.insert(0, came_by[path[0].importer])
                    return path
                if edge.imported not in came_by:
                    came_by[edge.imported] = edge
                    following.append(edge.imported)
        frontier = following
    raise AssertionError(f"no cycle in {component}")


def _without_allowed(graph: dict[str, list[Edge]]) -> dict[str, list[Edge]]:
    return {
        name: [e for e in edges if not (e.kind == "lazy" and (e.importer, e.imported) in LAZY_ALLOWED)]
        for name, edges in graph.items()
    }


def test_the_graph_sees_every_kind_of_import() -> None:
    """The reader finds what it must, or the real test proves nothing."""
    graph = import_graph()
    assert len(graph) > 40 and "authz_server.app" in graph and "authz_server.store" in graph
    edges = {(e.importer, e.imported): e.kind for es in graph.values() for e in es}
    assert edges[("authz_server.app", "authz_server.pipeline.pipeline")] == "module"
    assert edges[("authz_server.app", "authz_server.envoy.servicer")] == "module"  # `from pkg import module`
    assert edges[("authz_server.cli", "authz_server.app")] == "lazy"
    assert "type-checking" in edges.values()


def test_no_import_circles() -> None:
    cycles = find_cycles(_without_allowed(import_graph()))
    if cycles:
        report = "\n\n".join("\n".join(str(edge) for edge in cycle) for cycle in cycles)
        pytest.fail(f"import circles in authz_server/:\n{report}", pytrace=False)


def test_every_allowed_lazy_import_still_exists_and_still_closes_a_circle() -> None:
    graph = import_graph()
    edges = {(e.importer, e.imported): e for es in graph.values() for e in es}
    for pair, reason in LAZY_ALLOWED.items():
        assert pair in edges and edges[pair].kind == "lazy", f"{pair} is gone: remove it from LAZY_ALLOWED ({reason})"
        without = _without_allowed(graph)
        without[pair[0]] = [*without[pair[0]], edges[pair]]
        assert find_cycles(without), f"{pair} closes no circle any more: remove it from LAZY_ALLOWED"


def test_a_circle_is_found_and_printed_with_where_it_comes_from() -> None:
    graph = {
        "a": [Edge("a", "b", 3, "module")],
        "b": [Edge("b", "c", 5, "type-checking")],
        "c": [Edge("c", "a", 9, "lazy"), Edge("c", "d", 1, "module")],
        "d": [],
    }
    (cycle,) = find_cycles(graph)
    assert [str(e) for e in cycle] == [
        "a -> b  (a.py:3, module)",
        "b -> c  (b.py:5, type-checking)",
        "c -> a  (c.py:9, lazy)",
    ]
