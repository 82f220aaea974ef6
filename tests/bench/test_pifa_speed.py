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
