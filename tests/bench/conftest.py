"""The one way bench smoke tests run a bench script: load it by path, call ``main(["--quick", ...])``.

``run_bench(name, *args)`` runs ``bench/<name>.py`` with ``--quick --output <tmp>`` and returns
``(result, output)``: what ``main`` returned and the path it wrote (a file, or a folder for
scripts that write one JSON per part, e.g. chtss_train).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers import REPO_ROOT

BENCH = REPO_ROOT / "bench"
FOLDER_OUTPUT = {"chtss_train"}  # scripts whose --output is a folder


def load_bench(name: str) -> ModuleType:
    """Import ``bench/<name>.py`` by path (bench/ on sys.path, as when run as a script), once."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    module = sys.modules.get(name)
    if module is not None and Path(getattr(module, "__file__", "")).resolve() == BENCH / f"{name}.py":
        return module
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so that a script importing another (chtss_mask_memory) shares it
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run_bench(tmp_path) -> Callable[..., tuple[dict, Path]]:
    def run(name: str, *args: str) -> tuple[dict, Path]:
        output = tmp_path / (name if name in FOLDER_OUTPUT else f"{name}.json")
        result = load_bench(name).main(["--quick", "--output", str(output), *args])
        assert isinstance(result, dict), f"bench/{name}.py main() must return its result dict"
        return result, output

    return run
