"""bench/compression_cost.py --quick: one compression timed, streamed (peak RSS), and profiled by stage."""

from __future__ import annotations

import json

import pytest

from tests.bench.conftest import load_bench


@pytest.mark.slow
def test_time_row_times_one_compression_through_the_package(run_bench, capsys):
    result, out = run_bench("compression_cost", "--rows", "smollm2")
    saved = json.loads(out.read_text())
    row = result["smollm2"]["row"]
    assert saved["row"] == row and row["calibration"] == "8 x 64" and float(row["wall time (s)"]) > 0
    assert float(row["peak host RSS (GB)"]) > 0
    assert 0.4 <= float(row["density"]) <= 0.5 + 1e-9  # the asked density of the targeted linears, not more
    assert saved["report"]["achieved_density"] == pytest.approx(float(row["density"]), abs=1e-4)
    assert {"torch", "transformers", "cpu_threads", "date"} <= set(saved["env"])
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("tiny LLaMA (random)")


@pytest.mark.slow
def test_stream_row_measures_peak_rss_and_cleans_up(run_bench, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    shape = "model={hidden: 256, intermediate: 688, layers: 2, heads: 4}"
    result, out = run_bench("compression_cost", "--rows", "stream", "--set", shape, "--tmp", str(scratch))
    saved = json.loads(out.read_text())
    assert saved["row"] == result["stream"]["row"]
    assert saved["row"]["calibration"] == "4 x 128" and saved["row"]["offload"] == "disk"
    assert saved["peak_host_rss_bytes"] >= saved["rss_before_bytes"] > 0  # the process's high-water mark
    assert saved["model_bytes"] == 4 * saved["report"]["model_params_before"]  # float32, untied head
    assert list(scratch.iterdir()) == []  # the random model and the output were deleted


def test_random_llama_has_the_buffers_of_a_model_built_normally():
    """to_empty() leaves buffers as uninitialised memory (sometimes NaN: a flaky non-finite-activations
    failure of the GPU suite's dry run); the random model must carry RoPE's real inverse frequencies."""
    import torch
    from transformers import LlamaForCausalLM

    bench = load_bench("compression_cost")
    shape, dtype = bench.RANDOM_MODELS["tiny"]
    built = LlamaForCausalLM(bench.llama_config(**shape, max_positions=4096))
    for _ in range(3):  # a fresh allocation each time: garbage differs between tries
        model = bench.random_llama(shape, dtype)
        buffers = dict(model.named_buffers())
        assert buffers.keys() == dict(built.named_buffers()).keys()
        for name, expected in built.named_buffers():
            assert torch.equal(buffers[name], expected), name
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_profile_split_sums_each_stage_under_old_and_new_names():
    bench = load_bench("compression_cost")

    class Stats:  # (file, line, name) -> (cc, nc, tt, ct, callers), as pstats holds them
        stats = {
            ("a/reconstruct.py", 1, "accumulate_grams"): (1, 1, 2.0, 3.0, {}),
            ("a/reconstruct.py", 2, "gram"): (1, 1, 4.0, 4.0, {}),  # the strips' products (stop 31 on)
            ("b/group.py", 1, "group_input_stats"): (1, 1, 1.0, 9.0, {}),
            ("c/pifa_linear.py", 1, "forward"): (1, 1, 0.5, 4.0, {}),
            ("d/other.py", 1, "forward"): (1, 1, 0.5, 7.0, {}),
            ("e/kernels/layer/layer.py", 1, "new_forward"): (1, 1, 0.5, 8.0, {}),  # a hub kernel's MLP
            # the linears' fitting: its wall time on the main thread (the workers are not profiled)
            ("f/precision.py", 1, "map_single_threaded"): (1, 1, 0.1, 5.0, {}),
        }

    parts = bench.split_profile(Stats())
    assert parts["Gram products G, K, S (self time)"] == 7.0  # self times of all three names
    # only the PIFA layer's file
    assert parts["PIFALinear.forward (compressed stream, gathers included)"] == 4.0
    assert parts["fitting the linears (wall; a group's side by side)"] == 5.0


@pytest.mark.slow
@pytest.mark.integration
def test_profile_row_splits_a_smollm2_compression_by_stage(run_bench):
    result, out = run_bench("compression_cost", "--rows", "profile")
    saved = json.loads(out.read_text())
    assert saved["blocks"] == 2 and saved["dense_forward_seconds"] > 0
    assert saved["ratio_compress_to_dense_forward"] == pytest.approx(
        saved["compress_seconds"] / saved["dense_forward_seconds"], rel=1e-2
    )
    assert saved["seconds_by_part"]["  reconstruct (whitening SVD + M steps), main thread only"] > 0
    assert result["profile"]["seconds_by_part"] == saved["seconds_by_part"]
