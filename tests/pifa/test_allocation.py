"""Rank planning (allocation.module_ranks): GPU default rounds ranks down to a multiple of 8."""

from __future__ import annotations

import pytest
import torch

from leanformers.pifa.allocation import default_rank_multiple, module_ranks
from leanformers.pifa.rank import lowrank_num_params, pifa_num_params

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
