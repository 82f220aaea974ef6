"""Soft (Gumbel-top-k) and hard selection: exact counts, proportionality, no underflow, large inputs."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from leanformers.chts.sampling import select, select_mask


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_exact_counts_per_row_and_only_candidates(mode):
    scores = torch.rand(4, 500, generator=gen(1))
    candidates = torch.rand(4, 500, generator=gen(2)) < 0.6
    k = torch.tensor([0, 10, 100, 250])
    chosen, filled = select_mask(scores, k, candidates, mode, 3.0, gen(3))
    assert chosen.sum(1).tolist() == k.tolist()
    assert not (chosen & ~candidates).any()
    assert filled == 0


def test_soft_sampling_is_proportional_to_score_power_temperature():
    # One draw out of three entries, many times: frequencies follow score**T / sum.
    scores = torch.tensor([[1.0, 2.0, 4.0]])
    for temperature in (1.0, 2.0):
        counts = torch.zeros(3)
        g = gen(7)
        for _ in range(3000):
            chosen, _ = select_mask(scores, 1, None, "soft", temperature, g)
            counts += chosen[0].float()
        expected = scores[0] ** temperature / (scores[0] ** temperature).sum()
        torch.testing.assert_close(counts / counts.sum(), expected, atol=0.03, rtol=0)


def test_no_underflow_at_temperature_nine():
    # score**9 of 1e-6 is 1e-54: 0 in float32. In log space the ratio 2**9 = 512 survives.
    scores = torch.tensor([[1e-6, 2e-6]])
    picks = torch.zeros(2)
    g = gen(0)
    for _ in range(600):
        chosen, filled = select_mask(scores, 1, None, "soft", 9.0, g)
        picks += chosen[0].float()
        assert filled == 0
    assert picks[1] > 590  # p = 512 / 513


def test_hard_takes_the_largest_and_breaks_ties_at_random():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.2]])
    chosen, _ = select_mask(scores, 2, None, "hard", 1.0, gen(0))
    assert chosen[0].nonzero().flatten().tolist() == [1, 3]
    ties = torch.ones(1, 100)
    first = [int(select_mask(ties, 1, None, "hard", 1.0, gen(s))[0][0].nonzero()) for s in range(30)]
    assert len(set(first)) > 10  # not always the first index of the tie


def test_uniform_fill_when_too_few_positive_scores(caplog):
    scores = torch.zeros(1, 1000)
    scores[0, :5] = 1.0
    chosen, filled = select_mask(scores, 50, None, "soft", 1.0, gen(0))
    assert chosen.sum() == 50 and filled == 45
    assert chosen[0, :5].all()
    # The fill is uniform among the rest, not the first indices of a tie order.
    rest = chosen[0, 5:].nonzero().flatten()
    assert rest.max() > 500 and rest.min() < 500


def test_too_many_requested_is_a_clear_error():
    with pytest.raises(ValueError, match="asked for 5 entries but only 3 candidates"):
        select_mask(torch.ones(1, 10), 5, torch.arange(10)[None] < 3)
    with pytest.raises(ValueError, match=r"mode='.*' is not one of \('soft', 'hard'\)"):
        select_mask(torch.ones(1, 10), 1, mode="top")


def test_same_generator_seed_same_selection():
    scores = torch.rand(1, 2000, generator=gen(0))
    a, _ = select_mask(scores, 300, None, "soft", 2.0, gen(42))
    b, _ = select_mask(scores, 300, None, "soft", 2.0, gen(42))
    assert torch.equal(a, b)


@pytest.mark.slow
def test_soft_sampling_on_a_4096_by_11008_matrix():
    # 45M entries > 2**24 (torch.multinomial's limit); 30 % density, keep 90 % of the active links at T = 9.
    torch.manual_seed(0)
    weight = torch.randn(4096, 11008)
    mask = torch.rand(4096, 11008) < 0.3
    n_keep = int(0.9 * int(mask.sum()))
    start = time.perf_counter()
    chosen, filled = select(weight.abs(), n_keep, mask, "soft", 9.0, gen(0))
    elapsed = time.perf_counter() - start
    logging.getLogger(__name__).info("soft sampling 4096x11008: %.2f s", elapsed)
    assert int(chosen.sum()) == n_keep and filled == 0
    assert not (chosen & ~mask).any()
    # Soft at T = 9 strongly prefers large weights: kept links are larger on average than removed ones.
    assert weight.abs()[chosen].mean() > weight.abs()[mask & ~chosen].mean()
