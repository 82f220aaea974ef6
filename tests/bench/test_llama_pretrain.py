"""bench/llama_pretrain.py (issue 11, experiments 3 and 4): the --quick run and its tables."""

import json

import pytest

from tests.bench.conftest import load_bench


@pytest.mark.slow
def test_quick_rows_train_equal_tokens_reach_their_density_and_merge(run_bench, capsys):
    methods = ["dense", "lora", "sst", "set", "chtss"]
    result, out = run_bench(
        "llama_pretrain", "--methods", *methods, "--seeds", "0", "--zero-shot", "arc_easy"
    )
    saved = json.loads(out.read_text())
    assert saved["rows"] == result["rows"]  # main returns what it wrote
    rows = {r["method"]: r for r in saved["rows"]}
    assert list(rows) == methods
    assert len({r["train_tokens"] for r in rows.values()}) == 1  # the experiments' premise: equal tokens
    assert rows["dense"]["block_density"] == 1.0
    for m in ("set", "chtss"):  # read back from the weights, not from the scheduler
        assert rows[m]["block_density"] == pytest.approx(0.3, abs=0.002), rows[m]
    assert "block_density" not in rows["sst"]  # factors, no sparsity to read
    for r in rows.values():
        assert r["ppl_wikitext2_test"] > 1 and r["ppl_tinyshakespeare"] > 1
        assert r["zero_shot"]["arc_easy"]["n"] == 2
    # distinct methods train distinct models
    assert len({r["ppl_wikitext2_test"] for r in rows.values()}) == len(methods)
    assert "LoRA -> full-rank gap" in capsys.readouterr().out
    # a second seed is added next to the first, not over it
    load_bench("llama_pretrain").main(["--quick", "--methods", "dense", "--seeds", "1", "--output", str(out)])
    merged = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["seed"]) for r in merged][:2] == [("dense", 0), ("dense", 1)]
    assert len(merged) == len(methods) + 1


def test_store_refuses_rows_of_another_setting(tmp_path):
    bench = load_bench("llama_pretrain")
    path = tmp_path / "rows.json"
    bench.store(path, [{"method": "dense", "seed": 0}], {"steps": 160})
    with pytest.raises(SystemExit, match="another setting"):
        bench.store(path, [{"method": "dense", "seed": 1}], {"steps": 4})


def test_gap_closed_is_computed_per_seed_from_the_three_rows():
    bench = load_bench("llama_pretrain")
    rows = []
    for seed, (full, lora, sst) in enumerate([(100.0, 200.0, 150.0), (100.0, 200.0, 110.0)]):
        for method, ppl in (("dense", full), ("lora", lora), ("sst", sst)):
            rows.append(
                {
                    "method": method,
                    "seed": seed,
                    "ppl_wikitext2_test": ppl,
                    "ppl_tinyshakespeare": 1.0,
                    "final_train_loss": 1.0,
                }  # fmt: skip
            )
    text = bench.tables({"rows": rows})
    assert "per seed: 50 %, 90 %; mean 70 %" in text
    assert "| dense | 2 | - | 100.00 ± 0.00 |" in text
