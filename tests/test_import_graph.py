"""The package's import graph points one way (issue 21): no cycle among its modules, nor among its
subpackages, and no import up the layers of docs/architecture.md, counting every import a module
can run (function-level ones too; only imports under `if TYPE_CHECKING:` are left out, they never run).

The graph is read statically with `ast` from the source folders pyproject maps into the package
(`routing/` is `moe_infer.routing`, ...), so nothing is imported to build it. Besides `import` and
`from ... import` statements it follows `moe_infer.<name>` used after a bare `import moe_infer`
(the package's lazy attributes, `moe_infer.wrap` -> `moe_infer.api`): that is an import too.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "moe_infer"


def package_dirs() -> dict[str, Path]:
    """Package name -> its source folder, from pyproject's `[tool.setuptools] package-dir`."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {name: ROOT / folder for name, folder in config["tool"]["setuptools"]["package-dir"].items()}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package and its mapped subpackages."""
    dirs = package_dirs()
    found = {}
    for name, folder in dirs.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if "__pycache__" in parts:
                continue
            dotted = ".".join((name, *parts)).removesuffix(".__init__")
            # a folder inside moe_infer/ that pyproject maps elsewhere is not part of the package
            if not any(dotted.startswith(other + ".") or dotted == other for other in dirs
                       if other != name and other.startswith(name + ".") and dirs[other] != folder):
                found[dotted] = path
    return found


def lazy_names() -> dict[str, str]:
    """`moe_infer.<name>` -> the module defining it, from the package's `_NAMES` table."""
    tree = ast.parse((package_dirs()[PACKAGE] / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_NAMES" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING"


def imports(name: str, path: Path, known: dict[str, Path], lazy: dict[str, str]) -> list[tuple[str, int]]:
    """(imported module, line) of every import `name` can run."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    bare_package = False

    def target(module: str, attribute: str | None) -> str | None:
        if module == PACKAGE and attribute in lazy:
            return lazy[attribute]  # a public name of the package (`moe_infer.executor` is api's function)
        if attribute is not None and f"{module}.{attribute}" in known:
            return f"{module}.{attribute}"  # a submodule
        return module if module in known else None

    def visit(node: ast.AST) -> None:
        nonlocal bare_package
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for statement in child.orelse:
                    visit(statement)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name == PACKAGE and alias.asname is None:
                        bare_package = True
                    elif alias.name in known:
                        found.append((alias.name, child.lineno))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[:len(base) - (child.level - 1)]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module or ""
                for alias in child.names:
                    hit = target(module, alias.name)
                    if hit is not None:
                        found.append((hit, child.lineno))
            visit(child)

    visit(tree)
    if bare_package:  # `import moe_infer` ... `moe_infer.wrap(...)`
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == PACKAGE:
                hit = target(PACKAGE, node.attr)
                if hit is not None and hit != PACKAGE:
                    found.append((hit, node.lineno))
    return [(module, line) for module, line in found if module != name]


def graph() -> dict[str, dict[str, str]]:
    """module -> {imported module: 'file:line' of the first such import}."""
    known = modules()
    lazy = lazy_names()
    edges: dict[str, dict[str, str]] = {name: {} for name in known}
    for name, path in known.items():
        for module, line in imports(name, path, known, lazy):
            edges[name].setdefault(module, f"{path.relative_to(ROOT)}:{line}")
    return edges


def cycles(edges: dict[str, dict[str, str]]) -> list[list[str]]:
    """One cycle (a list of nodes, the first repeated at the end) per strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def connect(start: str) -> None:  # Tarjan's algorithm, iteratively
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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

    for node in sorted(edges):
        if node not in index:
            connect(node)
    found = []
    for component in components:
        covered: set[str] = set()
        for start in sorted(component):
            if start in covered:
                continue
            cycle = _shortest_cycle(start, component, edges)
            covered.update(cycle)
            found.append(cycle)
    return found


def _shortest_cycle(start: str, component: set[str], edges: dict[str, dict[str, str]]) -> list[str]:
    """The shortest cycle through `start` within its strongly connected component (breadth first)."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(edges.get(node, ())):
                if child == start:
                    return paths[node] + [start]
                if child in component and child not in paths:
                    paths[child] = paths[node] + [child]
                    following.append(child)
        frontier = following
    raise AssertionError(f"{start} is on no cycle of its component")


def describe(cycle: list[str], edges: dict[str, dict[str, str]]) -> str:
    return "\n".join(f"  {a} -> {b}  ({edges[a][b]})" for a, b in zip(cycle, cycle[1:]))


# Modules that sit in a subpackage for their concern but above the core by layer: they run a whole
# wrapped model. Each is its own node in the subpackage graph (nothing below them may import them,
# which the module graph checks).
ABOVE_THE_CORE = {
    "moe_infer.traces.profiler": "records a trace by running a wrapped model (moe_infer.wrap)",
}


def subpackage_of(name: str, subpackages: list[str]) -> str:
    """The subpackage a module belongs to (the package's own flat modules, and `ABOVE_THE_CORE`,
    stand for themselves)."""
    if name in ABOVE_THE_CORE:
        return name
    for package in subpackages:
        if name == package or name.startswith(package + "."):
            return package
    return name


def package_graph(edges: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    known = set(edges)
    subpackages = sorted(name for name in known if name.startswith(PACKAGE + ".")
                         and modules()[name].name == "__init__.py")
    collapsed: dict[str, dict[str, str]] = {}
    for a, targets in edges.items():
        for b, where in targets.items():
            pa, pb = subpackage_of(a, subpackages), subpackage_of(b, subpackages)
            if pa != pb:
                collapsed.setdefault(pa, {}).setdefault(pb, f"{a} -> {b} at {where}")
    return collapsed


def test_the_graph_sees_the_package():
    edges = graph()
    # every mapped folder is read, and imports of every kind are found
    for name in ("moe_infer.api", "moe_infer.routing.adapters", "moe_infer.experts.store", "moe_infer.cache.tiered",
                 "moe_infer.predictors.base", "moe_infer.kernels.fused_moe", "moe_infer.traces.trace"):
        assert name in edges, name
    assert "moe_infer.executor" in edges["moe_infer.api"]  # top level
    assert "moe_infer.errors" in edges["moe_infer.kernels.fused_moe"]  # `from moe_infer import errors`
    assert "moe_infer.experts.math" in edges["moe_infer.experts.store"]  # relative


def test_cycles_are_found_with_their_lines():
    edges = {"a": {"b": "a.py:1"}, "b": {"c": "b.py:2"}, "c": {"a": "c.py:3", "d": "c.py:4"}, "d": {}}
    assert cycles(edges) == [["a", "b", "c", "a"]]
    assert "b -> c  (b.py:2)" in describe(cycles(edges)[0], edges)
    assert cycles({"a": {"b": ""}, "b": {}}) == []


def test_no_import_cycle_between_modules():
    edges = graph()
    found = cycles(edges)
    assert not found, "import cycles (move the shared piece down instead of importing inside a function):\n" + \
        "\n".join(describe(cycle, edges) for cycle in found)


def test_no_import_cycle_between_subpackages():
    """Each subpackage as one node (the flat modules of moe_infer/ as their own): `cache/` may use
    `moe_infer.traces`, and the executor `cache/`, but `cache/` never the executor."""
    collapsed = package_graph(graph())
    found = cycles(collapsed)
    assert not found, "cycles between subpackages:\n" + "\n".join(describe(cycle, collapsed) for cycle in found)


# The layers of docs/architecture.md, bottom first: a module imports only from its layer or below.
# Most specific prefix wins; the old-path re-export shims (`moe_infer.trace`, ...) belong to no layer.
LAYERS = {
    0: ("errors", "envs", "files", "helpformat", "hub", "wrapped"),
    1: ("routing", "experts", "kernels", "traces", "families", "models", "assets"),
    2: ("cache", "predictors", "distributed", "config", "runners", "layer"),
    3: ("executor", "loading", "api"),
    4: ("serving", "traces.profiler", "benchmarks", "cli", "demo", "__main__"),
}
SHIMS = ("trace", "profiler", "trace_stats", "corpus", "parallel", "parallel_cost", "placement", "batching")


def layer_of(name: str) -> int | None:
    short = name.removeprefix(PACKAGE + ".")
    best = None
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            if (short == prefix or short.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (layer, prefix)
    return None if best is None else best[0]


def test_imports_point_down_the_layers():
    edges = graph()
    unplaced = [name for name in edges if name != PACKAGE and layer_of(name) is None
                and name.removeprefix(PACKAGE + ".") not in SHIMS]
    assert not unplaced, f"modules in no layer of LAYERS (docs/architecture.md): {unplaced}"
    upward = [f"  {a} (layer {layer_of(a)}) -> {b} (layer {layer_of(b)})  ({where})"
              for a, targets in edges.items() if layer_of(a) is not None
              for b, where in targets.items() if layer_of(b) is not None and layer_of(b) > layer_of(a)]
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


@pytest.mark.parametrize("name", sorted(modules()))
def test_every_module_says_what_it_owns(name):
    tree = ast.parse(modules()[name].read_text())
    assert ast.get_docstring(tree), f"{modules()[name].relative_to(ROOT)} opens with no docstring"
