"""Rank planning (allocation.module_ranks): GPU default rounds ranks down to a multiple of 8."""

from __future__ import annotations

import pytest
import torch

from leanformers.compressors.allocation import default_rank_multiple, module_ranks
from leanformers.storage.rank import lowrank_num_params, pifa_num_params

# SmolLM2-135M's shapes (q 576x576, k/v 192x576, up 1536x576, down 576x1536) and awkward ones.
SHAPES = {
    "q": (576, 576),
    "k": (192, 576),
    "up": (1536, 576),
    "down": (576, 1536),
    "odd": (97, 131),
    "tiny": (12, 20),
}


@pytest.mark.parametrize("kind", ["pifa", "lowrank"])
@pytest.mark.parametrize("density", [0.3, 0.5, 0.8, 0.95])
def test_gpu_default_rounds_down_to_multiples_of_8_within_budget(kind, density):
    densities = dict.fromkeys(SHAPES, density)
    count = pifa_num_params if kind == "pifa" else lowrank_num_params
    exact = module_ranks(SHAPES, densities, kind=kind, rank_multiple=1)
    for device in ("cuda", torch.device("cuda:1")):
        ranks = module_ranks(SHAPES, densities, kind=kind, device=device)
        for name, (m, n) in SHAPES.items():
            r = ranks[name]
            assert 1 <= r <= exact[name], (name, r, exact[name])
            assert count(m, n, r) <= density * m * n  # never over the budget
            if exact[name] >= 8:
                assert r % 8 == 0 and exact[name] - r < 8, (name, r, exact[name])  # the largest multiple
            else:
                assert r == exact[name]  # no positive multiple fits: keep the exact rank


def test_cpu_default_is_unchanged_and_an_explicit_multiple_wins():
    densities = dict.fromkeys(SHAPES, 0.5)
    exact = module_ranks(SHAPES, densities, rank_multiple=1)
    assert module_ranks(SHAPES, densities) == exact  # default device is the CPU
    assert module_ranks(SHAPES, densities, device="cpu") == exact
    assert any(r % 8 for r in exact.values())  # the test would see a rounding
    assert module_ranks(SHAPES, densities, device="cuda", rank_multiple=1) == exact
    assert all(
        r % 16 == 0
        for r in module_ranks(SHAPES, densities, device="cpu", rank_multiple=16).values()
        if r >= 16
    )
    assert default_rank_multiple("cuda:0") == 8 and default_rank_multiple("cpu") == 1


# ---- allocation="spectrum": ranks from the whitened spectra (allocation.spectrum_ranks) -------------


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_whitened_spectrum_is_the_squared_singular_values_of_w_l(shape):
    from leanformers.compressors.allocation import whitened_spectrum

    g = torch.Generator().manual_seed(0)
    W = torch.randn(*shape, generator=g, dtype=torch.float64)
    X = (
        torch.randn(shape[1], 300, generator=g, dtype=torch.float64)
        * torch.linspace(0.1, 3, shape[1])[:, None]
    )
    S = X @ X.T
    L = torch.linalg.cholesky(S)
    expected = torch.linalg.svdvals(W @ L) ** 2
    assert torch.allclose(whitened_spectrum(W, S), expected, rtol=1e-9)
    assert torch.allclose(whitened_spectrum(W, None), torch.linalg.svdvals(W) ** 2, rtol=1e-9)


def _spectra(shapes, decay):
    """Synthetic spectra: sigma_i^2 = decay_key^i (a fast decay is a nearly low-rank linear)."""
    return {k: decay[k] ** torch.arange(min(m, n), dtype=torch.float64) for k, (m, n) in shapes.items()}


@pytest.mark.parametrize("kind", ["pifa", "lowrank"])
@pytest.mark.parametrize("multiple", [1, 8])
def test_spectrum_ranks_keep_budget_and_bounds_and_follow_the_spectra(kind, multiple):
    from leanformers.compressors.allocation import spectrum_bounds, spectrum_ranks

    shapes = {"flat": (576, 576), "steep": (576, 576), "k": (192, 576), "down": (576, 1536)}
    spectra = _spectra(shapes, {"flat": 0.999, "steep": 0.9, "k": 0.99, "down": 0.995})
    density = 0.5
    count = pifa_num_params if kind == "pifa" else lowrank_num_params
    ranks = spectrum_ranks(spectra, shapes, density, kind=kind, rank_multiple=multiple)
    budget = density * sum(m * n for m, n in shapes.values())
    spent = sum(count(*shapes[k], r) for k, r in ranks.items())
    assert spent <= budget
    # the greedy stops only when no further step fits: the unspent part is below the largest step
    assert budget - spent < max(multiple * (m + n) for m, n in shapes.values())
    lo, hi = spectrum_bounds(density)
    for k, (m, n) in shapes.items():
        step = multiple * (m + n) / (m * n)  # the bounds' ranks are rounded down to the multiple
        assert lo - step <= count(m, n, ranks[k]) / (m * n) <= hi
        if multiple > 1:
            assert ranks[k] % multiple == 0
    # a flat spectrum needs rank, a steep one does not: same shape, different ranks
    assert ranks["flat"] > ranks["steep"]
    uniform = module_ranks(shapes, dict.fromkeys(shapes, density), kind=kind, rank_multiple=multiple)
    assert ranks != uniform


def test_spectrum_allocation_end_to_end_keeps_the_budget_and_is_refused_with_owl():
    from leanformers.compressors.mpifa import MPIFAConfig, mpifa_compress
    from tests.tiny_models import random_ids, tiny_llama

    calib = random_ids(8, 32, seed=1)
    model = tiny_llama(layers=3, hidden=96, intermediate=160)
    config = MPIFAConfig(density=0.5, allocation="spectrum", batch_size=4)
    report = mpifa_compress(model, None, config, calib, progress=False)
    densities = [m.target_density for m in report.modules]
    assert len({round(d, 4) for d in densities}) > 3  # the linears got different densities
    assert 0.45 < report.achieved_density <= 0.5
    assert model.config.quantization_config.extra["allocation"] == "spectrum"
    for bad in (dict(owl=True), dict(attn_density=0.6)):
        with pytest.raises(ValueError, match="allocation='spectrum' sets every linear's density"):
            MPIFAConfig(density=0.5, allocation="spectrum", **bad)
    with pytest.raises(ValueError, match="allocation must be one of \\['spectrum', 'uniform'\\]"):
        MPIFAConfig(allocation="owl")
