import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leanformers.storage.rank import lowrank_num_params, lowrank_rank, pifa_num_params, pifa_rank

dims = st.integers(min_value=1, max_value=5000)
densities = st.floats(min_value=1e-4, max_value=1.0, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(m=dims, n=dims, rho=densities)
def test_pifa_rank_is_the_largest_rank_within_budget(m, n, rho):
    r = pifa_rank(m, n, rho)
    assert 1 <= r <= min(m, n)
    budget = rho * m * n
    if pifa_num_params(m, n, r) > budget:
        assert r == 1  # clipped up to 1: nothing smaller exists
    if r < min(m, n):
        assert pifa_num_params(m, n, r + 1) > budget


@settings(max_examples=300, deadline=None)
@given(m=dims, n=dims, rho=densities)
def test_lowrank_rank_formula(m, n, rho):
    expected = max(1, min(math.floor(rho * m * n / (m + n)), m, n))
    r = lowrank_rank(m, n, rho)
    assert r == expected or (r == expected - 1 and lowrank_num_params(m, n, expected) > rho * m * n)


@settings(max_examples=200, deadline=None)
@given(
    m=st.integers(16, 5000),
    n=st.integers(16, 5000),
    rho=st.floats(0.05, 1.0),
    mult=st.sampled_from([8, 16, 64]),
)
def test_round_to_rounds_down_and_never_exceeds_budget(m, n, rho, mult):
    for fn, count in ((pifa_rank, pifa_num_params), (lowrank_rank, lowrank_num_params)):
        exact, rounded = fn(m, n, rho), fn(m, n, rho, round_to=mult)
        assert rounded <= exact
        if exact >= mult:
            assert rounded % mult == 0 and count(m, n, rounded) <= rho * m * n
        else:
            assert rounded == exact  # no positive multiple fits: keep the unrounded rank


def test_known_values_and_full_density():
    # LLaMA-7B q_proj at density 0.5: PIFA keeps more rank than low-rank (paper, Table 1 regime).
    assert lowrank_rank(4096, 4096, 0.5) == 1024
    r = pifa_rank(4096, 4096, 0.5)
    assert r == 1199 and pifa_num_params(4096, 4096, r) <= 0.5 * 4096 * 4096 < pifa_num_params(
        4096, 4096, r + 1
    )
    assert pifa_rank(64, 96, 1.0) == 64  # full rank at density 1
    assert lowrank_rank(64, 64, 1.0) == 32  # low-rank reaches only half
    assert pifa_rank(10, 10, 1e-6) == 1  # clipped up to 1


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_density_outside_unit_interval_is_rejected(bad):
    for fn in (pifa_rank, lowrank_rank):
        with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
            fn(64, 64, bad)


def test_bad_shapes_and_round_to_are_rejected():
    with pytest.raises(ValueError, match="positive integers"):
        pifa_rank(0, 64, 0.5)
    with pytest.raises(ValueError, match="round_to must be a positive integer"):
        lowrank_rank(64, 64, 0.5, round_to=0)
