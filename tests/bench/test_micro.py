"""bench/micro.py --quick, one row at a time: what each micro-benchmark measures, and its row file."""

from __future__ import annotations

import json

import pytest

from tests.bench.conftest import load_bench


def test_random_mask_has_the_exact_link_count():
    mask = load_bench("micro").random_mask(40, 30, 0.1)
    assert mask.shape == (40, 30) and int(mask.sum()) == 120


def test_rows_are_checked_against_the_benchmark_settings(tmp_path, monkeypatch):
    harness = load_bench("harness")
    monkeypatch.setattr(harness, "ROWS", tmp_path)
    (tmp_path / "micro.yaml").write_text("x: {bench: sst_generate, repeats: 2, repeat: 3}\n")
    with pytest.raises(ValueError, match=r"row 'x' has unknown key 'repeat' \(did you mean repeats"):
        harness.load_rows("micro", load_bench("micro").row_keys)
    row = {"bench": "sst_generate", "repeats": 7, "quick": {"repeats": 3}}
    assert harness.row_settings("x", row, quick=True, sets=["repeats=9"]) == {
        "bench": "sst_generate",
        "repeats": 9,
    }
    with pytest.raises(ValueError, match="row 'x' has no setting 'seed'"):
        harness.row_settings("x", row, sets=["seed=1"])


@pytest.mark.slow
def test_predictor_cost_grows_with_density_for_l3p_and_is_extrapolated_past_the_cap(run_bench):
    result, out = run_bench("micro", "--rows", "chts_predictor_cost", "--set", "densities=[0.02, 0.2, 0.3]")
    rows = json.loads(out.read_text())["rows"]
    assert rows == result["chts_predictor_cost"]["rows"]
    low, high, beyond = rows
    assert low["l3p"] == high["l3p"] == "measured" and beyond["l3p"].startswith("extrapolated")
    assert high["l3p_s"] > 20 * low["l3p_s"]  # the claim's direction, wide margin (~400x expected)
    expected = high["l3p_s"] * (beyond["mean_degree"] / high["mean_degree"]) ** 3
    assert beyond["l3p_s"] == pytest.approx(expected, rel=0.05)


@pytest.mark.slow
def test_update_cost_times_batched_and_per_matrix_predictors_and_the_full_update(run_bench):
    result, out = run_bench("micro", "--rows", "chtss_update_cost")
    (row,) = json.loads(out.read_text())["rows"]
    assert row == result["chtss_update_cost"]["rows"][0]
    assert row["model"] == "quick4" and row["matrices"] == 28 and row["sparse_subset_weights"] == 3_162_112
    assert min(row["predictor_batched_ms"], row["predictor_per_matrix_ms"], row["full_update_ms"]) > 0


@pytest.mark.slow
def test_mask_memory_counts_one_byte_per_weight_and_keeps_other_labels(run_bench):
    args = ("--rows", "chtss_mask_memory", "--set", "dtypes=[float32]", "--repeats", "1", "--label")
    result, out = run_bench("micro", *args, "a")
    (row,) = result["chtss_mask_memory"]["rows"]
    assert (row["label"], row["shape"], row["dtype"]) == ("a", "quick", "float32")
    assert row["bytes_per_weight"] == pytest.approx(1.0, abs=0.01)  # issue 7: a bool mask, nothing else
    result, out = run_bench("micro", *args, "b")  # a second label joins the file; a rerun label replaces
    labels = [r["label"] for r in result["chtss_mask_memory"]["rows"]]
    assert labels == [r["label"] for r in json.loads(out.read_text())["rows"]] == ["a", "b"]


@pytest.mark.slow
def test_scaling_memory_shards_what_fsdp2_shards(run_bench):
    result, out = run_bench("micro", "--rows", "scaling_memory")
    assert json.loads(out.read_text())["rows"] == result["scaling_memory"]["rows"]
    rows = {(r["method"], r["world"]): r for r in result["scaling_memory"]["rows"]}
    methods = {m for m, _ in rows}
    sst = sorted(m for m in methods if m.startswith("sst"))
    assert {"dense", "chtss d=0.3"} <= methods and len(sst) == 4  # 2 ranks x (float32, bfloat16)
    for method in methods:
        for part in ("params", "grads", "moments"):  # dim-0 shards: an eighth, up to padding
            assert rows[(method, 8)][part] == pytest.approx(rows[(method, 1)][part] / 8, rel=0.02)
    chtss1, chtss8 = rows[("chtss d=0.3", 1)], rows[("chtss d=0.3", 8)]
    assert 0 < chtss1["method_state"] < chtss1["params"] / 4  # 1 byte per weight against 4
    assert chtss8["method_state"] == pytest.approx(chtss1["method_state"] / 8, rel=0.02)
    assert chtss8["update_transient"] == chtss1["update_transient"] > 0  # whole masks: not sharded
    for method in sst:
        one, eight = rows[(method, 1)], rows[(method, 8)]
        assert one["frozen_U_Vh_GiB"] > 0
        assert one["frozen_U_Vh_per_gpu_GiB"] == pytest.approx(one["frozen_U_Vh_GiB"])
        assert eight["frozen_U_Vh_per_gpu_GiB"] == pytest.approx(one["frozen_U_Vh_GiB"] / 8, rel=0.02)
        assert eight["method_state"] == one["method_state"] < one["params"] / 100  # replicated buffers
        assert one["grads"] < rows[("dense", 1)]["grads"]
    for r in {rows[(m, 1)]["r"] for m in sst}:
        f32, bf16 = rows[(f"sst r={r} float32", 1)], rows[(f"sst r={r} bfloat16", 1)]
        assert bf16["frozen_U_Vh_GiB"] == pytest.approx(f32["frozen_U_Vh_GiB"] / 2, rel=1e-6)
        assert bf16["grads"] == f32["grads"]  # the trainable factors stay float32


@pytest.mark.slow
def test_sst_generate_reports_ratios_and_identical_outputs(run_bench):
    result, out = run_bench("micro", "--rows", "sst_generate", "--repeats", "1")
    res = result["sst_generate"]
    assert json.loads(out.read_text())["ratio_sst_vs_merged"] == res["ratio_sst_vs_merged"] > 0
    assert res["tokens_identical"] and res["max_logit_diff_sst_vs_uncached"] == 0.0
    assert res["max_logit_diff_sst_vs_merged"] <= 1e-5
    assert [r["variant"] for r in res["rows"]] == ["merged", "sst", "sst_uncached"]
