"""Initial topologies: exact counts, BRF locality, ERK budget, sparse init scale."""

from __future__ import annotations

import math

import pytest
import torch

from leanformers.chts.topology import brf_mask, er_mask, erk_densities, link_count, sparse_init_


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "shape,density", [((64, 96), 0.3), ((784, 1568), 0.01), ((10, 1568), 0.01), ((3, 5), 0.5)]
)
def test_er_and_brf_hold_exact_link_counts(shape, density):
    k = link_count(shape, density)
    assert int(er_mask(shape, density, gen()).sum()) == k
    for r in (0.0, 0.25, 1.0):
        assert int(brf_mask(shape, density, r, gen()).sum()) == k


def ring_distance_of_links(mask: torch.Tensor) -> float:
    n_small, n_large = mask.shape
    centres = (torch.arange(n_small) * max(1, n_large // n_small)) % n_large
    diff = (torch.arange(n_large)[None] - centres[:, None]).abs()
    ring = torch.minimum(diff, n_large - diff).float()
    return float(ring[mask].mean())


def test_brf_randomness_moves_from_nearest_neighbours_to_uniform():
    shape, density = (32, 256), 0.05
    near = brf_mask(shape, density, 0.0, gen())
    mid = brf_mask(shape, density, 0.25, gen())
    uniform = brf_mask(shape, density, 1.0, gen())
    d_near, d_mid, d_uniform = (ring_distance_of_links(m) for m in (near, mid, uniform))
    # Degree 12 per node: nearest neighbours are within ring distance 6.
    assert d_near <= 3.5
    assert d_near < d_mid < d_uniform
    assert d_uniform == pytest.approx(64, rel=0.2)  # mean ring distance of uniform picks is n/4
    # The tall orientation is the transpose of the wide one.
    assert brf_mask((256, 32), density, 0.0, gen()).shape == (256, 32)


def test_erk_densities_keep_the_global_budget_and_favour_small_layers():
    shapes = [(1568, 784), (1568, 1568), (1568, 1568), (10, 1568)]
    dens = erk_densities(shapes, 0.01)
    total = sum(o * i for o, i in shapes)
    assert sum(d * o * i for d, (o, i) in zip(dens, shapes)) == pytest.approx(0.01 * total)
    assert dens[3] > dens[0] > dens[1]
    capped = erk_densities([(4, 4), (1000, 1000)], 0.5)
    assert capped[0] == 1.0


def test_sparse_init_rescales_by_density():
    weight = torch.empty(512, 1000)
    mask = er_mask((512, 1000), 0.02, gen())
    sparse_init_(weight, mask, gen(1))
    assert (weight[~mask] == 0).all()
    assert float(weight[mask].std()) == pytest.approx(math.sqrt(2 / (0.02 * 1000)), rel=0.05)
