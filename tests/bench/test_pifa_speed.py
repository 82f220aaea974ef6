"""bench/pifa_speed.py --quick: every row kind at its small CPU size (what CI can afford)."""

import json

import pytest


@pytest.mark.slow
def test_pifa_speed_quick_writes_json_and_ratios(run_bench, capsys):
    result, out = run_bench("pifa_speed", "--set", "reps=2")
    saved = json.loads(out.read_text())
    assert saved == result[out.stem] and saved["environment"]["quick"] is True
    rows = {r["row"] for r in saved["layers"]}
    assert {"dense", "lowrank r/d=.5", "pifa-ref r/d=.5", "pifa-row r/d=.5", "pifa-col r/d=.5"} <= rows
    assert {"pifa-slice r/d=.5", "lowrank@0.5", "pifa@0.5", "pifa-slice@0.5"} <= rows
    assert all(s["pifa_vs_lowrank"] > 0 for s in saved["summary"])
    assert {(s["shape"], s["tokens"]) for s in saved["summary"]} == {
        (s, t) for s in ("256x256", "512x256", "256x512") for t in (256, 1, 16)
    }
    assert set(saved["targets"]) == {
        "PIFA >= 1.25x low-rank at r/d = 0.5, every shape (prefill)",
        "PIFA >= 1.5x dense at density 0.5 (prefill)",
        "PIFA >= 1.3x dense at density 0.5 (decode, 1-16 tokens)",
    }
    e2e = saved["end_to_end"]
    runs = e2e["runs"]["float32"]
    assert list(runs) == ["dense", "mpifa@0.5", "lowrank@0.5"]
    assert runs["mpifa@0.5"]["params"] < runs["dense"]["params"]
    # equal parameter budget: U V stores r (m + n) where PIFA stores r (m + n) - r^2 (each within a rank)
    assert runs["lowrank@0.5"]["params"] == pytest.approx(runs["mpifa@0.5"]["params"], rel=0.02)
    assert e2e["decode_mode"] == "eager" and e2e["decode_tokens"] == 16
    assert {(s["variant"], s["dtype"]) for s in e2e["speedups"]} == {
        ("mpifa@0.5", "float32"),
        ("lowrank@0.5", "float32"),
    }
    assert all(s["prefill"] > 0 and s["decode"] > 0 for s in e2e["speedups"])
    (p,) = e2e["pifa_vs_lowrank"]
    mpifa, lowrank = runs["mpifa@0.5"], runs["lowrank@0.5"]
    assert p["prefill"] == pytest.approx(mpifa["prefill_tok_s"] / lowrank["prefill_tok_s"])
    assert "end_to_end (JSON:" in capsys.readouterr().out  # the table is printed last


def test_memory_counts_pifa_bytes_against_lowrank_at_half_rank(run_bench):
    result, out = run_bench("pifa_speed", "--rows", "memory", "--set", "shapes=[[256, 256], [512, 256]]")
    rows = {r["shape"]: r for r in json.loads(out.read_text())["memory"]}
    assert rows == {r["shape"]: r for r in result[out.stem]["memory"]}
    d, r = 256, 128
    square = rows["256x256"]
    assert square["lowrank_bytes"] - 1 == 2 * d * r * 2  # U, V in fp16 (+ the 1-byte load hint)
    # PIFA: r pivot rows/columns + (d - r) x r coefficients in fp16, and the int32 pivot order
    assert square["pifa_row_bytes"] - 1 == (r * d + (d - r) * r) * 2 + 4 * d
    assert square["pifa_saving_vs_lowrank"] == pytest.approx(0.25 - 4 * d / (4 * d * r), abs=1e-3)
    tall = rows["512x256"]
    assert tall["pifa_column_bytes"] < tall["pifa_row_bytes"] < tall["lowrank_bytes"] < tall["dense_bytes"]
    assert 0 < rows["all shapes"]["pifa_saving_vs_lowrank"] < square["pifa_saving_vs_lowrank"]


@pytest.mark.slow
def test_checkpoints_quick_compares_every_variant_and_checks_batch_8_against_batch_1(run_bench, capsys):
    """--checkpoints on the tiny LLaMA: each variant compressed by its method, reloaded with
    from_pretrained, timed interleaved; the padded batch-8 outputs equal batch 1's row by row."""
    result, out = run_bench("pifa_speed", "--rows", "checkpoints", "--set", "rss_variants=[dense, mpifa@0.5]")
    saved = json.loads(out.read_text())
    res = saved["checkpoints"]
    variants = res["variants"]
    assert list(variants) == ["dense", "mpifa@0.8", "mpifa@0.5", "lowrank@0.8", "lowrank@0.5", "2:4"]
    # kept share of the targeted weights: the density asked for (2:4 keeps dense kernels: 1.0)
    for name, density in (("mpifa@0.8", 0.8), ("mpifa@0.5", 0.5), ("lowrank@0.8", 0.8), ("lowrank@0.5", 0.5)):
        assert variants[name]["kept_share"] == pytest.approx(density, abs=0.03), name
    assert variants["dense"]["kept_share"] == variants["2:4"]["kept_share"] == 1.0
    assert variants["mpifa@0.5"]["params"] < variants["mpifa@0.8"]["params"] < variants["dense"]["params"]
    measures = {r["measure"] for r in res["runs"]}
    assert measures == {"decode", "batch8", "prefill32", "prefill96"}
    assert len(res["runs"]) == 4 * 6
    for r in res["runs"]:
        assert len(r["seconds"]) >= 2 and r["tok_s"] > 0 and 0 < r["profile"]["linear_share"] < 1
        if r["variant"] == "dense":
            assert r["speedup_vs_dense"] == 1.0
    assert len([r for r in res["runs"] if r["measure"] == "decode"][0]["seconds"]) == 8  # one per prompt
    check = res["batch8_equals_batch1"]["float32"]
    assert set(check) == set(variants)
    assert all(c["equal"] and c["rows_checked"] == 8 for c in check.values()), check
    for t in res["targets"]:  # the ideal comes from the dense run's own profile
        assert t["ideal"] == pytest.approx(
            1 / ((1 - t["linear_share_dense"]) + t["linear_share_dense"] * t["kept_share"])
        )
        assert t["met"] == (t["speedup"] >= 0.9 * t["ideal"])
    assert set(res["rss"]) == {"dense float32", "mpifa@0.5 float32"}
    for probe in res["rss"].values():
        assert probe["peak_rss"] >= probe["rss_after_load"] > probe["rss_after_imports"] > 0
    assert res["rss"]["mpifa@0.5 float32"]["state_bytes"] < res["rss"]["dense float32"]["state_bytes"]
    assert saved["environment"]["cpu_flags"]["model"]
    assert "batch 8 (left-padded) == batch 1" in capsys.readouterr().out


def test_profile_quick_splits_the_forward_into_its_ops(run_bench):
    result, out = run_bench("pifa_speed", "--rows", "profile", "--set", "reps=3")
    rows = json.loads(out.read_text())["profile"]
    assert {(r["shape"], r["tokens"]) for r in rows} == {
        (s, t) for s in ("256x256", "128x256") for t in (1, 16)
    }
    for r in rows:
        us = r["us"]
        assert {"dense", "lowrank", "pifa-row", "pifa-col", "pifa-slice"} <= set(us)
        assert {"pifa-row: weight GEMM", "pifa-row: coeff GEMM", "pifa-row: cat", "pifa-row: gather"} <= set(
            us
        )
        assert {"pifa-col: gather", "pifa-col: coeff GEMM", "pifa-col: weight GEMM"} <= set(us)
        ops = sum(v for k, v in us.items() if k.startswith("pifa-col: "))
        assert r["pifa-col overhead_us"] == pytest.approx(us["pifa-col"] - ops)
        assert r["pifa_vs_lowrank"] == pytest.approx(us["lowrank"] / min(us["pifa-row"], us["pifa-col"]))
        assert set(r["new_vs_previous"]) == {"row", "col"}
    assert "compile" not in rows[0]


def test_load_memory_quick_measures_peak_rss_against_the_checkpoint_size(run_bench):
    result, out = run_bench("pifa_speed", "--rows", "load_memory", "--set", "paths=[default]")
    saved = json.loads(out.read_text())
    (row,) = saved["rows"]
    model = saved["model"]
    assert row["path"] == "default" and model["stored_params"] < 0.7 * model["dense_params"]
    probe = row["probe"]
    # VmHWM and psutil's RSS come from the kernel's per-CPU-batched counters, read at different moments:
    # the peak may read a few pages below an RSS sampled earlier (seen: 4 KiB), never megabytes.
    assert probe["peak_rss"] + 2**20 >= probe["rss_after_load"] > probe["rss_after_imports"]
    bound = probe["rss_after_imports"] + model["safetensors_bytes"]
    assert row["peak_over_size_plus_fixed"] == pytest.approx(probe["peak_rss"] / bound)
    assert row["met_1.1x"] == (probe["peak_rss"] <= 1.1 * bound)
