"""bench/sst_pretrain.py --quick runs (CPU smoke test) and reports what section 4 needs."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_bench_quick_cost_rows(run_bench, capsys):
    result, out = run_bench(
        "sst_pretrain", "--part", "cost", "--methods", "full", "lora", "sst", "--count-only", "1.3b"
    )
    assert "| tiny | sst |" in capsys.readouterr().out
    rows = {(r["size"], r["method"]): r for r in json.loads(out.read_text())["cost"]}
    assert rows == {(r["size"], r["method"]): r for r in result["cost"]}  # main returns what it wrote
    assert rows[("tiny", "full")]["model_state_vs_full"] == 1.0
    assert rows[("tiny", "sst")]["tokens_per_s"] > 0
    # the counted LLaMA-1.3B rows: 18.7 % trainable, as in the paper
    assert round(100 * rows[("1.3b", "sst")]["trainable_share"], 1) == 18.7
    assert rows[("1.3b", "sst")]["model_state_vs_full"] < 0.6
