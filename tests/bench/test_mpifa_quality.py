"""bench/mpifa_quality.py: the --quick smoke run (every row, conversion, MiniLM) and its baselines."""

import json

import pytest
import torch

from tests.bench.conftest import load_bench
from tests.tiny_models import random_ids, tiny_gpt2, tiny_llama


@pytest.fixture(scope="module")
def baselines():
    return load_bench("_baselines")


@pytest.mark.slow
def test_quick_run_writes_every_row_and_prints_the_table_last(run_bench, tmp_path, capsys):
    png = tmp_path / "ppl.png"
    result, out = run_bench("mpifa_quality", "--plot", str(png))
    saved = json.loads(out.read_text())
    assert result["cells"] == saved["cells"]  # main returns what it wrote
    cells = {(c["row"], c["density"]) for c in saved["cells"]}
    low = ["svd", "asvd", "svdllm_whiten", "svdllm_u", "pifa_only", "mpifa"]
    expected = {("dense", 1.0), ("wanda24", 0.5)} | {(r, d) for r in low for d in (0.5, 0.8)}
    assert cells == expected
    for c in saved["cells"]:
        assert c["ppl"] > 1 and c["predicted_tokens"] == 16 * 127
        # every compressed row stays within its parameter budget (and near it)
        if c["row"] != "dense":
            assert 0.9 * c["density"] <= c["achieved_density"] <= c["density"] + 1e-9, c
    assert {c["dtype"] for c in saved["conversion"]} == {"bfloat16", "float32"}
    fp32 = next(c for c in saved["conversion"] if c["dtype"] == "float32")
    assert fp32["change %"] < 0.01  # PIFA of the same factors is the same function in fp32
    assert {(m["row"], m["density"]) for m in saved["minilm"]} == {
        (r, d) for r in ("svd", "svdllm_whiten", "mpifa") for d in (0.5, 0.8)
    }
    assert all(0.5 < m["mean cosine"] <= 1.0001 for m in saved["minilm"])
    assert saved["targets"] and png.stat().st_size > 1000
    printed = capsys.readouterr().out.rstrip().splitlines()
    assert printed[-1].startswith("2:4 Wanda") and "ppl @ 0.5" in printed[-10]


def test_merge_keeps_cells_that_were_not_rerun(baselines):
    bench = load_bench("mpifa_quality")
    old = [{"row": "svd", "density": 0.8, "ppl": 3.0}, {"row": "mpifa", "density": 0.8, "ppl": 2.0}]
    new = [{"row": "mpifa", "density": 0.8, "ppl": 1.5}, {"row": "mpifa", "density": 0.5, "ppl": 4.0}]
    merged = bench._merge(old, new, lambda c: (c["row"], c["density"]))
    assert sorted((c["row"], c["density"], c["ppl"]) for c in merged) == [
        ("mpifa", 0.5, 4.0),
        ("mpifa", 0.8, 1.5),
        ("svd", 0.8, 3.0),
    ]
    lines = bench.targets(merged)
    assert lines[0].startswith("density 0.8: MPIFA 1.500") and "met" in lines[0] and "NOT" not in lines[0]


# ---- baselines: pure maths ----------------------------------------------------------------------
def test_semi_structured_mask_keeps_the_two_largest_of_every_four(baselines):
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 5.0, 6.0, -1.0]])
    keep = baselines.semi_structured_mask(scores)
    assert keep.tolist() == [[True, False, True, False, False, True, True, False]]
    rnd = baselines.semi_structured_mask(torch.rand(16, 64))
    assert (rnd.view(16, 16, 4).sum(-1) == 2).all()


def test_semi_structured_mask_rejects_width_not_multiple_of_m(baselines):
    with pytest.raises(ValueError, match="multiple of 4"):
        baselines.semi_structured_mask(torch.rand(3, 6))
    with pytest.raises(ValueError, match="0 < n <= m"):
        baselines.semi_structured_mask(torch.rand(3, 8), n=5, m=4)


def test_asvd_factors_exact_at_full_rank_and_scale_invariant_input(baselines):
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(24, 16, generator=gen)
    mean_abs = torch.rand(16, generator=gen) + 0.1
    U, V = baselines.asvd_factors(W, mean_abs, 16)
    assert torch.allclose(U @ V, W, atol=1e-5)
    # At lower rank the activation-weighted error is what ASVD minimises: it beats plain SVD on it.
    U, V = baselines.asvd_factors(W, mean_abs, 6)
    Us, S, Vh = torch.linalg.svd(W, full_matrices=False)
    plain = (Us[:, :6] * S[:6]) @ Vh[:6]
    scale = mean_abs.sqrt()
    assert ((U @ V - W) * scale).norm() < ((plain - W) * scale).norm()


def test_asvd_factors_errors_name_the_problem(baselines):
    with pytest.raises(ValueError, match="mean_abs"):
        baselines.asvd_factors(torch.rand(4, 6), torch.rand(4), 2)
    with pytest.raises(ValueError, match="rank must lie in"):
        baselines.asvd_factors(torch.rand(4, 6), torch.rand(6), 5)


def _correlated_inputs(tokens: int, width: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=gen) / width**0.5 + torch.eye(width)
    return torch.randn(tokens, width, generator=gen) @ mix * (torch.rand(width, generator=gen) * 3 + 0.1)


def test_sparsegpt_with_uncorrelated_equal_inputs_is_magnitude_pruning(baselines):
    W = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    pruned = baselines.sparsegpt_prune_weight(W, 5.0 * torch.eye(16))
    # H ~ I: nothing to compensate through, so the survivors are the 2 largest |w| of each 4, unchanged
    expected = W * baselines.semi_structured_mask(W.abs())
    assert torch.allclose(pruned.float(), expected, atol=1e-6)


def test_sparsegpt_lazy_batches_give_the_column_by_column_result(baselines):
    X = _correlated_inputs(256, 32)
    W = torch.randn(12, 32, generator=torch.Generator().manual_seed(2))
    one_group = baselines.sparsegpt_prune_weight(W, X.T @ X, blocksize=4)
    whole = baselines.sparsegpt_prune_weight(W, X.T @ X, blocksize=128)
    assert torch.allclose(one_group, whole, atol=1e-9)


def test_sparsegpt_beats_wanda_on_the_output_error_it_minimises(baselines):
    X = _correlated_inputs(512, 64)
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    G = X.T @ X
    sparse = baselines.sparsegpt_prune_weight(W, G).float()
    assert ((sparse != 0).reshape(32, 16, 4).sum(-1) == 2).all()
    wanda = W * baselines.semi_structured_mask(W.abs() * torch.diag(G).sqrt()[None, :])
    err_sparsegpt = ((sparse - W) @ X.T).norm()
    err_wanda = ((wanda - W) @ X.T).norm()
    assert err_sparsegpt < 0.9 * err_wanda, (err_sparsegpt, err_wanda)


def test_sparsegpt_errors_name_the_problem(baselines):
    with pytest.raises(ValueError, match=r"H must be \(8, 8\)"):
        baselines.sparsegpt_prune_weight(torch.rand(4, 8), torch.eye(6))
    with pytest.raises(ValueError, match="multiples of m=4"):
        baselines.sparsegpt_prune_weight(torch.rand(4, 6), torch.eye(6))


# ---- baselines: glue on tiny models -------------------------------------------------------------
@pytest.mark.parametrize("pruner", ["wanda_2_4_prune", "sparsegpt_2_4_prune"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_2_4_pruners_prune_exactly_half_in_2_of_4_groups(baselines, make, pruner):
    model = make()
    layout_paths = load_bench("mpifa_quality").targeted_paths(model)
    stats = getattr(baselines, pruner)(model, random_ids(4, 16), batch_size=2)
    assert stats["targeted_after"] * 2 == stats["targeted_before"]
    for path in layout_paths:
        from leanformers.compression.layout import linear_weight

        W = linear_weight(model.get_submodule(path))
        nonzero = (W != 0).reshape(W.shape[0], -1, 4).sum(-1)
        assert (nonzero <= 2).all(), path
    assert torch.isfinite(model(random_ids(1, 8)).logits).all()


def test_wanda_scores_use_input_norms_of_the_pruned_model(baselines):
    """A huge input feature must survive pruning even where its weight is small (|W| alone would drop it)."""
    model = tiny_llama()
    q = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1000.0  # feature 0 dominates every norm...
        model.model.layers[0].input_layernorm.weight.fill_(1.0)
        q.weight[:, 0] = 1e-3  # ...while its weights are the smallest of their group
    baselines.wanda_2_4_prune(model, random_ids(2, 16), batch_size=2)
    assert (q.weight[:, 0] != 0).all()


def test_asvd_compress_meets_the_lowrank_budget(baselines):
    from leanformers import LowRankLinear

    model = tiny_llama()
    stats = baselines.asvd_compress(model, random_ids(4, 16), 0.5, batch_size=2)
    assert 0.45 <= stats["targeted_after"] / stats["targeted_before"] <= 0.5
    assert isinstance(model.model.layers[1].mlp.down_proj, LowRankLinear)
    assert torch.isfinite(model(random_ids(1, 8)).logits).all()
