"""bench/chtss_train.py --quick, cost part: batched and per-matrix L3n timed in one run, one JSON per part."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_chtss_cost_quick_writes_its_part_into_the_output_folder(run_bench, capsys):
    result, folder = run_bench("chtss_train", "--parts", "cost")
    assert set(result) == {"cost"}
    assert [p.name for p in folder.iterdir()] == ["chtss_cost_quick.json"]
    saved = json.loads((folder / "chtss_cost_quick.json").read_text())
    assert saved["rows"] == result["cost"]["rows"]
    (row,) = saved["rows"]
    assert row["model"] == "quick" and row["matrices"] > 0
    assert (
        row["predictor_batched_ms"] > 0 and row["predictor_per_matrix_ms"] > 0 and row["full_update_ms"] > 0
    )
    assert saved["command"].startswith("python bench/chtss_train.py --quick --output ")
    assert "**cost**" in capsys.readouterr().out  # the report is printed last
