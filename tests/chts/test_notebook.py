"""notebooks/chtss.ipynb executes top to bottom on a CPU (nbclient)."""

from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO_ROOT


@pytest.mark.slow
def test_notebook_executes(tmp_path):
    path = REPO_ROOT / "notebooks" / "chtss.ipynb"
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "updates, density 0.0200" in outputs
