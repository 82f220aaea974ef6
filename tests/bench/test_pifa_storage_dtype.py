"""bench/pifa_storage_dtype.py: the --quick smoke runs of its rows (storage emulation, bf16 compute, layer speed)."""

import json

import pytest


@pytest.mark.slow
def test_quick_storage_run_orders_the_weight_errors(run_bench):
    result, out = run_bench("pifa_storage_dtype")
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows == {r["variant"]: r for r in result["rows"]}
    assert rows["PIFA fp32"]["change %"] == 0.0 and rows["PIFA fp32"]["mean KL (nats/token)"] == 0.0
    err = {k: v["weight rel. error"] for k, v in rows.items()}
    # the rounding of the coefficients is part of the bf16 error: wider C stores W more exactly
    assert err["PIFA bf16, coeff fp16"] < err["PIFA bf16 all"]
    assert err["PIFA bf16, coeff fp32"] < err["PIFA bf16 all"]
    assert err["PIFA fp16 all"] < err["PIFA bf16 all"]
    assert all(v["mean KL (nats/token)"] >= 0 for v in rows.values())


@pytest.mark.slow
def test_quick_bf16_compute_run_and_speed(run_bench, tmp_path):
    result, _ = run_bench("pifa_storage_dtype", "--rows", "bf16_compute")
    err = {r["variant"]: r["weight rel. error"] for r in result["rows"]}
    auto = next(k for k in err if "'auto'" in k)
    same = next(k for k in err if "'same'" in k)
    assert err[auto] < err[same]
    speed, _ = run_bench("pifa_storage_dtype", "--rows", "speed", "--set", "reps=1")
    assert {r["coefficient_dtype"] for r in speed["rows"]} == {"same", "auto", "float32"}
    assert {r["C dtype"] for r in speed["rows"]} == {"bfloat16", "float16", "float32"}
