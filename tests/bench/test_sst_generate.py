"""bench/sst_generate.py --quick: side-by-side ratio present, outputs unchanged by the cache."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_generate_bench_quick_reports_ratio_and_identical_outputs(run_bench):
    result, out = run_bench("sst_generate", "--repeats", "1")
    assert json.loads(out.read_text())["ratio_sst_vs_merged"] == result["ratio_sst_vs_merged"] > 0
    assert result["tokens_identical"]
    assert result["max_logit_diff_sst_vs_uncached"] == 0.0
    assert result["max_logit_diff_sst_vs_merged"] <= 1e-5
    assert {r["variant"] for r in result["rows"]} == {"merged", "sst", "sst_uncached"}
