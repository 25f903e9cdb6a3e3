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


def test_ml_packages_have_no_import_cycle() -> None:
    """Between packages too: `ml.data` (sources, store, fetch) depends on nothing above it, and
    publishing, which validates, lives in `ml.quality`."""
    packages: dict[str, set[str]] = {}
    for module, imports in import_graph().items():
        package = ".".join(module.split(".")[:2])
        targets = {".".join(i.split(".")[:2]) for i in imports} - {package}
        packages.setdefault(package, set()).update(targets)
    assert "ml.quality" in packages["ml.steps"]
    assert find_cycle(packages) is None, " -> ".join(find_cycle(packages) or [])


def test_importing_ml_modules_stays_light() -> None:
    """No module of `ml` imports TensorFlow, MLflow, GX or pandas at import time (the DAG file
    and the CLI import them in well under a second), except the MLflow pyfunc wrapper and the
    registered model's code (`ml.registry.model_code`, which MLflow runs to load a model)."""
    skip = ("ml.registry.pyfunc", "ml.registry.model_code", "ml.__main__")
    names = sorted(n for n in import_graph() if n not in skip)
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


def test_the_step_modules_warm_up_leaves_a_data_phase_nothing_to_import(tmp_path) -> None:
    """`ml.steps.common.import_step_modules` (a preloading executor worker's warm-up) imports what
    the steps import inside their functions: after it, a real ingest and validate of a synthetic
    ticker (GX suite, Parquet store) import no module of `ml`, pandas or pyarrow in the process
    that runs them, as a task forked from that worker would not."""
    import json
    import os

    code = (
        "import json, sys\n"
        "from datetime import date\n"
        "from ml.steps.common import import_step_modules\n"
        "names = import_step_modules()\n"
        "before = set(sys.modules)\n"
        "from ml.config import get_settings\n"
        "from ml.steps.data import ingest_all, validate_all\n"
        "s = get_settings()\n"
        "staged = ingest_all(['SPY'], date(2024, 6, 28), s)['staged']\n"
        "done = validate_all(list(staged), date(2024, 6, 28), s, check_registry=False)\n"
        "new = sorted(m for m in set(sys.modules) - before\n"
        "             if m.split('.')[0] in ('ml', 'pandas', 'pyarrow'))\n"
        "print(json.dumps({'names': names, 'new': new, 'published': list(done['tickers'])}))\n"
    )
    env = {**os.environ, "DATA_DIR": str(tmp_path), "PRICE_SOURCE": "synthetic"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["published"] == ["SPY"]
    assert {"ml.model.training", "ml.quality.validation", "pyarrow.dataset"} <= set(result["names"])
    assert result["new"] == [], result["new"]


def test_a_file_is_parsed_once_per_version(tmp_path) -> None:
    """`ml.codebase.file_imports` keeps each file's imports by (path, mtime, size): a train task
    computes its model's serving code from the parses its executor worker made at warm-up; an
    edited file is parsed again, even at the same size."""
    import os

    from ml.codebase import file_imports

    path = tmp_path / "m.py"
    path.write_text("import ml.alpha\n")
    first = file_imports(path)
    assert first == {"ml.alpha"} and file_imports(path) is first  # the second call reads nothing
    mtime = path.stat().st_mtime_ns
    path.write_text("import ml.gamma\n")  # same size
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))
    assert file_imports(path) == {"ml.gamma"}
    path.write_text("def f():\n    from ml.beta import x\n")
    assert file_imports(path) == {"ml.beta"}


def test_after_the_warm_up_a_models_serving_code_parses_nothing(monkeypatch, tmp_path) -> None:
    """What a train task forked from a warmed worker does for `serving_code`: no file parsed."""
    import ast

    from ml.codebase import closure
    from ml.steps.common import import_step_modules

    import_step_modules()
    expected = closure("ml.registry.pyfunc")

    def no_parse(*args, **kwargs):
        raise AssertionError("parsed a file again")

    monkeypatch.setattr(ast, "parse", no_parse)
    assert closure("ml.registry.pyfunc") == expected
    assert any(p.name == "pyfunc.py" for p in expected)
