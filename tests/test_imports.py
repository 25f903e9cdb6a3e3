"""The `ml` package has no import cycles, counting imports inside functions too.

A cycle hidden in a function body still ties two concepts together (and breaks the moment someone
moves the import to the top); imports under `if TYPE_CHECKING:` are for type checkers only and
do not count. Importing any module of `ml` must also do nothing but define things.
"""

from __future__ import annotations

import subprocess
import sys

from ml.codebase import import_graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_the_checker_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_ml_has_no_import_cycle() -> None:
    graph = import_graph()
    assert "ml.steps.model" in graph and "ml.registry.tracking" in graph["ml.steps.model"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_importing_ml_modules_stays_light() -> None:
    """No module of `ml` imports TensorFlow, MLflow, GX or pandas at import time (the DAG file
    and the CLI import them in well under a second), except the MLflow pyfunc wrapper."""
    names = sorted(n for n in import_graph() if n not in ("ml.registry.pyfunc", "ml.__main__"))
    code = (
        "import sys\n"
        f"for n in {names!r}: __import__(n)\n"
        "heavy = [m for m in ('tensorflow', 'keras', 'mlflow', 'great_expectations', 'pandas')"
        " if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == ""
