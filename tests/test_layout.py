"""The tree's layout rules (issue 16): no import cycle between the product's modules, and none over about
400 lines unless its docstring says why."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 400


def modules() -> dict[str, Path]:
    """Every product module by its installed name (pgttt.ttt.data), from pyproject's package-dir."""
    package_dir = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    found = {}
    for package, folder in package_dir.items():
        for path in (REPO / folder).glob("*.py"):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def import_graph(found: dict[str, Path]) -> dict[str, set[str]]:
    """Module-level imports between product modules (imports inside functions run late and cannot cycle)."""
    graph: dict[str, set[str]] = {}
    for name, path in found.items():
        package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom):
                if node.level:  # from .x import y: relative to the module's package, one level up per extra dot
                    parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    source = ".".join([*parts, node.module] if node.module else parts)
                else:
                    source = node.module or ""
                for alias in node.names:
                    target = f"{source}.{alias.name}"
                    deps.add(target if target in found else source)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d in found and d != name}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the path that closes it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep] if dep in path else [node, dep]
            if dep not in state and (found := visit(dep, [*path, dep])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_no_import_cycle_between_modules():
    assert cycle(import_graph(modules())) is None


def test_the_cycle_finder_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_no_module_over_400_lines_unless_it_says_why():
    long = []
    for path in modules().values():
        text = path.read_text()
        if len(text.splitlines()) > MAX_LINES and f"{MAX_LINES} lines" not in (
            ast.get_docstring(ast.parse(text)) or ""
        ):
            long.append(f"{path.relative_to(REPO)} ({len(text.splitlines())} lines)")
    assert not long, f"over {MAX_LINES} lines without a docstring saying why: {long}"
