"""bench/chts_predictor_cost.py: the --quick run (exact L3p vs node-based L3n by density)."""

import json

import pytest

from tests.bench.conftest import load_bench


def test_random_mask_has_the_exact_link_count():
    mask = load_bench("chts_predictor_cost").random_mask(40, 30, 0.1)
    assert mask.shape == (40, 30) and int(mask.sum()) == 120


@pytest.mark.slow
def test_quick_run_shows_l3p_cost_growing_with_density_and_l3n_flat(run_bench):
    result, out = run_bench("chts_predictor_cost", "--densities", "0.02", "0.2", "0.3")
    rows = json.loads(out.read_text())["rows"]
    assert rows == result["rows"]
    low, high, beyond = rows
    assert low["l3p"] == high["l3p"] == "measured" and beyond["l3p"].startswith("extrapolated")
    # the claim's direction, with a wide margin (about 400x expected for 10x the degree)
    assert high["l3p_s"] > 20 * low["l3p_s"]
    assert beyond["l3p_s"] == pytest.approx(
        high["l3p_s"] * (beyond["mean_degree"] / high["mean_degree"]) ** 3, rel=0.05
    )
