"""No import circle between the bundle's modules (issue 13): ``ast`` over the files, no import.

Every ``import`` counts, wherever it is written: at the top, inside a function, under
``if TYPE_CHECKING:`` or ``if False:`` — a circle hidden from the interpreter is still a circle
for the reader. Importing ``a.b.c`` also runs the packages ``a.b`` and ``a`` above it, so those are
edges too, except for the importer's own packages (which are already running). Folders meet only
along the documented arrows: ``sidecar → caddy → common``, ``cache → common``, ``bench → cache``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("cache", "caddy", "sidecar", "deploy", "bench", "common")

#: Which top-level folders each folder may import (besides itself).
ALLOWED_FOLDER_ARROWS: dict[str, set[str]] = {
    "common": set(),
    "cache": {"common"},
    "caddy": {"common"},
    "sidecar": {"caddy", "common"},
    "deploy": {"common"},
    "bench": {"cache", "common"},
}


def module_files() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return name in modules and modules[name].name == "__init__.py"


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The bundle's modules that ``name`` imports, anywhere in its file."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if _is_package(name, modules) else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets.add(base)
            # `from pkg import sub` imports the module pkg.sub when there is one
            targets.update(
                f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules
            )
    edges: set[str] = set()
    own_packages = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    for target in targets:
        if target.split(".")[0] not in PACKAGES:
            continue
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            candidate = ".".join(parts[:i])
            if candidate in modules and candidate not in own_packages and candidate != name:
                edges.add(candidate)
    return edges


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [frozenset({"a", "b", "c"})]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_imports_are_read_wherever_they_are_written(tmp_path: Path) -> None:
    modules = {"caddy": ROOT / "caddy/__init__.py", "caddy.model": tmp_path / "m.py", "caddy.policy": ROOT}
    (tmp_path / "m.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .policy import Policy\n"
        "def f():\n    import caddy.policy\n"
    )
    assert imports_of("caddy.model", tmp_path / "m.py", modules) == {"caddy.policy"}


def test_no_import_cycle_between_modules() -> None:
    assert [sorted(c) for c in cycles(import_graph())] == []


def test_cache_layers_point_down() -> None:
    """transport knows no routes and no app; routes and their context know nothing above them."""
    upper = {"cache.app", "cache.server", "cache.cli", "cache.launch"}
    for name, targets in import_graph().items():
        if name.startswith("cache.transport"):
            assert not {
                t for t in targets if t.startswith("cache.routes") or t in upper | {"cache.context"}
            }, name
        if name.startswith("cache.routes") or name == "cache.context":
            assert not targets & upper, name


def test_folders_import_along_the_documented_arrows() -> None:
    wrong = sorted(
        (name, target)
        for name, targets in import_graph().items()
        for target in targets
        if target.split(".")[0] != name.split(".")[0]
        and target.split(".")[0] not in ALLOWED_FOLDER_ARROWS[name.split(".")[0]]
    )
    assert wrong == []
