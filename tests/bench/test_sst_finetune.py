"""bench/training_table.py --rows sst_finetune --quick: SST and LoRA fine-tune side by side on SST-2 text, the
lr is chosen on validation loss, the SST adapter is compact and reloads exactly."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_sst_finetune_quick_compares_sst_and_lora(run_bench, shared_data):
    results, out = run_bench("training_table", "--rows", "sst_finetune", "--seeds", "0", "1")
    result = results["sst_finetune"]
    assert json.loads(out.read_text())["step_ratio_sst_vs_lora"] == result["step_ratio_sst_vs_lora"] > 0
    summary = {row["method"]: row for row in result["summary"]}
    assert set(summary) == {"sst", "lora"}
    assert all(row["eval_loss_mean"] > 0 and row["peak_rss_gb"] > 0 for row in summary.values())
    # matched trainable parameters: S adds k per layer to SST's r (m + n)
    assert abs(summary["sst"]["trainable"] / summary["lora"]["trainable"] - 1) < 0.15
    adapters = result["adapters"]
    assert adapters["sst_saved_format"] == "compact" and adapters["sst_reload_identical_logits"]
    assert adapters["sst_adapter_bytes"] < adapters["sst_full_adapter_bytes"]
    assert adapters["sst_adapter_bytes"] <= adapters["targeted_base_bytes"]
    # the lr was chosen on validation loss, per method, from the grid; seed 1 reran both at that lr
    for method in ("sst", "lora"):
        grid = [r for r in result["grid"] if r["method"] == method]
        assert len(grid) == 2 and result["best_lr"][method] == min(grid, key=lambda r: r["val_loss"])["lr"]
        assert {(r["seed"], r["lr"]) for r in result["rows"] if r["method"] == method} == {
            (0, result["best_lr"][method]),
            (1, result["best_lr"][method]),
        }
    assert len(result["step_ratio_per_run"]) == 3  # two grid runs and one more seed
    assert set(result["paths"]["ratio_vs_lora"]) == {"lora", "sst_factored", "sst_materialized"}
