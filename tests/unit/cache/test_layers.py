"""The cache's layers, checked from the source: no import circle, and arrows only downwards.

transport (messages, codecs, servers) ← app → routes → context → store/nar/narinfo/compression;
server wires app into the transport. Imports under `if TYPE_CHECKING:` count too: a circle
hidden from the interpreter is still a circle for the reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3] / "cache"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            found.update(t for t in targets if t in modules and t != name)
        graph[name] = found
    return graph


def test_no_import_circle() -> None:
    graph = imports()
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            raise AssertionError("import circle: " + " -> ".join([*stack[stack.index(node) :], node]))
        if node in done:
            return
        for nxt in sorted(graph[node]):
            # a package's __init__ importing its own submodules is no circle
            if not nxt.startswith(node + "."):
                visit(nxt, [*stack, node])
        done.add(node)

    for name in sorted(graph):
        visit(name, [])


def test_arrows_point_down() -> None:
    graph = imports()
    upper = {"cache.app", "cache.server", "cache.cli", "cache.launch"}
    for name, targets in graph.items():
        if name.startswith("cache.transport"):
            assert not {
                t for t in targets if t.startswith("cache.routes") or t in upper | {"cache.context"}
            }, name
        if name.startswith("cache.routes") or name == "cache.context":
            assert not targets & upper, name
