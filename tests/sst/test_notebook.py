"""notebooks/sst.ipynb executes top to bottom on a CPU (nbclient)."""

from __future__ import annotations

import os

import pytest

from tests.helpers import REPO_ROOT, execute_notebook


@pytest.mark.slow
def test_sst_notebook_executes(tmp_path, shared_data):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    outputs = execute_notebook(REPO_ROOT / "notebooks" / "sst.ipynb", cwd=tmp_path, timeout=240)
    assert "reload identical: True" in outputs
    assert (tmp_path / "sst_spectrum.png").is_file()
