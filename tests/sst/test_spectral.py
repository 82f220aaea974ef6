"""Pure SST maths: SVD, sampling, and both paths of the layer's gradients against a dense autograd reference."""

from __future__ import annotations

import pytest
import torch

from leanformers.sst.sampling import effective_rank, sample_indices, sampling_probabilities
from leanformers.sst.spectral import (
    effective_weight,
    factored_is_cheaper,
    orthogonality_error,
    spectral_linear,
    thin_svd,
    thin_svds,
)


def _factors(m=24, n=16, r=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g)
    U, S, Vh = thin_svd(W)
    idx = torch.tensor([0, 3, 4, 9, 15])[:r]
    # perturb the active vectors so that they differ from the stale slots of U / Vh
    Ua = U[:, idx] + 0.01 * torch.randn(m, r, generator=g)
    Vha = Vh[idx] + 0.01 * torch.randn(r, n, generator=g)
    return W, U, S, Vh, idx, Ua, Vha


def test_thin_svd_reconstructs_and_refuses_meta():
    W, U, S, Vh, *_ = _factors()
    assert U.shape == (24, 16) and S.shape == (16,) and Vh.shape == (16, 16)
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, W, atol=1e-5, rtol=0)
    assert orthogonality_error(U, Vh) < 1e-5
    with pytest.raises(ValueError, match="meta tensor"):
        thin_svd(torch.empty(4, 4, device="meta"))


def test_sampling_probabilities_mix_uniform_and_magnitude():
    S = torch.tensor([3.0, 1.0, 0.0, 0.0])
    p = sampling_probabilities(S, 0.5)
    torch.testing.assert_close(p, torch.tensor([0.5 / 4 + 0.5 * 0.75, 0.5 / 4 + 0.5 * 0.25, 0.125, 0.125]))
    torch.testing.assert_close(sampling_probabilities(S, 0.0), torch.full((4,), 0.25))
    torch.testing.assert_close(sampling_probabilities(torch.zeros(3), 1.0), torch.full((3,), 1 / 3))


@pytest.mark.parametrize("mode", ["multinomial", "uniform", "top_r", "sequential"])
def test_sample_indices_distinct_sorted_and_seeded(mode):
    S = torch.linspace(5, 0.1, 20)
    a = sample_indices(S, 6, mode, iteration=2, generator=torch.Generator().manual_seed(1))
    b = sample_indices(S, 6, mode, iteration=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.numel() == 6 and a.unique().numel() == 6
    assert torch.equal(a, a.sort().values)
    if mode == "top_r":
        assert a.tolist() == list(range(6))
    if mode == "sequential":
        assert a.tolist() == list(range(12, 18))  # block 2 of r=6 within k=20


def test_multinomial_prefers_large_singular_values():
    S = torch.cat([torch.full((10,), 100.0), torch.full((90,), 0.01)])
    counts = torch.zeros(100)
    for seed in range(200):
        counts[
            sample_indices(
                S, 5, "multinomial", magnitude_mix=1.0, generator=torch.Generator().manual_seed(seed)
            )
        ] += 1
    assert counts[:10].sum() > 0.95 * counts.sum()


def test_sample_indices_errors():
    with pytest.raises(ValueError, match="between 1 and k"):
        sample_indices(torch.ones(4), 5)
    with pytest.raises(ValueError, match="unknown sampling mode"):
        sample_indices(torch.ones(4), 2, "magic")


def test_effective_weight_uses_active_vectors():
    _, U, S, Vh, idx, Ua, Vha = _factors()
    U_eff, Vh_eff = U.clone(), Vh.clone()
    U_eff[:, idx] = Ua
    Vh_eff[idx] = Vha
    torch.testing.assert_close(effective_weight(U, S, Vh, idx, Ua, Vha), U_eff @ torch.diag(S) @ Vh_eff)


@pytest.mark.parametrize("path", ["factored", "materialized"])
@pytest.mark.parametrize("enhanced", [False, True])
def test_gradient_identity_against_dense_autograd(enhanced, path):
    """dL/dS_i = U_i^T (dL/dW) V_i; active-vector gradients equal autograd through U diag(S) Vh
    (divided by S_i when the enhanced gradient is on); dL/dx and dL/db match the dense layer."""
    torch.manual_seed(0)
    _, U, S, Vh, idx, Ua, Vha = _factors(m=24, n=16, r=5)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    target = torch.randn(3, 7, 24, dtype=torch.float64)
    bias = torch.randn(24, dtype=torch.float64)
    U, S, Vh, Ua, Vha = (t.double() for t in (U, S, Vh, Ua, Vha))

    # dense autograd reference: W = U_eff diag(S) Vh_eff built with differentiable ops
    S_ref, Ua_ref, Vha_ref, b_ref = (t.clone().requires_grad_() for t in (S, Ua, Vha, bias))
    x_ref = x.clone().requires_grad_()
    U_eff = U.index_copy(1, idx, Ua_ref)
    Vh_eff = Vh.index_copy(0, idx, Vha_ref)
    W = (U_eff * S_ref) @ Vh_eff
    W.retain_grad()
    loss_ref = ((x_ref @ W.t() + b_ref - target) ** 2).sum()
    loss_ref.backward()
    dW = W.grad

    S_f, Ua_f, Vha_f, b_f = (t.clone().requires_grad_() for t in (S, Ua, Vha, bias))
    x_f = x.clone().requires_grad_()
    out = spectral_linear(x_f, S_f, Ua_f, Vha_f, b_f, U, Vh, idx, enhanced=enhanced, path=path)
    loss = ((out - target) ** 2).sum()
    torch.testing.assert_close(loss, loss_ref)
    loss.backward()

    U_eff_d, Vh_eff_d = U_eff.detach(), Vh_eff.detach()
    expected_dS = torch.stack([U_eff_d[:, i] @ dW @ Vh_eff_d[i] for i in range(S.numel())])
    torch.testing.assert_close(S_f.grad, expected_dS, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(S_f.grad, S_ref.grad, rtol=1e-10, atol=1e-10)
    scale = S[idx] if enhanced else torch.ones_like(S[idx])
    torch.testing.assert_close(Ua_f.grad, Ua_ref.grad / scale[None, :], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(Vha_f.grad, Vha_ref.grad / scale[:, None], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x_f.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(b_f.grad, b_ref.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("path", ["factored", "materialized"])
def test_spectral_linear_under_bfloat16_autocast(path):
    _, U, S, Vh, idx, Ua, Vha = _factors()
    x = torch.randn(2, 5, 16)
    S, Ua, Vha = (t.clone().requires_grad_() for t in (S, Ua, Vha))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = spectral_linear(x, S, Ua, Vha, None, U, Vh, idx, path=path)
    assert out.dtype == torch.bfloat16
    ref = x @ effective_weight(U, S.detach(), Vh, idx, Ua.detach(), Vha.detach()).t()
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)
    out.float().sum().backward()
    assert S.grad.dtype == torch.float32 and torch.isfinite(S.grad).all()


def test_effective_rank_bounds():
    assert effective_rank(torch.ones(8)) == pytest.approx(8.0)
    assert effective_rank(torch.tensor([1.0, 0, 0])) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(3)) == 0.0


def test_paths_agree_in_float32_and_auto_picks_by_token_count():
    _, U, S, Vh, idx, Ua, Vha = _factors(m=24, n=16, r=5)
    x = torch.randn(4, 9, 16)
    grads = {}
    for path in ("factored", "materialized"):
        S_p, Ua_p, Vha_p = (t.clone().requires_grad_() for t in (S, Ua, Vha))
        out = spectral_linear(x, S_p, Ua_p, Vha_p, None, U, Vh, idx, path=path)
        out.pow(2).sum().backward()
        grads[path] = (out.detach(), S_p.grad, Ua_p.grad, Vha_p.grad)
    for a, b in zip(grads["factored"], grads["materialized"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="unknown SST path 'dense'"):
        spectral_linear(x, S, Ua, Vha, None, U, Vh, idx, path="dense")


def test_cost_model_prefers_factored_for_fine_tuning_batches():
    # SmolLM2 shapes: square attention (576 x 576) and the MLP (1536 x 576)
    assert factored_is_cheaper(120, 576, 576, 576)  # a batch of 4 short sentences
    assert not factored_is_cheaper(16 * 256, 576, 576, 576)  # a pretraining batch on a square layer
    assert factored_is_cheaper(16 * 256, 1536, 576, 576)  # the MLP: factored skips dW at any batch
    # the crossover of a square layer is at 3k tokens
    assert factored_is_cheaper(3 * 576 - 1, 576, 576, 576) and not factored_is_cheaper(3 * 576, 576, 576, 576)


def test_thin_svds_is_thin_svd_bit_for_bit_whatever_the_threads():
    g = torch.Generator().manual_seed(0)
    weights = [
        torch.randn(48, 80, generator=g),
        torch.randn(80, 48, generator=g),
        torch.randn(64, 64, generator=g),
    ]
    single = [thin_svd(w) for w in weights]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        parallel = list(thin_svds(weights))
        assert torch.get_num_threads() == 3  # restored
    finally:
        torch.set_num_threads(before)
    for one, many in zip(single, parallel, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(one, many, strict=True))
