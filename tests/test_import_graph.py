"""Layering, read from the source: the pure layers import no Lightning and no upper layer, and no import circle exists.

See docs/architecture.md for the layers. Imports are read with ``ast`` (nothing is executed), so a lazy import inside
a function counts for the layering rule; the circle check looks at the imports that run when a module is imported
(module level, outside ``if TYPE_CHECKING:``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "vlalign"
PURE_LAYERS = ("models", "objectives")
FORBIDDEN = ("vlalign.tasks", "vlalign.cli", "vlalign.training", "lightning", "pytorch_lightning")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(path: Path, import_time_only: bool) -> set[str]:
    """Absolute names of the modules ``path`` imports (``from a import b`` also counts ``a.b`` when it is one)."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()

    def visit(nodes: list[ast.stmt], top: bool) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If) and _is_type_checking(node):
                if not import_time_only:
                    visit(node.body, top)
                visit(node.orelse, top)
            elif not import_time_only or not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                children = [c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt)]
                if children and (not import_time_only or isinstance(node, (ast.If, ast.Try, ast.With))):
                    visit(children, top)
            elif isinstance(node, ast.ClassDef):
                visit(node.body, top)  # class bodies run at import time

    visit(tree.body, top=True)
    return names


SOURCES = sorted(PACKAGE.rglob("*.py"))
MODULES = {module_name(path): path for path in SOURCES}


@pytest.mark.parametrize("path", [p for p in SOURCES if p.relative_to(PACKAGE).parts[0] in PURE_LAYERS], ids=str)
def test_pure_layers_import_no_lightning_and_no_upper_layer(path: Path) -> None:
    bad = sorted(n for n in imports(path, import_time_only=False) if n.startswith(FORBIDDEN))
    assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"


def test_the_module_import_graph_has_no_circle() -> None:
    graph = {
        name: {m for m in imports(path, import_time_only=True) if m in MODULES and m != name}
        for name, path in MODULES.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_the_checker_finds_a_planted_circle(tmp_path: Path) -> None:
    """The reader sees module-level imports and skips TYPE_CHECKING blocks and function bodies."""
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\nimport vlalign.a\nif TYPE_CHECKING:\n    import vlalign.b\n"
        "def f():\n    import vlalign.c\n"
    )
    assert {"vlalign.a"} <= imports(source, import_time_only=True)
    assert not {"vlalign.b", "vlalign.c"} & imports(source, import_time_only=True)
    assert {"vlalign.a", "vlalign.b", "vlalign.c"} <= imports(source, import_time_only=False)
