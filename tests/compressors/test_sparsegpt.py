"""2:4 SparseGPT: the OBS column sweep (pure maths) and the compressor on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch

from leanformers import SparseGPTConfig, WandaConfig, compress
from leanformers.compression.layout import find_layout, linear_weight
from leanformers.compressors.semistructured import semi_structured_mask
from leanformers.compressors.sparsegpt import sparsegpt_prune_weight
from leanformers.storage.sparsity import semi_structured_counts
from tests.tiny_models import random_ids, tiny_gpt2, tiny_llama

CALIB = random_ids(8, 32, seed=1)


def _correlated_inputs(tokens: int, width: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=gen) / width**0.5 + torch.eye(width)
    return torch.randn(tokens, width, generator=gen) @ mix * (torch.rand(width, generator=gen) * 3 + 0.1)


def test_with_uncorrelated_equal_inputs_it_is_magnitude_pruning():
    W = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    pruned = sparsegpt_prune_weight(W, 5.0 * torch.eye(16))
    # H ~ I: nothing to compensate through, so the survivors are the 2 largest |w| of each 4, unchanged
    assert torch.allclose(pruned.float(), W * semi_structured_mask(W.abs()), atol=1e-6)


def test_lazy_batches_give_the_column_by_column_result():
    X = _correlated_inputs(256, 32)
    W = torch.randn(12, 32, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(
        sparsegpt_prune_weight(W, X.T @ X, blocksize=4), sparsegpt_prune_weight(W, X.T @ X), atol=1e-9
    )


def test_it_beats_wanda_on_the_output_error_it_minimises():
    X = _correlated_inputs(512, 64)
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    G = X.T @ X
    sparse = sparsegpt_prune_weight(W, G).float()
    assert ((sparse != 0).reshape(32, 16, 4).sum(-1) == 2).all()
    wanda = W * semi_structured_mask(W.abs() * torch.diag(G).sqrt()[None, :])
    assert ((sparse - W) @ X.T).norm() < 0.9 * ((wanda - W) @ X.T).norm()


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"H must be \(8, 8\)"):
        sparsegpt_prune_weight(torch.rand(4, 8), torch.eye(6))
    with pytest.raises(ValueError, match="multiples of m=4"):
        sparsegpt_prune_weight(torch.rand(4, 6), torch.eye(6))
    with pytest.raises(ValueError, match="damping must be > 0"):
        SparseGPTConfig(damping=0.0)
    with pytest.raises(ValueError, match="damping must be a finite number"):
        SparseGPTConfig(damping=float("nan"))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_every_linear_holds_two_of_four_and_the_model_stays_closer_than_wanda(make):
    dense = make()
    sparse, wanda = copy.deepcopy(dense), copy.deepcopy(dense)
    report = compress(
        sparse, None, SparseGPTConfig(nsamples=8, seqlen=32, batch_size=4), CALIB, progress=False
    )
    compress(wanda, None, WandaConfig(nsamples=8, seqlen=32, batch_size=4), CALIB, progress=False)
    layout, blocks = find_layout(sparse)
    for block in blocks:
        for name in layout.modules:
            assert int(semi_structured_counts(linear_weight(block.get_submodule(name)), 4).max()) <= 2
    assert report.method == "sparsegpt-2:4" and report.achieved_density <= 0.5
    held_out = random_ids(4, 32, seed=5)
    with torch.no_grad():
        ref = dense(input_ids=held_out).logits
        err = {
            n: float((m(input_ids=held_out).logits - ref).norm())
            for n, m in (("sparsegpt", sparse), ("wanda", wanda))
        }
    assert err["sparsegpt"] < err["wanda"], err
