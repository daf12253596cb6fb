"""The package's import graph, parsed from the source (nothing is imported): no cycles, and the
dependency rules of ARCHITECTURE.md — Ray only in run/driver/trainable, MLflow only in tracking.py
and report.py, nothing imports `tunekd.run`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tunekd"

RAY_ALLOWED = {"tunekd.run", "tunekd.driver", "tunekd.trainable"}
MLFLOW_ALLOWED = {"tunekd.tracking", "tunekd.report"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str) -> set[str]:
    """Every module named by an import statement anywhere in the file of module `name` (top level or
    inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            for alias in node.names:  # `from tunekd import cache` names the module tunekd.cache
                out.add(f"{mod}.{alias.name}")
    return out


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for imp in imports_of(path, name):
            # the deepest package module the import names (tunekd.models.base, not tunekd.models.base.Family)
            parts = imp.split(".")
            while parts and ".".join(parts) not in files:
                parts.pop()
            target = ".".join(parts)
            if target and target != name and target != "tunekd":
                targets.add(target)
        edges[name] = targets
    return edges


def external(name: str) -> set[str]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {imp.split(".")[0] for imp in imports_of(files[name], name)}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_find_cycle_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_imports_resolve_relative_and_from_forms(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\nfrom tunekd import cache as c\ndef g():\n    from tunekd.models.base import Family\n"
                 "from . import _text\nfrom ..tasks import base\n")
    assert imports_of(f, "tunekd.models.m") == {
        "os", "tunekd", "tunekd.cache", "tunekd.models.base", "tunekd.models.base.Family",
        "tunekd.models", "tunekd.models._text", "tunekd.tasks", "tunekd.tasks.base"}


def test_the_graph_sees_the_package():
    edges = graph()
    assert "tunekd.trainable" in edges and "tunekd.distill" in edges["tunekd.trainable"]


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


def test_nothing_imports_run():
    importers = sorted(m for m, targets in graph().items() if "tunekd.run" in targets)
    assert importers == [], importers


@pytest.mark.parametrize("library, allowed", [("ray", RAY_ALLOWED), ("mlflow", MLFLOW_ALLOWED)])
def test_library_imported_only_where_allowed(library, allowed):
    users = sorted(m for m in graph() if library in external(m))
    assert set(users) <= allowed, f"{library} imported by {sorted(set(users) - allowed)}"


UPPER = {"tunekd.distill", "tunekd.trainable", "tunekd.driver", "tunekd.run", "tunekd.students", "tunekd.teacher",
         "tunekd.cache", "tunekd.tracking", "tunekd.report", "tunekd.angles"}


def test_lower_layers_do_not_import_upper_ones():
    """mapping and losses are pure (errors only); models/ and tasks/ reach nothing above them."""
    edges = graph()
    for pure in ("tunekd.mapping", "tunekd.losses"):
        assert edges[pure] <= {"tunekd.errors"}, (pure, edges[pure])
    for name, targets in edges.items():
        if name.startswith(("tunekd.models", "tunekd.tasks")):
            assert not targets & UPPER, (name, sorted(targets & UPPER))
