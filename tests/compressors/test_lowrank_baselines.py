"""The low-rank baselines (svd, svd-llm, asvd) on tiny models: the factors each method promises, the
budget, and the storage option."""

from __future__ import annotations

import copy

import pytest
import torch

from leanformers import ASVDConfig, SVDConfig, SVDLLMConfig, compress
from leanformers.compression.layout import find_layout, linear_weight
from leanformers.compressors.asvd import asvd_factors
from leanformers.storage.layers import LowRankLinear, PIFALinear
from tests.tiny_models import ALL_CAUSAL, random_ids, tiny_llama

CALIB = random_ids(8, 32, seed=1)


def _first_block_inputs(model, name: str) -> torch.Tensor:
    """(tokens, in) inputs of ``name`` in block 0 of the dense model on CALIB, by a forward hook."""
    _, blocks = find_layout(model)
    seen = []
    handle = blocks[0].get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        for batch in CALIB.split(4):
            model(input_ids=batch)
    handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in seen]).double()


def test_svd_layers_are_the_truncated_svd_and_need_no_data():
    dense = tiny_llama()
    model = copy.deepcopy(dense)
    report = compress(model, None, SVDConfig(density=0.5), calibration=None, progress=False)
    assert report.calibration_tokens == 0 and report.method == "svd"
    assert 0.45 <= report.achieved_density <= 0.5
    layer = model.model.layers[1].mlp.up_proj
    assert isinstance(layer, LowRankLinear)
    W = dense.model.layers[1].mlp.up_proj.weight.detach().double()
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    r = layer.rank
    best = (U[:, :r] * s[:r]) @ Vh[:r]
    assert torch.allclose(layer.dense_weight().double(), best, atol=1e-5)
    assert model.config.quantization_config.extra["method"] == "svd"


def test_pifa_storage_keeps_the_function_at_a_higher_rank():
    lowrank, pifa = tiny_llama(), tiny_llama()
    compress(lowrank, None, SVDConfig(density=0.5), progress=False)
    compress(pifa, None, SVDConfig(density=0.5, output="pifa"), progress=False)
    a, b = lowrank.model.layers[0].self_attn.q_proj, pifa.model.layers[0].self_attn.q_proj
    assert isinstance(b, PIFALinear) and b.rank > a.rank  # PIFA stores r(m+n) - r^2: more rank per byte
    assert b.num_parameters <= 0.5 * b.in_features * b.out_features


def test_svd_llm_minimises_the_output_error_on_the_dense_inputs():
    """Truncating W L (S = X X^T = L L^T) is optimal for ||W X - U V X||_F: its error is the tail of the
    whitened spectrum, and below plain SVD's at the same rank. The U update can only lower it."""
    dense = tiny_llama()
    X = _first_block_inputs(dense, "self_attn.q_proj")
    W = linear_weight(dense.model.layers[0].self_attn.q_proj).detach().double()
    errors = {}
    for name, config in {
        "svd": SVDConfig(density=0.4),
        "svd-llm": SVDLLMConfig(density=0.4, nsamples=8, seqlen=32, batch_size=4),
        "svd-llm+U": SVDLLMConfig(density=0.4, nsamples=8, seqlen=32, batch_size=4, u_update=True),
    }.items():
        model = copy.deepcopy(dense)
        compress(model, None, config, calibration=CALIB, progress=False)
        layer = model.model.layers[0].self_attn.q_proj
        errors[name] = float((X @ (W - layer.dense_weight().double()).T).norm())
        rank = layer.rank
    sigma2 = torch.linalg.eigvalsh(W @ (X.T @ X) @ W.T).flip(0).clamp_min(0)
    optimum = float(sigma2[rank:].sum().sqrt())
    assert errors["svd-llm"] == pytest.approx(optimum, rel=1e-4)
    assert errors["svd-llm"] < 0.9 * errors["svd"]
    assert errors["svd-llm+U"] <= errors["svd-llm"] * (1 + 1e-6)


def test_asvd_uses_the_mean_absolute_inputs_of_the_dense_model():
    dense = tiny_llama()
    X = _first_block_inputs(dense, "mlp.gate_proj")
    model = copy.deepcopy(dense)
    compress(model, None, ASVDConfig(density=0.5, nsamples=8, seqlen=32, batch_size=4), CALIB, progress=False)
    layer = model.model.layers[0].mlp.gate_proj
    W = dense.model.layers[0].mlp.gate_proj.weight.detach()
    U, V = asvd_factors(W, X.abs().mean(0), layer.rank, 0.5)
    assert torch.allclose(layer.dense_weight().double(), U @ V, atol=1e-5)


@pytest.mark.parametrize("family", list(ALL_CAUSAL))
@pytest.mark.parametrize(
    "config", [SVDLLMConfig(density=0.6), ASVDConfig(density=0.6)], ids=["svd-llm", "asvd"]
)
def test_low_rank_baselines_keep_the_budget_on_every_family(family, config):
    model = ALL_CAUSAL[family]()
    config = copy.deepcopy(config)
    config.nsamples, config.seqlen, config.batch_size = 8, 32, 4
    report = compress(model, None, config, calibration=CALIB, progress=False)
    assert all(m.stored_params <= 0.6 * m.dense_params for m in report.modules)
    assert report.achieved_density >= 0.5 and all(m.kind == "lowrank" for m in report.modules)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=CALIB[:2]).logits).all()


def test_configs_refuse_bad_numbers():
    with pytest.raises(ValueError, match="density must lie in"):
        SVDConfig(density=0.0)
    with pytest.raises(ValueError, match="scaling_exponent must be > 0"):
        ASVDConfig(scaling_exponent=-1.0)
    with pytest.raises(ValueError, match="output must be 'pifa' or 'lowrank'"):
        SVDLLMConfig(output="dense")
