"""The size limits the layout keeps: no module outside `tests/` over 500 lines, no function in
`ml/`, `dags/` or `plugins/` over 80 lines (the `@dag` body aside: it is the DAG's wiring)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SKIP = {".venv", ".git", ".state", "tests", "node_modules"}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
WIRING = {("dags/price_forecast.py", "price_forecast")}


def _modules() -> list[Path]:
    return [p for p in REPO.rglob("*.py") if not SKIP.intersection(p.relative_to(REPO).parts)]


def test_the_checker_sees_the_code() -> None:
    names = {str(p.relative_to(REPO)) for p in _modules()}
    assert {"ml/cli.py", "dags/price_forecast.py", "scripts/launcher.py"} <= names


def test_no_module_outside_tests_is_over_500_lines() -> None:
    big = {
        str(p.relative_to(REPO)): n
        for p in _modules()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"


def test_no_function_in_ml_dags_plugins_is_over_80_lines() -> None:
    long = {}
    for path in _modules():
        rel = str(path.relative_to(REPO))
        if rel.split("/")[0] not in ("ml", "dags", "plugins"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and (rel, node.name) not in WIRING:
                    long[f"{rel}:{node.lineno} {node.name}"] = lines
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
