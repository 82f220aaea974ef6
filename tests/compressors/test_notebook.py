"""notebooks/mpifa.ipynb executes top to bottom on a CPU (its cells assert the claims they show)."""

from pathlib import Path

import pytest

# a few minutes on an idle 2-core CPU; the limits leave room for a machine shared with another job
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(2700)]

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "mpifa.ipynb"


def test_mpifa_notebook_runs(shared_data, smollm2_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=2400, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "reloaded logits identical: True" in outputs
