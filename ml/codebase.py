"""The `ml` package's own modules and the `ml` modules each imports, read from the source.

Used to ship with every registered model only the code it needs to load and predict
(`ml.registry.pyfunc.serving_code`), and by tests/test_imports.py to keep the package free of
import cycles. Imports inside functions count (they run sooner or later); imports under
`if TYPE_CHECKING:` do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
ROOT = PACKAGE.parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(tree: ast.AST) -> set[str]:
    """Every `ml.*` module imported at run time anywhere in `tree`."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "ml")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.update([node.module] if node.module.split(".")[0] == "ml" else [])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


# file's (path, mtime, size) -> its runtime_imports. Parsing is most of a closure's cost, and
# every train task paid it: the
# preloading executor's workers fill this once (`ml.steps.common.import_step_modules`) and the
# tasks they fork only stat the files. An edited file has another key, so it is parsed again.
_PARSED: dict[tuple[Path, int, int], frozenset[str]] = {}


def file_imports(path: Path) -> frozenset[str]:
    """`runtime_imports` of the file at `path`, parsed once per version of the file."""
    stat = path.stat()
    key = (path, stat.st_mtime_ns, stat.st_size)
    if key not in _PARSED:
        _PARSED[key] = frozenset(runtime_imports(ast.parse(path.read_text())))
    return _PARSED[key]


def _package_imports(name: str, found: dict[str, Path]) -> set[str]:
    """The package's modules that module `name` imports at run time (itself excluded)."""
    return {t for t in file_imports(found[name]) if t in found and t != name}


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports at run time."""
    found = modules()
    return {name: _package_imports(name, found) for name in found}


def closure(start: str) -> list[Path]:
    """The files `start` needs: it, every module it imports at any depth, and the `__init__.py`
    of each of their packages, sorted. Reads only those files."""
    found = modules()
    needed: set[str] = set()
    stack = [start]
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        stack.extend(_package_imports(name, found))
        parts = name.split(".")
        stack.extend(".".join(parts[:i]) for i in range(1, len(parts)))
    return sorted(found[n] for n in needed)
