"""notebooks/chtss.ipynb executes top to bottom on a CPU (nbclient)."""

from __future__ import annotations

import pytest

from tests.helpers import REPO_ROOT, execute_notebook


@pytest.mark.slow
def test_notebook_executes(tmp_path):
    outputs = execute_notebook(REPO_ROOT / "notebooks" / "chtss.ipynb", cwd=tmp_path, timeout=600)
    assert "updates, density 0.0200" in outputs
