"""bench/scaling_memory.py --quick: what FSDP2 shards (parameters, SST's frozen U/Vh, gradients, moments, CHTss
masks) divides by the world size; what it does not (buffers) stays whole."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_scaling_memory_quick_shards_what_fsdp2_shards(run_bench):
    result, out = run_bench("scaling_memory")
    assert json.loads(out.read_text())["rows"] == result["rows"]
    rows = {(r["method"], r["world"]): r for r in result["rows"]}
    methods = {m for m, _ in rows}
    sst = sorted(m for m in methods if m.startswith("sst"))
    assert {"dense", "chtss d=0.3"} <= methods and len(sst) == 4  # 2 ranks x (float32, bfloat16)
    for method in methods:
        one, eight = rows[(method, 1)], rows[(method, 8)]
        for part in ("params", "grads", "moments"):  # dim-0 shards: an eighth, up to padding
            assert eight[part] == pytest.approx(one[part] / 8, rel=0.02), (method, part)
    # CHTss: 1 byte per targeted weight against 4 bytes of fp32 weight, sharded like the weights
    chtss1, chtss8 = rows[("chtss d=0.3", 1)], rows[("chtss d=0.3", 8)]
    assert 0 < chtss1["method_state"] < chtss1["params"] / 4
    assert chtss8["method_state"] == pytest.approx(chtss1["method_state"] / 8, rel=0.02)
    assert chtss8["update_transient"] == chtss1["update_transient"] > 0  # whole masks: not sharded
    dense1 = rows[("dense", 1)]
    for method in sst:
        one, eight = rows[(method, 1)], rows[(method, 8)]
        # SSTCallback holds U/Vh as frozen parameters under FSDP2: sharded like everything else
        assert (
            one["frozen_U_Vh_per_gpu_GiB"] == pytest.approx(one["frozen_U_Vh_GiB"])
            and one["frozen_U_Vh_GiB"] > 0
        )
        assert eight["frozen_U_Vh_per_gpu_GiB"] == pytest.approx(one["frozen_U_Vh_GiB"] / 8, rel=0.02)
        assert eight["total"] < one["total"] / 6  # nothing large stays replicated
        # only the indices and counters stay replicated buffers: small, equal on every world size
        assert eight["method_state"] == one["method_state"] < one["params"] / 100
        assert one["grads"] < dense1["grads"]  # fewer trainable parameters than dense
    for r in {rows[(m, 1)]["r"] for m in sst}:
        f32, bf16 = rows[(f"sst r={r} float32", 1)], rows[(f"sst r={r} bfloat16", 1)]
        assert bf16["frozen_U_Vh_GiB"] == pytest.approx(f32["frozen_U_Vh_GiB"] / 2, rel=1e-6)
        assert bf16["grads"] == f32["grads"]  # the trainable factors stay float32
