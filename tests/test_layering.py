"""Layering rules of issue 15, read from the source: the core never imports a built-in plugin
(it reaches them through the registry), and no two modules import each other, directly or in a
ring — counting every import, lazy and ``TYPE_CHECKING`` ones included, because a lazy import
that closes a ring is the same tangle, only deferred. Imports of the top-level package
``rwkvkit`` (its lazy facade, ``rwkvkit/__init__.py``) do not count."""

from __future__ import annotations

import ast
from pathlib import Path

import rwkvkit
import rwkvkit.plugins

PACKAGES = {"rwkvkit": Path(rwkvkit.__file__).parent, "rwkvkit.plugins": Path(rwkvkit.plugins.__file__).parent}


def _modules() -> dict[str, Path]:
    mods = {}
    for package, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            if package == "rwkvkit" and path.is_relative_to(PACKAGES["rwkvkit.plugins"]):
                continue
            parts = path.relative_to(root).with_suffix("").parts
            mods[".".join((package, *parts)).removesuffix(".__init__")] = path
    return mods


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = {d for d in deps if d in mods and d not in (name, "rwkvkit")}
    return graph


def test_core_imports_no_plugin():
    offenders = {m: sorted(d for d in deps if d.startswith("rwkvkit.plugins")) for m, deps in _graph().items() if not m.startswith("rwkvkit.plugins")}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_no_import_cycles():
    graph = _graph()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:  # depth-first; a module on the current path closes a ring
        for dep in sorted(graph[module]):
            assert dep not in path, f"import cycle: {' -> '.join(path[path.index(dep) :] + [dep])}"
            if dep not in done:
                visit(dep, path + [dep])
        done.add(module)

    for module in sorted(graph):
        visit(module, [module])


def test_the_scan_finds_known_edges():
    """Guards against a scan that finds no edges (and so no cycles)."""
    graph = _graph()
    assert graph["rwkvkit.model"] >= {"rwkvkit.backend", "rwkvkit.state"}
    assert "rwkvkit.architecture" in graph["rwkvkit.model"]
