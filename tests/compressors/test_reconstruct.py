"""M reconstruction maths against explicit least-squares references."""

import pytest
import torch

from leanformers.compressors.reconstruct import (
    GramStats,
    alternating_steps,
    cholesky_with_damping,
    reconstruct,
    svd_init,
    top_singular_triplets,
    whitened_svd_init,
)


def _problem(m=24, n=16, t=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    # Anisotropic inputs so that whitening matters; X_c = X_d + accumulated error.
    scales = torch.logspace(-1, 1, n, dtype=torch.float64)
    Xd = torch.randn(n, t, generator=g, dtype=torch.float64) * scales[:, None]
    Xc = Xd + 0.3 * torch.randn(n, t, generator=g, dtype=torch.float64) * scales[:, None]
    stats = GramStats(Xc @ Xc.T, Xd @ Xc.T, Xd @ Xd.T, t)
    return W, Xd, Xc, stats


def _objective(W, U, V, Xd, Xc, alpha):
    Y = (1 - alpha) * W @ Xc + alpha * W @ Xd
    return torch.linalg.norm(Y - U @ V @ Xc).item()


def test_whitened_init_beats_plain_svd_on_dense_inputs():
    W, Xd, _, stats = _problem()
    L = cholesky_with_damping(stats.S)
    Uw, Vw = whitened_svd_init(W, L, 6)
    Us, Vs = svd_init(W, 6)
    err_w = torch.linalg.norm(W @ Xd - Uw @ Vw @ Xd)
    err_s = torch.linalg.norm(W @ Xd - Us @ Vs @ Xd)
    assert err_w < err_s
    # Truncation-aware: the error equals the tail singular values of W L (Eckart-Young).
    s = torch.linalg.svdvals(W @ L)
    assert err_w.item() == pytest.approx(s[6:].pow(2).sum().sqrt().item(), rel=1e-8)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
def test_u_step_is_the_least_squares_solution(alpha):
    W, Xd, Xc, stats = _problem()
    U0, V0 = svd_init(W, 5)
    U, V = alternating_steps(W, U0, V0, stats, alpha=alpha, steps=1)
    assert torch.equal(V, V0)
    Y = (1 - alpha) * W @ Xc + alpha * W @ Xd
    Z = V0 @ Xc  # (r, t); min_U ||Y - U Z|| -> U^T = lstsq(Z^T, Y^T)
    U_ref = torch.linalg.lstsq(Z.T, Y.T).solution.T
    assert torch.allclose(U, U_ref, rtol=1e-6, atol=1e-8)


def test_v_step_zeroes_the_gradient_without_damping():
    W, Xd, Xc, stats = _problem()
    alpha = 0.25
    U0, V0 = svd_init(W, 5)
    U, V = alternating_steps(W, U0, V0, stats, alpha=alpha, steps=2, damping=0.0)
    Y = (1 - alpha) * W @ Xc + alpha * W @ Xd
    grad = U.T @ (U @ V @ Xc - Y) @ Xc.T
    assert grad.abs().max().item() < 1e-6 * (U.T @ Y @ Xc.T).abs().max().item()


def test_alternating_steps_never_increase_the_objective():
    W, Xd, Xc, stats = _problem(seed=3)
    alpha = 0.25
    U, V = whitened_svd_init(W, cholesky_with_damping(stats.S), 4)
    previous = _objective(W, U, V, Xd, Xc, alpha)
    for steps in range(1, 6):
        Us, Vs = alternating_steps(W, U, V, stats, alpha=alpha, steps=steps, damping=0.0)
        value = _objective(W, Us, Vs, Xd, Xc, alpha)
        assert value <= previous * (1 + 1e-9)
        previous = value


def test_m_reduces_error_against_the_dense_target():
    """With accumulated input error, M fits the compressed inputs better than whitening alone."""
    W, Xd, Xc, stats = _problem(seed=5)
    U0, V0 = reconstruct(W, 4, stats, init="whiten", steps=0)
    U2, V2 = reconstruct(W, 4, stats, init="whiten", alpha=0.25, steps=2)
    assert _objective(W, U2, V2, Xd, Xc, 0.25) < _objective(W, U0, V0, Xd, Xc, 0.25)


def test_cholesky_damps_a_singular_gram():
    x = torch.randn(8, 3, dtype=torch.float64)
    S = x @ x.T  # rank 3 of 8
    L = cholesky_with_damping(S)
    assert torch.isfinite(L).all()
    assert torch.allclose(L @ L.T, S, atol=1e-5 * S.diagonal().mean().item())


def test_reconstruct_errors_are_clear():
    W, _, _, stats = _problem()
    with pytest.raises(ValueError, match="rank 0 outside"):
        reconstruct(W, 0, stats)
    with pytest.raises(ValueError, match="unknown init"):
        reconstruct(W, 2, stats, init="qr")
    with pytest.raises(ValueError, match="dense Gram"):
        reconstruct(W, 2, GramStats(stats.G, stats.K, None, 1), init="whiten")
    with pytest.raises(ValueError, match="cross-Gram"):
        alternating_steps(W, *svd_init(W, 2), GramStats(stats.G, None, None, 1), alpha=0.5, steps=1)


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (30, 30)])
def test_top_singular_triplets_match_the_svd(shape):
    """The Gram-eigendecomposition route gives the SVD's rank-r truncation to ~1e-12 (float64)."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(*shape, generator=g, dtype=torch.float64) @ torch.diag(
        torch.logspace(0, -2, shape[1], dtype=torch.float64)
    )
    r = 10
    U, s, Vh = top_singular_triplets(A, r)
    Ur, sr, Vhr = torch.linalg.svd(A, full_matrices=False)
    assert torch.allclose(s, sr[:r], rtol=1e-12, atol=0)
    truncation = Ur[:, :r] * sr[:r] @ Vhr[:r]
    assert torch.linalg.norm(U * s @ Vh - truncation) <= 1e-12 * torch.linalg.norm(truncation)
    assert torch.allclose(U.T @ U, torch.eye(r, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(Vh @ Vh.T, torch.eye(r, dtype=torch.float64), atol=1e-12)


def test_top_singular_triplets_fall_back_to_the_svd_when_ill_conditioned():
    """sigma_1 / sigma_r beyond the bound: the result is the SVD's own (bitwise)."""
    g = torch.Generator().manual_seed(1)
    A = torch.randn(30, 20, generator=g, dtype=torch.float64) @ torch.diag(
        torch.logspace(0, -8, 20, dtype=torch.float64)
    )
    U, s, Vh = top_singular_triplets(A, 15)
    Ur, sr, Vhr = torch.linalg.svd(A, full_matrices=False)
    assert torch.equal(U, Ur[:, :15]) and torch.equal(s, sr[:15]) and torch.equal(Vh, Vhr[:15])


def test_shrinkage_keeps_the_diagonals_and_scales_the_correlations():
    from leanformers.compressors.reconstruct import GramStats, shrink_stats

    g = torch.Generator().manual_seed(0)
    X = torch.randn(6, 50, generator=g, dtype=torch.float64)
    Y = X + 0.1 * torch.randn(6, 50, generator=g, dtype=torch.float64)
    stats = GramStats(X @ X.T, Y @ X.T, Y @ Y.T, 50)
    assert shrink_stats(stats, 0.0) is stats
    out = shrink_stats(stats, 0.25)
    for before, after in ((stats.G, out.G), (stats.K, out.K), (stats.S, out.S)):
        assert torch.equal(after.diagonal(), before.diagonal())
        off = ~torch.eye(6, dtype=torch.bool)
        assert torch.allclose(after[off], 0.75 * before[off])
    full = shrink_stats(stats, 1.0)
    assert torch.equal(full.G, torch.diag(stats.G.diagonal()))
    assert shrink_stats(GramStats(stats.G, None, None, 50), 0.5).K is None
    with pytest.raises(ValueError, match=r"shrinkage must lie in \[0, 1\]"):
        shrink_stats(stats, 1.5)


def test_the_alternating_steps_give_the_same_bits_every_time():
    """The V-step's least squares used LAPACK gelsy, whose last bits changed from call to call (MPIFA's output
    differed between processes and between memory and streaming mode); its drivers are deterministic now."""
    from leanformers.compressors.reconstruct import GramStats, alternating_steps, svd_init

    g = torch.Generator().manual_seed(0)
    W = torch.randn(96, 64, generator=g, dtype=torch.float64)
    X = torch.randn(64, 400, generator=g, dtype=torch.float64)
    stats = GramStats(X @ X.T, X @ X.T * 0.9, X @ X.T, 400)
    U, V = svd_init(W, 40)
    first = alternating_steps(W, U, V, stats, steps=2)
    heap = []
    for i in range(20):  # move the heap between calls: gelsy's results depended on where its buffers landed
        heap.append(torch.empty(1000 + 37 * i))
        again = alternating_steps(W.clone(), U.clone(), V.clone(), stats, steps=2)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


@pytest.mark.parametrize("n", [5, 383, 384, 577, 1536])
def test_gram_in_strips_is_the_symmetric_input_gram(n):
    """gram(x) = x^T x to float32 rounding, exactly symmetric once it is computed in strips (n >= 384)."""
    from leanformers.compressors.reconstruct import gram

    x = torch.randn(300, n, generator=torch.Generator().manual_seed(n)) * torch.logspace(-1, 1, n)
    G = gram(x)
    reference = x.double().T @ x.double()
    assert G.dtype == x.dtype and G.shape == (n, n)
    scale = reference.diagonal().max()
    assert (G.double() - reference).abs().max() <= 1e-5 * scale
    if n >= 384:
        assert torch.equal(G, G.T)
    # a column slice (strided rows) gives the same as its contiguous copy
    assert torch.equal(gram(x[:, : n // 2 * 2 : 2]), gram(x[:, : n // 2 * 2 : 2].contiguous()))


def test_square_norms_are_the_gram_diagonal_and_name_a_non_finite_input():
    from leanformers.compressors.reconstruct import accumulate_grams, accumulate_square_norms

    cpu = torch.device("cpu")
    batches = [torch.randn(2, 7, 9, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    pairs = [(None, b) for b in batches]
    norms = accumulate_square_norms(pairs, cpu, name="q")
    G = accumulate_grams(pairs, cpu, need_gram=True, need_cross=False, need_dense=False).G
    assert norms.dtype == torch.float64 and norms.shape == (9,)
    assert torch.allclose(norms, G.diagonal(), rtol=1e-6)
    for bad in (float("nan"), float("inf")):
        broken = batches[1].clone()
        broken[0, 3, 4] = bad
        with pytest.raises(FloatingPointError, match="non-finite activations at the input of q"):
            accumulate_square_norms([(None, batches[0]), (None, broken)], cpu, name="q")
