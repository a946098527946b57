"""The package's layers, read from its source: no import circle (imports made only for
type checking, or inside functions, included), and the runtime never reaching into the
operator tools."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "llamaserve"
RUNTIME = ("llamaserve.engine", "llamaserve.gateway", "llamaserve.http", "llamaserve.store")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module of the package that `path` imports, wherever the import is."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {
        name: {target for target in imports(path) if target in modules and target != name}
        for name, path in modules.items()
    }


def test_the_graph_is_read() -> None:
    edges = graph()
    assert "llamaserve.gateway.exchange" in edges
    assert "llamaserve.http.answer" in edges["llamaserve.gateway.exchange"]


def test_no_import_circle() -> None:
    edges = graph()
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                circles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    # A package's __init__ importing its own modules is no circle of ours: none does.
    assert circles == []


@pytest.mark.parametrize("layer", RUNTIME)
def test_the_runtime_imports_no_operator_tool(layer: str) -> None:
    edges = graph()
    reaching = {
        (module, target)
        for module, targets in edges.items()
        if module == layer or module.startswith(layer + ".")
        for target in targets
        if target.startswith("llamaserve.ops")
    }
    assert reaching == set()


def test_one_http_client() -> None:
    """The gateway and the llama-server front share one client (http/upstream.py)."""
    for path in PACKAGE.rglob("*.py"):
        clients = {"aiohttp", "httpx", "requests", "urllib.request", "http.client"}
        assert not imports(path) & clients, path
