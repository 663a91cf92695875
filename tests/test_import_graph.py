"""No module of listenloop imports a module that imports it back, directly or through others.

The graph is read from the source with `ast`, without importing anything: one node per module
of the installed package (python/listenloop/, and the folders pyproject.toml maps into it:
export/ as listenloop.export, runtime/ as listenloop.runtime), one edge per import of another
of those modules. Imports inside functions count too: deferring an import hides a circle
until the call, it does not remove it. Imports under `if TYPE_CHECKING:` do not count.
"""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "listenloop"


def package_folders(root: Path = ROOT) -> dict[str, Path]:
    """Dotted package name -> source folder, as the wheel lays them out (pyproject.toml)."""
    config = tomllib.loads((root / "pyproject.toml").read_text())
    mapping = config["tool"]["scikit-build"]["wheel"]["packages"]
    return {name.replace("/", "."): root / folder for name, folder in mapping.items()}


def module_files(folders: dict[str, Path]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the package folders."""
    modules = {}
    for package, folder in folders.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`)."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and (getattr(node.test, "id", None) == "TYPE_CHECKING"
                                         or getattr(node.test, "attr", None) == "TYPE_CHECKING"):
            for child in node.body:
                skipped |= {id(n) for n in ast.walk(child) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return skipped


def _known(name: str, modules) -> str | None:
    """`name` if it is one of `modules`, else its longest prefix that is (a name imported from it)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules) -> set[str]:
    """The modules of `modules` that `module` (source at `path`) imports, anywhere in the file."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = _type_checking_only(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {_known(alias.name, modules) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                found.add(_known(f"{base}.{alias.name}", modules) or _known(base, modules))
    found.discard(None)
    found.discard(module)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = module_files(package_folders(root))
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as one circle
    through its modules (a -> b -> ... -> a), sorted."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(node):  # recursion depth is bounded by the number of modules (~100)
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
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
            visit(node)
    return sorted((_circle_through(c, graph) for c in components), key=lambda c: c[0])


def _circle_through(component: set[str], graph) -> list[str]:
    """One circle from the first module of `component` back to itself (breadth-first)."""
    start = min(component)
    previous = {start: None}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for other in sorted(graph[node] & component):
            if other == start:
                path = [node]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return list(reversed(path)) + [start]
            if other not in previous:
                previous[other] = node
                queue.append(other)
    raise AssertionError(f"{sorted(component)} is not a circle")


def _spell(circle: list[str]) -> str:
    return " -> ".join(circle)


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert "listenloop.cli" in graph and "listenloop.session" in graph and "listenloop.export.package" in graph
    assert "listenloop.errors" in graph["listenloop.cli"]
    assert "listenloop.profiles" in graph["listenloop.model"]  # an import inside a function counts


def test_circles_are_found():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    found = circles(import_graph())
    assert not found, "modules that import each other back:\n" + "\n".join(map(_spell, found))


def test_server_has_no_import_circle():
    """The server's shared state and checks live in server/state.py: app.py wires the routes,
    and no other module of the server imports it back."""
    graph = import_graph()
    server = {name for name in graph if name.startswith("listenloop.server.")}
    assert not [c for c in circles(graph) if server & set(c)]
    assert {"listenloop.server.app", "listenloop.server.state", "listenloop.server.pcm"} <= server
    assert [name for name in sorted(server) if "listenloop.server.app" in graph[name]] == []
    assert "listenloop.server.state" in graph["listenloop.server.pcm"]
