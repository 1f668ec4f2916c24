"""The import graph of the ``phis`` package has no cycle, counting imports inside functions too.

A cycle hidden behind a function-level import still ties two modules into one unit: neither can be
read, tested or moved without the other. The graph is built from the source (``ast``), so the check
needs no heavy imports and names the cycle it finds.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "phis"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module → the ``phis`` modules it imports anywhere in its source (``from a import b`` counts as
    an import of ``a.b`` when that is a module, else of ``a``)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    targets.add(sub if sub in modules else node.module)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_graph_sees_function_level_imports() -> None:
    graph = import_graph()
    assert "phis.build" in graph["phis.train"]
    assert "phis.shards" in graph["phis.data"]  # imported inside functions only
    assert "phis.teachers" in graph["phis.teachers.hf"]


def test_phis_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_teachers_stay_below_the_data_and_training_floors() -> None:
    """Teachers are built by the data module and the module; they read images through ``phis.photos``
    and never import the floors above them."""
    graph = import_graph()
    above = {"phis.data", "phis.module", "phis.build", "phis.train", "phis.eval", "phis.shards"}
    teachers = {m: graph[m] & above for m in graph if m.startswith("phis.teachers")}
    assert teachers and not any(teachers.values()), {m: sorted(v) for m, v in teachers.items() if v}


@pytest.mark.parametrize("module", ["phis.train", "phis.eval", "phis.build"])
def test_entry_modules_import_first_in_a_fresh_interpreter(module) -> None:
    """No module depends on another being imported before it."""
    proc = subprocess.run(
        [sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
