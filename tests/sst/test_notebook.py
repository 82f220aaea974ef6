"""notebooks/sst.ipynb executes top to bottom on a CPU (nbclient)."""

from __future__ import annotations

import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO_ROOT


@pytest.mark.slow
def test_sst_notebook_executes(tmp_path, shared_data):
    nb = nbformat.read(REPO_ROOT / "notebooks" / "sst.ipynb", as_version=4)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    client = NotebookClient(
        nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = "".join(
        o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
    )
    assert "reload identical: True" in outputs
    assert (tmp_path / "sst_spectrum.png").is_file()
