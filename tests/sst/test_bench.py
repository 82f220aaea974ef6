"""bench/sst_pretrain.py --quick runs (CPU smoke test) and reports what section 4 needs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.slow
def test_bench_quick_cost_rows(tmp_path):
    out = tmp_path / "sst.json"
    cmd = [sys.executable, str(REPO_ROOT / "bench" / "sst_pretrain.py"), "--quick", "--part", "cost"]
    cmd += ["--methods", "full", "lora", "sst", "--count-only", "1.3b", "--output", str(out)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| tiny | sst |" in proc.stdout
    rows = {(r["size"], r["method"]): r for r in json.loads(out.read_text())["cost"]}
    assert rows[("tiny", "full")]["model_state_vs_full"] == 1.0
    assert rows[("tiny", "sst")]["tokens_per_s"] > 0
    # the counted LLaMA-1.3B rows: 18.7 % trainable, as in the paper
    assert round(100 * rows[("1.3b", "sst")]["trainable_share"], 1) == 18.7
    assert rows[("1.3b", "sst")]["model_state_vs_full"] < 0.6


@pytest.mark.slow
def test_generate_bench_quick_reports_ratio_and_identical_outputs(tmp_path):
    """bench/sst_generate.py --quick: side-by-side ratio present, outputs unchanged by the cache."""
    sys.path.insert(0, str(REPO_ROOT))
    from bench.sst_generate import main

    out = tmp_path / "gen.json"
    result = main(["--quick", "--repeats", "1", "--output", str(out)])
    assert json.loads(out.read_text())["ratio_sst_vs_merged"] == result["ratio_sst_vs_merged"] > 0
    assert result["tokens_identical"]
    assert result["max_logit_diff_sst_vs_uncached"] == 0.0
    assert result["max_logit_diff_sst_vs_merged"] <= 1e-5
    assert {r["variant"] for r in result["rows"]} == {"merged", "sst", "sst_uncached"}
