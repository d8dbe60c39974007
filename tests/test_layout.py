"""The code's shape: no import cycle among ``rece_dist`` modules, no module too long to read.

Imports are read from the source (ast), not by importing, so an import inside a function or
under ``TYPE_CHECKING`` counts too: a cycle hidden in a function is still a cycle in the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

import rece_dist

PACKAGE = Path(rece_dist.__file__).parent
MAX_LINES = 600
LONG_REASON = "Why this module is long:"


def module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def import_graph(root: Path, package: str, unresolved: list[str] | None = None) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``from .x import y``: module x.y when y is one, else x).

    ``unresolved`` collects relative imports of modules that do not exist (they fail when run)."""
    files = {module_name(p, root, package): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        here = mod.split(".") if is_pkg else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here[:len(here) - node.level + 1] if node.level else [])
                head = ".".join(x for x in (base, node.module or "") if x)
                subs = [f"{head}.{a.name}" for a in node.names]
                # `from pkg import mod` needs only mod; a name defined in pkg needs pkg itself
                targets = subs + ([head] if any(t not in files for t in subs) else [])
                if node.level and head not in files:  # reported, not followed to an enclosing package
                    if unresolved is not None:
                        unresolved.append(f"{mod}: from {'.' * node.level}{node.module or ''} (line {node.lineno})")
                    targets = []
            for t in targets:
                # the deepest module of the package that the name denotes
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_walker_finds_a_cycle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\nfrom . import c\n")
    (pkg / "c.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import f\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import g\n")
    graph = import_graph(pkg, "toy")
    assert graph["toy.a"] == {"toy.sub.b", "toy.c"} and graph["toy.sub.b"] == {"toy.a"}
    assert find_cycle(graph) == ["toy.a", "toy.sub.b", "toy.a"]
    (pkg / "sub" / "b.py").write_text("def f():\n    from .a import g\n")  # toy.sub.a: no such module
    unresolved: list[str] = []
    assert find_cycle(import_graph(pkg, "toy", unresolved)) is None
    assert unresolved == ["toy.sub.b: from .a (line 2)"]


def test_no_import_cycle_among_rece_dist_modules():
    unresolved: list[str] = []
    graph = import_graph(PACKAGE, "rece_dist", unresolved)
    assert "rece_dist.quantile.lp" in graph and "rece_dist.refit" in graph["rece_dist.donors"]
    assert not unresolved, f"relative imports of modules that do not exist: {unresolved}"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_long_modules_say_why():
    long = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        n = text.count("\n")
        if n > MAX_LINES and LONG_REASON not in (ast.get_docstring(ast.parse(text)) or ""):
            long[str(path.relative_to(PACKAGE))] = n
    assert not long, f"modules over {MAX_LINES} lines without '{LONG_REASON}' in their docstring: {long}"
