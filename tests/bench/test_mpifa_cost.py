"""bench/mpifa_cost.py --quick: one timed MPIFA compression of a tiny random LLaMA, row and report saved."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_mpifa_cost_quick_times_one_compression(run_bench, capsys):
    result, out = run_bench("mpifa_cost")
    saved = json.loads(out.read_text())
    assert saved["row"] == result["row"]
    row = result["row"]
    assert row["calibration"] == "8 x 64" and float(row["wall time (s)"]) > 0
    assert float(row["peak host RSS (GB)"]) > 0
    # the tiny LLaMA reaches the requested density of its targeted linears (0.5), not more
    assert 0.4 <= float(row["density"]) <= 0.5 + 1e-9
    assert saved["report"]["achieved_density"] == pytest.approx(float(row["density"]), abs=1e-4)
    assert {"torch", "transformers", "cpu_threads", "date"} <= set(saved["env"])
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("tiny LLaMA (random)")


@pytest.mark.slow
def test_mpifa_cost_stream_quick_measures_peak_rss_and_cleans_up(run_bench, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    result, out = run_bench("mpifa_cost", "--stream", "--layers", "2", "--tmp", str(scratch))
    saved = json.loads(out.read_text())
    assert saved["row"] == result["row"]
    row = result["row"]
    assert row["calibration"] == "4 x 128" and row["offload"] == "disk"
    # the measured peak is the process's own high-water mark, at least what it held before the call
    assert saved["peak_host_rss_bytes"] >= saved["rss_before_bytes"] > 0
    # the random checkpoint holds every parameter once, in float32 (untied head)
    assert saved["model_bytes"] == 4 * saved["report"]["model_params_before"]
    assert list(scratch.iterdir()) == []  # the random model and the output were deleted
