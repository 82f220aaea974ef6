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
