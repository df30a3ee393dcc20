"""The package's shape, read from the source with `ast`: layers, what the method may import, no
import cycles, short functions.

Every import counts: top-level ones and the lazy ones inside functions (mamlrun imports slow
packages on first use), `import x` and `from x import y`, relative imports resolved. Imports by a
string at run time (`importlib.import_module(name)`) are not seen.

Layers, lowest first; a module may import its own package and lower layers only:

    mamlrun (its __init__), mamlrun.errors, mamlrun.console
    < mamlrun.maml < mamlrun.data < mamlrun.config < mamlrun.run < mamlrun.analysis < mamlrun.cli
    < mamlrun.__main__

`mamlrun.console` (rich) is for config and above: maml and data report through exceptions and
return values. `mamlrun.maml` (the method) imports only the standard library, torch, learn2learn
(in `l2l_engine.py` alone) and itself, so it can be read, tested and reused without the runner.
"""

from __future__ import annotations

import ast
import functools
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "mamlrun"

# Layer of each top-level part of the package (a subpackage or a module), lowest first.
LAYERS: dict[str, int] = {
    "": 0,  # mamlrun/__init__.py
    "errors": 0,
    "console": 0,
    "maml": 1,
    "data": 2,
    "config": 3,
    "run": 4,
    "analysis": 5,
    "cli": 6,
    "__main__": 7,
}
# Parts that may not import a given lower part anyway.
FORBIDDEN: dict[str, set[str]] = {"maml": {"console"}, "data": {"console"}}
# Bottom modules: `mamlrun.console` may use `mamlrun.errors`, nothing else of mamlrun.
BOTTOM_ALLOWED: dict[str, set[str]] = {"": set(), "errors": set(), "console": {"errors"}}

# What mamlrun/maml/ may import besides the standard library and itself.
MAML_THIRD_PARTY = {"torch"}
MAML_ONLY_IN = {"learn2learn": {"mamlrun.maml.l2l_engine"}}
MAML_INTERNAL = {"mamlrun.maml", "mamlrun.errors"}

MAX_FUNCTION_LINES = 60


@dataclass(frozen=True)
class Import:
    """One import statement's target, as seen in `module` at `line`."""

    module: str  # the importing module, e.g. "mamlrun.run.build"
    target: str  # the imported module, resolved (a mamlrun module when it is one)
    line: int

    def __str__(self) -> str:
        return f"{self.module} (line {self.line}) imports {self.target}"


def module_names(root: Path) -> dict[str, Path]:
    """Every module of the package under `root`: dotted name -> file (a package's __init__.py is
    the package's name)."""
    names = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _resolve(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known) -> list[str]:
    """The modules an import statement imports: for `from x import y`, x.y when that is a known
    module (a submodule), else x; relative imports are resolved against `module`."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    targets = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
    if len(targets) < len(node.names):  # some names are attributes of base itself
        targets.append(base)
    return targets


def _internal(target: str, known) -> str:
    """`target`, or the longest known module it names (`import a.b.c` imports a.b.c's module)."""
    parts = target.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in known:
            return ".".join(parts[:end])
    return target


def imports(root: Path = ROOT) -> list[Import]:
    """Every import of every module of the package, top-level and inside functions."""
    known = module_names(root)
    found = []
    for module, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target in _resolve(node, module, is_package, known):
                    found.append(Import(module, _internal(target, known), node.lineno))
    return found


def _part(module: str) -> str | None:
    """The top-level part of the package a module belongs to ("" for the package itself), None
    for modules outside the package."""
    if module == PACKAGE:
        return ""
    if not module.startswith(PACKAGE + "."):
        return None
    return module.split(".")[1]


def layer_violations(found: Iterable[Import]) -> list[str]:
    """Imports of a higher layer, of a part a layer must not use, or between bottom modules."""
    problems = []
    for edge in found:
        source, target = _part(edge.module), _part(edge.target)
        if target is None or source == target:
            continue
        if source not in LAYERS or target not in LAYERS:
            problems.append(f"{edge}: {source or target!r} has no layer in LAYERS")
        elif source in BOTTOM_ALLOWED and target not in BOTTOM_ALLOWED[source]:
            problems.append(f"{edge}: a bottom module imports no other part of {PACKAGE}")
        elif LAYERS[target] > LAYERS[source]:
            problems.append(f"{edge}: {source} (layer {LAYERS[source]}) imports a higher layer")
        elif target in FORBIDDEN.get(source, ()):
            problems.append(f"{edge}: {source} may not import {target}")
    return problems


def maml_violations(found: Iterable[Import]) -> list[str]:
    """Imports of mamlrun.maml's modules beyond the standard library, torch, learn2learn (in
    l2l_engine.py only), mamlrun.maml and mamlrun.errors."""
    problems = []
    maml = f"{PACKAGE}.maml"
    for edge in found:
        if edge.module != maml and not edge.module.startswith(maml + "."):
            continue
        top = edge.target.split(".")[0]
        if top == PACKAGE:
            if not any(edge.target == p or edge.target.startswith(p + ".") for p in MAML_INTERNAL):
                problems.append(f"{edge}: the method imports only mamlrun.maml / mamlrun.errors")
        elif top in MAML_ONLY_IN:
            allowed = MAML_ONLY_IN[top]
            if edge.module not in allowed:
                problems.append(f"{edge}: {top} is imported in {', '.join(sorted(allowed))} only")
        elif top not in sys.stdlib_module_names and top not in MAML_THIRD_PARTY:
            problems.append(f"{edge}: not the standard library, torch or learn2learn")
    return problems


def import_cycles(found: Iterable[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module in the graph of imports between
    the package's modules (lazy imports included), each sorted; Tarjan's algorithm."""
    graph: dict[str, set[str]] = {}
    for edge in found:
        graph.setdefault(edge.module, set())
        if _part(edge.target) is not None and edge.target != edge.module:
            graph[edge.module].add(edge.target)
            graph.setdefault(edge.target, set())
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = lowlink[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                lowlink[node] = min(lowlink[node], lowlink[successor])
            elif successor in on_stack:
                lowlink[node] = min(lowlink[node], index[successor])
        if lowlink[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def shortest_cycles(component: list[str], found: Iterable[Import]) -> list[str]:
    """For each module of a strongly connected component, the shortest import cycle through it
    (breadth-first within the component), each written once as "a (line n) -> b (line m) -> a"."""
    members = set(component)
    lines: dict[tuple[str, str], int] = {}
    for e in found:
        if e.module in members and e.target in members:
            lines.setdefault((e.module, e.target), e.line)
    successors: dict[str, list[str]] = {m: [] for m in component}
    for source, target in sorted(lines):
        successors[source].append(target)
    cycles = {}
    for start in component:
        parent: dict[str, str] = {}
        queue, seen = [start], {start}
        while queue and start not in parent:
            node = queue.pop(0)
            for successor in successors[node]:
                if successor == start:
                    parent[start] = node
                    break
                if successor not in seen:
                    seen.add(successor)
                    parent[successor] = node
                    queue.append(successor)
        path = [start]
        while len(path) == 1 or path[-1] != start:
            path.append(parent[path[-1]])
        path.reverse()  # start -> ... -> start
        rotation = path[:-1].index(min(path[:-1]))  # one spelling per cycle
        path = path[rotation:-1] + path[:rotation] + [path[rotation]]
        cycles[tuple(path)] = (
            " -> ".join(f"{a} (line {lines[a, b]})" for a, b in zip(path, path[1:], strict=False))
            + f" -> {path[-1]}"
        )
    return sorted(cycles.values(), key=len)


def _functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.AST]]:
    """(qualified name, node) of every function and method, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield prefix + node.name, node
            yield from _functions(node, f"{prefix}{node.name}.<locals>.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


def long_functions(root: Path = ROOT, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Functions longer than `limit` lines, counted from the `def` line to the last line,
    as "path::name (N lines, from line L)"."""
    found = []
    for path in module_names(root).values():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for name, node in _functions(tree):
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                where = path.relative_to(root).as_posix()
                found.append(f"{where}::{name} ({lines} lines, from line {node.lineno})")
    return found


def _report(title: str, problems: list[str]) -> str:
    return f"{title}:\n  " + "\n  ".join(problems)


# --- the checks, on this repository ---------------------------------------------------------


@functools.cache
def _found() -> tuple[Import, ...]:
    return tuple(imports())


def test_the_import_reader_sees_lazy_and_from_imports():
    found = _found()
    assert len(module_names(ROOT)) > 30
    targets = {(e.module, e.target) for e in found}
    # lazy, inside engine_for
    assert ("mamlrun.run.build", "mamlrun.maml.vmap_engine") in targets
    assert ("mamlrun.maml.vmap_engine", "torch.func") in targets  # from x.y import z


def test_layers():
    found = _found()
    problems = layer_violations(found)
    assert not problems, _report("imports against the layer order (module docstring)", problems)


def test_the_method_imports_only_the_standard_library_torch_and_itself():
    found = _found()
    problems = maml_violations(found)
    assert not problems, _report("mamlrun/maml imports beyond its allowed set", problems)


def test_no_import_cycles():
    found = _found()
    cycles = import_cycles(found)
    message = "\n".join(
        _report(f"import cycle among {', '.join(c)}; shortest cycles", shortest_cycles(c, found))
        for c in cycles
    )
    assert not cycles, message


def test_functions_are_at_most_60_lines():
    problems = long_functions()
    assert not problems, _report(f"functions over {MAX_FUNCTION_LINES} lines", problems)


# --- each check can fail: the same helpers on a small package with every fault ---------------

_FAULTY = {
    "__init__.py": "",
    "errors.py": "import sys\n",
    "console.py": "import rich\nfrom mamlrun import errors\n",
    "maml/__init__.py": "",
    "maml/step.py": (
        "import numpy\n"
        "from . import engine\n"
        "def lazy():\n"
        "    from ..run import build  # higher layer, and back again: a cycle\n"
        "    import learn2learn\n"
        "    from mamlrun import console\n"
    ),
    "maml/engine.py": "import torch\nfrom mamlrun.errors import UserError\n",
    "maml/l2l_engine.py": "import learn2learn\n",
    "run/__init__.py": "",
    "run/build.py": "from mamlrun.maml.step import MetaStep\n"
    + "def long():\n"
    + "    x = 1\n" * 60,
}


@pytest.fixture()
def faulty(tmp_path) -> Path:
    for name, text in _FAULTY.items():
        path = tmp_path / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_each_check_fails_on_a_faulty_package(faulty):
    found = imports(faulty)
    assert Import("mamlrun.maml.step", "mamlrun.maml.engine", 2) in found  # `from . import x`
    assert layer_violations(found) == [
        "mamlrun.maml.step (line 4) imports mamlrun.run.build: maml (layer 1) imports a higher "
        "layer",
        "mamlrun.maml.step (line 6) imports mamlrun.console: maml may not import console",
    ]
    assert maml_violations(found) == [
        "mamlrun.maml.step (line 1) imports numpy: not the standard library, torch or learn2learn",
        "mamlrun.maml.step (line 4) imports mamlrun.run.build: the method imports only "
        "mamlrun.maml / mamlrun.errors",
        "mamlrun.maml.step (line 5) imports learn2learn: learn2learn is imported in "
        "mamlrun.maml.l2l_engine only",
        "mamlrun.maml.step (line 6) imports mamlrun.console: the method imports only "
        "mamlrun.maml / mamlrun.errors",
    ]
    assert import_cycles(found) == [["mamlrun.maml.step", "mamlrun.run.build"]]
    assert shortest_cycles(["mamlrun.maml.step", "mamlrun.run.build"], found) == [
        "mamlrun.maml.step (line 4) -> mamlrun.run.build (line 1) -> mamlrun.maml.step"
    ]
    assert long_functions(faulty) == ["mamlrun/run/build.py::long (61 lines, from line 2)"]
    assert long_functions(faulty, limit=61) == []


def test_bottom_modules_import_nothing_above(faulty):
    (faulty / PACKAGE / "errors.py").write_text("from mamlrun import console\n")
    assert layer_violations(imports(faulty))[:1] == [
        "mamlrun.errors (line 1) imports mamlrun.console: a bottom module imports no other part "
        "of mamlrun"
    ]
