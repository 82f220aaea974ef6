"""bench/mt_multi30k.py --quick: rows with BLEU / chrF / signatures, measured density, --resume keeps rows."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_mt_bench_quick_rows_and_resume(run_bench, shared_data):
    pytest.importorskip("evaluate")
    result, out = run_bench("mt_multi30k", "--methods", "set", "lora")
    assert json.loads(out.read_text())["rows"] == result["rows"]
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"set", "lora"}
    for row in rows.values():
        assert row["test_sentences"] == 16 and row["train_steps"] == 8
        assert row["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert (
        abs(rows["set"]["density"] - 0.05) < 2e-3 and rows["set"]["nonzero_weights"] <= rows["set"]["density"]
    )
    assert rows["lora"]["rank"] == 4 and "density" not in rows["lora"]
    assert [s["method"] for s in result["summary"]] == ["set", "lora"]

    # --resume keeps the finished rows (same settings) and runs only the missing ones
    from tests.bench.conftest import load_bench

    again = load_bench("mt_multi30k").main(
        ["--quick", "--output", str(out), "--methods", "set", "lora", "--resume"]
    )
    assert again["rows"] == result["rows"]
    with pytest.raises(ValueError, match="was written with overrides"):
        load_bench("mt_multi30k").main(["--output", str(out), "--methods", "set", "--resume"])
