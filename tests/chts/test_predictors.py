"""Link predictors: exact L3p against brute-force path enumeration, L3n against exact L3p."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import spearmanr

from leanformers.chts.predictors import (
    gradient_scores,
    l3n_scores,
    l3p_scores,
    l3p_scores_dense,
    mest_scores,
    random_scores,
    relative_importance,
)


def brute_force_ch_l3(mask: torch.Tensor, variant: str) -> torch.Tensor:
    """Enumerate every length-3 path o - i1 - o1 - i with Python sets (independent of the GEMM code).

    The local community of a candidate is the set of intermediate nodes of its L3 paths; di(z) is the
    number of links from z to other local-community nodes, de(z) = deg(z) - di(z) - 1.
    """
    n_out, n_in = mask.shape
    nbr_out = [set(torch.nonzero(mask[o]).flatten().tolist()) for o in range(n_out)]  # inputs of o
    nbr_in = [set(torch.nonzero(mask[:, i]).flatten().tolist()) for i in range(n_in)]  # outputs of i
    scores = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        for i in range(n_in):
            if mask[o, i]:
                continue
            paths = [(i1, o1) for i1 in nbr_out[o] for o1 in nbr_in[i] if i1 in nbr_out[o1]]
            if not paths:
                continue
            lc_in = {i1 for i1, _ in paths}
            lc_out = {o1 for _, o1 in paths}
            total = 0.0
            for i1, o1 in paths:
                di1 = len(nbr_in[i1] & lc_out)
                di2 = len(nbr_out[o1] & lc_in)
                de1 = len(nbr_in[i1]) - di1 - 1
                de2 = len(nbr_out[o1]) - di2 - 1
                if variant == "CH2":
                    total += math.sqrt((1 + di1) * (1 + di2)) / math.sqrt((1 + de1) * (1 + de2))
                else:
                    total += 1.0 / math.sqrt((1 + de1) * (1 + de2))
            scores[o, i] = total
    return scores


@pytest.mark.parametrize("variant", ["CH2", "CH3"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_l3p_matches_brute_force_enumeration(variant, seed):
    g = torch.Generator().manual_seed(seed)
    shape = [(7, 9), (10, 6), (8, 8)][seed]
    mask = torch.rand(shape, generator=g) < 0.35
    expected = brute_force_ch_l3(mask, variant)
    assert expected.abs().sum() > 0
    # Path enumeration in several chunks (max_paths) and the dense oracle in several row chunks.
    torch.testing.assert_close(
        l3p_scores(mask, variant, max_paths=7).double(), expected, rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        l3p_scores_dense(mask, variant, chunk=3).double(), expected, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("density", [0.05, 0.1, 0.2, 0.3])
@pytest.mark.parametrize("shape", [(40, 60), (64, 32)])
def test_l3n_rank_agreement_with_exact_on_non_links(density, shape):
    g = torch.Generator().manual_seed(int(density * 100) + shape[0])
    mask = torch.rand(shape, generator=g) < density
    non_links = ~mask
    exact = l3p_scores(mask, "CH2")[non_links]
    approx = l3n_scores(mask, "CH2")[non_links]
    rho = spearmanr(exact.numpy(), approx.numpy()).statistic
    assert rho >= 0.95, f"Spearman {rho:.3f} at density {density}, shape {shape}"


def test_l3n_chunked_and_batched_equal_plain():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 50, 70, generator=g) < 0.2
    batched = l3n_scores(masks, "CH2", chunk=4096)
    chunked = l3n_scores(masks, "CH2", chunk=7)
    for b in range(3):
        single = l3n_scores(masks[b], "CH2")
        torch.testing.assert_close(batched[b], single)
        torch.testing.assert_close(chunked[b], single)


@pytest.mark.parametrize("variant", ["CH2", "CH3", "CH3.1"])
def test_l3n_zero_on_links_and_on_isolated_nodes(variant):
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(30, 40, generator=g) < 0.2
    mask[5] = False  # output node 5 has degree 0
    mask[:, 7] = False  # input node 7 has degree 0
    scores = l3n_scores(mask, variant)
    assert scores.dtype == torch.float32
    assert (scores[mask] == 0).all()
    assert (scores[5] == 0).all() and (scores[:, 7] == 0).all()  # dead neurons stay dead
    assert (scores >= 0).all() and scores.sum() > 0


def test_l3n_node_formula_on_a_hand_built_graph():
    # Candidate (0, 2): path 0 - i0 - o1 - 2. o1 overlaps o0 on {i0}: DD = 1, deg(o1) = 2 -> E = 0.
    # Input side: i0's overlap with i2 is {o1}: TT = 1, deg(i0) = 2 -> E = 0. CH2 = (1+1)/1 + (1+1)/1.
    mask = torch.tensor([[1, 0, 0], [1, 0, 1]], dtype=torch.bool)
    scores = l3n_scores(mask, "CH2")
    assert scores[0, 2].item() == pytest.approx(4.0)
    assert l3n_scores(mask, "CH3")[0, 2].item() == pytest.approx(2.0)


def test_unknown_variant_and_bad_shape_are_refused():
    with pytest.raises(ValueError, match="unknown CH variant"):
        l3n_scores(torch.ones(3, 3, dtype=torch.bool), "CH9")
    with pytest.raises(ValueError, match="mask must be"):
        l3n_scores(torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="supports CH2, CH3 and CH3.1"):
        l3p_scores(torch.ones(3, 3, dtype=torch.bool), "CH3.1_official")


def test_relative_importance_formula():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    ri = relative_importance(w)
    expected = torch.tensor([[1 / 4 + 1 / 3, 2 / 2 + 2 / 3], [3 / 4 + 3 / 3, 0.0]])
    torch.testing.assert_close(ri, expected)


def test_baseline_scores():
    mask = torch.tensor([[True, False], [False, False]])
    grad = torch.tensor([[5.0, -1.0], [2.0, 0.5]])
    assert gradient_scores(grad, mask).tolist() == [[0.0, 1.0], [2.0, 0.5]]
    assert random_scores(mask).tolist() == [[0.0, 1.0], [1.0, 1.0]]
    torch.testing.assert_close(
        mest_scores(torch.tensor([[-1.0]]), torch.tensor([[2.0]]), 0.5), torch.tensor([[2.0]])
    )
