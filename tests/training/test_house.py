"""The house rules (issue 18) for chts/, training/, recipes/ and train.py: files <= 450 lines, no import
circle (function-local and TYPE_CHECKING imports count), no private name imported from another module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
AREA = ("leanformers.chts", "leanformers.training", "leanformers.recipes", "leanformers.train")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {
    _module_name(p): p for p in sorted(SRC.rglob("*.py")) if "metrics" not in p.relative_to(SRC).parts[2:3]
}


def _in_area(name: str) -> bool:
    return any(name == a or name.startswith(a + ".") for a in AREA)


def _imports(name: str) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every leanformers import of module ``name``."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name.startswith("leanformers")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if base.startswith("leanformers"):
                found += [(base, alias.name) for alias in node.names]
    return found


def _edges(name: str) -> set[str]:
    out = set()
    for module, imported in _imports(name):
        if f"{module}.{imported}" in MODULES:  # `from package import submodule`
            out.add(f"{module}.{imported}")
        if module in MODULES:
            out.add(module)
    return out - {name}


def _cycle_through(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in graph.get(node, ()):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


AREA_MODULES = sorted(m for m in MODULES if _in_area(m))
GRAPH = {m: _edges(m) for m in MODULES}


def test_the_area_is_found():
    assert {
        "leanformers.chts.controller",
        "leanformers.training.sharding",
        "leanformers.recipes.schema",
    } <= set(AREA_MODULES)


@pytest.mark.parametrize("name", AREA_MODULES)
def test_at_most_450_lines(name):
    assert len(MODULES[name].read_text(encoding="utf-8").splitlines()) <= 450


@pytest.mark.parametrize("name", AREA_MODULES)
def test_no_import_circle(name):
    cycle = _cycle_through(name, GRAPH)
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("name", AREA_MODULES)
def test_no_private_name_imported_from_another_module(name):
    private = [f"{m}.{n}" for m, n in _imports(name) if n and n.startswith("_") and m != name]
    assert not private, private
