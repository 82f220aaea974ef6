"""bench/scaling_memory.py --quick: FSDP2 shards parameters, gradients, moments and CHTss masks; not buffers."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_scaling_memory_quick_shards_what_fsdp2_shards(run_bench):
    result, out = run_bench("scaling_memory")
    assert json.loads(out.read_text())["rows"] == result["rows"]
    rows = {(r["method"].split()[0], r["world"]): r for r in result["rows"]}
    for method in ("dense", "chtss", "sst"):
        one, eight = rows[(method, 1)], rows[(method, 8)]
        for part in ("params", "grads", "moments"):  # dim-0 shards: an eighth, up to rounding
            assert eight[part] == pytest.approx(one[part] / 8, abs=2e-3), (method, part)
    # CHTss: 1 byte per targeted weight against 4 bytes of fp32 weight, sharded like the weights
    chtss = rows[("chtss", 1)]
    assert 0 < chtss["method_state"] < chtss["params"] / 4 + 1e-3
    assert rows[("chtss", 8)]["method_state"] == pytest.approx(chtss["method_state"] / 8, abs=2e-3)
    # SST: fewer trainable parameters than dense; its frozen U / Vh buffers are not sharded by FSDP2
    sst1, sst8 = rows[("sst", 1)], rows[("sst", 8)]
    assert sst1["grads"] < rows[("dense", 1)]["grads"]
    assert sst8["method_state"] == sst1["method_state"] > 0
