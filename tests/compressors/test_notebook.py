"""notebooks/mpifa.ipynb executes top to bottom on a CPU (its cells assert the claims they show)."""

import pytest

from tests.helpers import REPO_ROOT, execute_notebook

# a few minutes on an idle 2-core CPU; the limits leave room for a machine shared with another job
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(2700)]

NOTEBOOK = REPO_ROOT / "notebooks" / "mpifa.ipynb"


def test_mpifa_notebook_runs(shared_data, smollm2_path):
    outputs = execute_notebook(NOTEBOOK, cwd=NOTEBOOK.parent, timeout=2400)
    assert "reloaded logits identical: True" in outputs
