"""The project's modules import each other without circles, function-level imports included, and only
the CLI imports the orchestrator."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("rlhf", "reward_models")


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for package in PACKAGES:
        for path in sorted((PROJECT_ROOT / package).glob("*.py")):
            name = f"{package}.{path.stem}"
            deps = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                    deps.add(node.module)
                elif isinstance(node, ast.Import):
                    deps.update(a.name for a in node.names if a.name.split(".")[0] in PACKAGES)
            graph[name] = deps - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep in graph and dep not in state:
                found = visit(dep, path + [dep])
                if found:
                    return found
        state[node] = 2
        return None

    for node in graph:
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def test_no_import_circles():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_the_check_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_only_the_cli_imports_the_orchestrator():
    importers = sorted(m for m, deps in import_graph().items() if "rlhf.pipeline" in deps)
    assert importers == ["rlhf.cli"]


def function_level_project_imports() -> list[str]:
    """`module:line` of every import of the project's own modules inside a function."""
    found = []
    for package in PACKAGES:
        for path in sorted((PROJECT_ROOT / package).glob("*.py")):
            for func in ast.walk(ast.parse(path.read_text())):
                if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for node in ast.walk(func):
                    names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                             else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                    if any(name.split(".")[0] in PACKAGES for name in names):
                        found.append(f"{package}.{path.stem}:{node.lineno}")
    return sorted(set(found))


def test_project_imports_are_at_the_top_of_each_module():
    """A module's structure shows in its first lines. The CLI alone imports lazily, so that `rlhf --help` and a
    mistyped config answer without loading torch."""
    assert [where for where in function_level_project_imports() if not where.startswith("rlhf.cli:")] == []


def test_every_module_imports():
    """An import of a name a module does not define fails here, not in the middle of a stage."""
    for package in PACKAGES:
        for path in sorted((PROJECT_ROOT / package).glob("*.py")):
            importlib.import_module(f"{package}.{path.stem}")
