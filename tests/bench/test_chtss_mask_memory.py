"""bench/chtss_mask_memory.py --quick: one byte of mask per sparse weight, rows of other labels kept."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_mask_memory_quick_counts_one_byte_per_weight_and_keeps_other_labels(run_bench):
    result, out = run_bench("chtss_mask_memory", "--dtypes", "float32", "--repeats", "1", "--label", "a")
    (row,) = result["rows"]
    assert row["label"] == "a" and row["shape"] == "quick" and row["dtype"] == "float32"
    assert row["bytes_per_weight"] == pytest.approx(1.0, abs=0.01)  # issue 7: a bool mask, nothing else
    assert row["remask_ms"] > 0
    # a second label is added to the same file; rerunning a label replaces its rows
    result, out = run_bench("chtss_mask_memory", "--dtypes", "float32", "--repeats", "1", "--label", "b")
    assert (
        [r["label"] for r in json.loads(out.read_text())["rows"]]
        == ["a", "b"]
        == [r["label"] for r in result["rows"]]
    )
