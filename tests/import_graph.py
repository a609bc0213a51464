"""Which modules of a kelib package import which siblings (deferred imports included), and the cycles."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path


def sibling_imports(package: str) -> dict[str, set[str]]:
    """``{module: siblings it imports}`` for every module of ``package`` (``from package.x import ...``
    and ``from package import x`` both count), read from the source, so imports inside functions count."""
    folder = Path(importlib.import_module(package).__file__).parent
    graph = {}
    for path in folder.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(f"{package}."):
                found.add(node.module.rsplit(".", 1)[1])
            elif isinstance(node, ast.ImportFrom) and node.module == package:
                found.update(alias.name for alias in node.names)
        graph[path.stem] = found - {path.stem}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[str]:
    """The modules (``__init__`` aside) from which ``graph`` leads back to themselves."""

    def reach(start, seen):
        for nxt in graph.get(start, ()):
            if nxt not in seen:
                seen.add(nxt)
                reach(nxt, seen)
        return seen

    return sorted(m for m in graph if m != "__init__" and m in reach(m, set()))
