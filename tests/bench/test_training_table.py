"""bench/training_table.py --quick: pretraining rows at equal tokens (densities read back, zero-shot, the
LoRA -> full-rank gap), the CHTss byte-level rows and overhead, SST cost, and MT through the recipe layer."""

from __future__ import annotations

import json

import pytest

from tests.bench.conftest import load_bench


@pytest.mark.slow
def test_llama28m_rows_train_equal_tokens_reach_their_density_and_merge(run_bench, capsys):
    methods = ["dense", "lora", "sst", "set", "chtss"]
    result, out = run_bench(
        "training_table", "--rows", "llama28m", "--methods", *methods, "--zero-shot", "arc_easy"
    )
    saved = json.loads(out.read_text())
    assert saved["rows"] == result["llama28m"]["rows"]  # main returns what it wrote
    rows = {r["method"]: r for r in saved["rows"]}
    assert list(rows) == methods and len({r["train_tokens"] for r in rows.values()}) == 1  # equal tokens
    assert rows["dense"]["block_density"] == 1.0 and "block_density" not in rows["sst"]
    for m in ("set", "chtss"):  # read back from the weights, not from the controller
        assert rows[m]["block_density"] == pytest.approx(0.3, abs=0.002), rows[m]
    assert all(r["ppl_wikitext2_test"] > 1 and r["zero_shot"]["arc_easy"]["n"] == 2 for r in rows.values())
    assert len({r["ppl_wikitext2_test"] for r in rows.values()}) == len(methods)  # distinct models
    assert "LoRA -> full-rank gap" in capsys.readouterr().out
    load_bench("training_table").main(["--quick", "--rows", "llama28m", "--methods", "dense", "--seeds", "1",
                                       "--merge", "--output", str(out)])  # fmt: skip
    merged = json.loads(out.read_text())["rows"]
    assert len(merged) == len(methods) + 1 and ("dense", 1) in {(r["method"], r["seed"]) for r in merged}
    with pytest.raises(SystemExit, match="another setting"):  # a sensitivity run goes to its own file
        load_bench("training_table").main(["--quick", "--rows", "llama28m", "--set", "lr=0.001", "--merge",
                                           "--output", str(out)])  # fmt: skip


def test_gap_closed_is_computed_per_seed_from_the_three_rows():
    rows = [{"method": m, "seed": seed, "ppl_wikitext2_test": ppl, "final_train_loss": 1.0}
            for seed, ppls in enumerate([(100.0, 200.0, 150.0), (100.0, 200.0, 110.0)])
            for m, ppl in zip(("dense", "lora", "sst"), ppls)]  # fmt: skip
    text = load_bench("training_table").tables({"rows": rows})
    assert "per seed: 50 %, 90 %; mean 70 %" in text and "| dense | 2 | 100.00 ± 0.00 |" in text


@pytest.mark.slow
def test_byte_level_chtss_rows_and_the_overhead_row(run_bench, tmp_path):
    result, _ = run_bench("training_table", "--rows", "chtss_llama_tiny", "--methods", "dense", "chtss")
    rows = {r["method"]: r for r in result["chtss_llama_tiny"]["rows"]}
    assert (
        rows["chtss"]["density_sparse_subset"] == pytest.approx(0.3, abs=2e-3)
        and rows["chtss"]["updates"] > 1
    )
    assert 1 < rows["dense"]["held_out_ppl"] < 256  # a byte-level model that learned something
    over = load_bench("training_table").main(
        ["--quick", "--rows", "chtss_overhead", "--output", str(tmp_path / "o.json")]
    )
    (row,) = over["chtss_overhead"]["rows"]
    assert row["updates"] >= 1 and row["dense_s"] > 0 and row["overhead_pct"] > -100


@pytest.mark.slow
def test_sst_cost_rows_measure_and_count_model_state(run_bench, capsys):
    result, out = run_bench("training_table", "--rows", "sst_cost_cpu", "--set", "count_only=[1.3b]")
    assert "tiny | sst " in capsys.readouterr().out  # the table is printed
    rows = {(r["size"], r["method"]): r for r in json.loads(out.read_text())["rows"]}
    assert rows == {(r["size"], r["method"]): r for r in result["sst_cost_cpu"]["rows"]}
    assert rows[("tiny", "full")]["model_state_vs_full"] == 1.0 and rows[("tiny", "sst")]["tokens_per_s"] > 0
    assert round(100 * rows[("1.3b", "sst")]["trainable_share"], 1) == 18.7  # as in the paper
    assert rows[("1.3b", "sst")]["model_state_vs_full"] < 0.6


@pytest.mark.slow
def test_mt_rows_run_through_the_recipe_layer_and_merge_resumes(run_bench, shared_data):
    pytest.importorskip("evaluate")
    result, out = run_bench("training_table", "--rows", "mt_multi30k", "--methods", "set", "lora")
    rows = {r["method"]: r for r in result["mt_multi30k"]["rows"]}
    assert json.loads(out.read_text())["rows"] == result["mt_multi30k"]["rows"] and set(rows) == {
        "set",
        "lora",
    }
    for row in rows.values():
        assert row["test_sentences"] == 16 and row["train_steps"] == 8
        assert row["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert (
        abs(rows["set"]["density"] - 0.05) < 2e-3 and rows["set"]["nonzero_weights"] <= rows["set"]["density"]
    )
    assert rows["lora"]["rank"] == 4 and "density" not in rows["lora"]
    again = load_bench("training_table").main(["--quick", "--rows", "mt_multi30k", "--methods", "set", "lora",
                                               "--merge", "--output", str(out)])  # fmt: skip
    assert again["mt_multi30k"]["rows"] == result["mt_multi30k"]["rows"]  # finished rows are not re-run
