"""The house rules of ARCHITECTURE.md that code can check: small files, no import circles, no private
name imported from another module, and a public API that is documented."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import leanformers
from tests.helpers import REPO_ROOT

SRC = REPO_ROOT / "src"
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    """leanformers module name -> file."""
    found = {}
    for path in sorted((SRC / "leanformers").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(path: Path, module: str, modules: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(imported leanformers module, imported names, line) of every import in the file, function-local
    imports included. ``from pkg import sub`` counts as an import of the module ``pkg.sub``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("leanformers")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if not base.startswith("leanformers"):
                continue
            names = [a.name for a in node.names]
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
            out.append((base, [n for n in names if f"{base}.{n}" not in modules], node.lineno))
            out += [(sub, [], node.lineno) for sub in subs]
    return out


def test_no_source_file_is_longer_than_the_limit():
    long = {
        str(p.relative_to(REPO_ROOT)): n
        for p in SRC.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"split these files along a real seam (limit {MAX_LINES} lines): {long}"


def test_no_import_circle():
    modules = _modules()
    graph = {
        m: sorted({t for t, _, _ in _imports(p, m, modules) if t in modules and t != m})
        for m, p in modules.items()
    }
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import circles (function-local imports count): {cycles}"


def test_no_private_name_is_imported_from_another_module():
    modules = _modules()
    bad = []
    files = {m: p for m, p in modules.items()}
    files.update({f"bench.{p.stem}": p for p in (REPO_ROOT / "bench").glob("*.py")})
    for module, path in files.items():
        for target, names, line in _imports(path, module, modules):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != module:
                bad.append(f"{path.relative_to(REPO_ROOT)}:{line} imports {private} from {target}")
    assert not bad, "\n".join(bad)


def test_every_public_name_is_documented_in_the_api_page():
    api = (REPO_ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    missing = [name for name in leanformers.__all__ if not re.search(rf"`{re.escape(name)}[`(]", api)]
    assert not missing, f"docs/api.md does not document {missing}"
