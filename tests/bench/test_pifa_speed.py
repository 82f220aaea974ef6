"""Smoke test of bench/pifa_speed.py --quick (the CPU variant CI can afford)."""

import json

import pytest


@pytest.mark.slow
def test_pifa_speed_quick_writes_json_and_ratios(run_bench, capsys):
    result, out = run_bench("pifa_speed", "--reps", "2")
    saved = json.loads(out.read_text())
    assert saved["environment"]["quick"] is True
    rows = {r["row"] for r in saved["layers"]}
    assert {"dense", "lowrank r/d=.5", "pifa-ref r/d=.5", "pifa-row r/d=.5", "pifa-col r/d=.5"} <= rows
    assert {"pifa-slice r/d=.5", "lowrank@0.5", "pifa@0.5", "pifa-slice@0.5"} <= rows
    assert all(s["pifa_vs_lowrank"] > 0 for s in result["summary"])
    e2e = saved["end_to_end"]
    assert e2e["mpifa@0.5"]["params"] < e2e["dense"]["params"]
    assert "speed-up mpifa/dense" in capsys.readouterr().out  # the table is printed last


def test_memory_counts_pifa_bytes_against_lowrank_at_half_rank(run_bench):
    result, out = run_bench("pifa_speed", "--memory", "--dtypes", "float16", "--shapes", "256x256,512x256")
    rows = {r["shape"]: r for r in json.loads(out.read_text())["memory"]}
    assert rows == {r["shape"]: r for r in result["memory"]}
    d, r = 256, 128
    square = rows["256x256"]
    assert square["lowrank_bytes"] - 1 == 2 * d * r * 2  # U, V in fp16 (+ the 1-byte load hint)
    # PIFA: r pivot rows/columns + (d - r) x r coefficients in fp16, and the int32 pivot order
    assert square["pifa_row_bytes"] - 1 == (r * d + (d - r) * r) * 2 + 4 * d
    assert square["pifa_saving_vs_lowrank"] == pytest.approx(0.25 - 4 * d / (4 * d * r), abs=1e-3)
    tall = rows["512x256"]
    assert tall["pifa_column_bytes"] < tall["pifa_row_bytes"] < tall["lowrank_bytes"] < tall["dense_bytes"]
    assert 0 < rows["all shapes"]["pifa_saving_vs_lowrank"] < square["pifa_saving_vs_lowrank"]
