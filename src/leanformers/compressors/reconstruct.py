"""M: retraining-free low-rank reconstruction that limits error accumulation (pure maths).

Notation for one linear layer W (m = out, n = in) and calibration tokens t:
  X_d (n, t) its inputs in the dense model, X_c (n, t) its inputs in the partly compressed model.
  G = X_c X_c^T, K = X_d X_c^T, S = X_d X_d^T  (all (n, n), ``accumulate_grams``).
Target Y = (1 - alpha) W X_c + alpha W X_d; we minimise ||Y - U V X_c||_F over U (m, r), V (r, n).
Only H = Y X_c^T = W ((1 - alpha) G + alpha K) is needed, so dense outputs are never cached.

Everything here runs in float64 on whatever device the statistics live on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = [
    "GramStats",
    "accumulate_grams",
    "accumulate_square_norms",
    "drop_null_directions",
    "gram",
    "numerical_rank_factors",
    "alternating_steps",
    "cholesky_with_damping",
    "reconstruct",
    "shrink_stats",
    "svd_init",
    "top_singular_triplets",
    "whitened_svd_init",
]


@dataclass
class GramStats:
    """Input statistics of one linear (or one group of linears sharing an input).

    G = X_c X_c^T, K = X_d X_c^T, S = X_d X_d^T, each (n, n) float64; ``tokens`` is t.
    Each may be None when the method does not need it (K when alpha = 0, S for an init without whitening,
    G without alternating steps).
    """

    G: torch.Tensor | None
    K: torch.Tensor | None
    S: torch.Tensor | None
    tokens: int


def shrink_stats(stats: GramStats, shrinkage: float) -> GramStats:
    """Shrink G, K and S toward their diagonals: A -> (1 - shrinkage) A + shrinkage diag(A).

    The calibration tokens only show the correlations of their own domain; the diagonal keeps every
    feature's energy but drops those correlations, i.e. assumes independent features where the text
    gives no evidence. Mixing the two (a Ledoit-Wolf style shrinkage of the second moments) keeps the
    fitted factors from relying on correlations that another domain may not have. All three matrices
    get the same mix, which is the statistics of one mixed distribution, so H, the whitening and the
    normal equations stay consistent. ``shrinkage`` 0 returns ``stats`` itself.
    """
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must lie in [0, 1], got {shrinkage}")
    if shrinkage == 0.0:
        return stats

    def shrink(A: torch.Tensor | None) -> torch.Tensor | None:
        if A is None:
            return None
        out = A * (1.0 - shrinkage)
        out.diagonal().add_(A.diagonal() * shrinkage)
        return out

    return GramStats(shrink(stats.G), shrink(stats.K), shrink(stats.S), stats.tokens)


def cholesky_with_damping(S: torch.Tensor, max_tries: int = 8) -> torch.Tensor:
    """Lower Cholesky factor L of S (n, n), adding relative damping until S is positive definite.

    Dead input features make S singular; damping starts at 1e-8 x mean(diag S) and grows 10x per try.
    """
    S = S.double()
    L, info = torch.linalg.cholesky_ex(S)
    if int(info) == 0:
        return L
    scale = S.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    eye = torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
    damp = 1e-8
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(S + damp * scale * eye)
        if int(info) == 0:
            return L
        damp *= 10
    raise torch.linalg.LinAlgError(
        "whitening Gram is not positive definite even with damping; the calibration activations are "
        "degenerate (check for all-zero or non-finite inputs)"
    )


def svd_init(W: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain truncated SVD: W (m, n) ~ U (m, r) V (r, n), singular values split evenly (sqrt)."""
    U, s, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return U[:, :rank] * root, root[:, None] * Vh[:rank]


def whitened_svd_init(W: torch.Tensor, L: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD-LLM truncation-aware whitening init.

    With S = X_d X_d^T = L L^T: SVD of W L, keep top r; U0 = U_r Sigma_r^(1/2),
    V0 = Sigma_r^(1/2) V_r^T L^-1. Truncating W L is optimal for ||W X_d - U V X_d||_F.
    Args: W (m, n), L (n, n) lower triangular. Returns U0 (m, r), V0 (r, n) float64.
    """
    W = W.double()
    U, s, Vh = top_singular_triplets(W @ L, rank)
    root = s.sqrt()
    U0 = U * root
    # V0 = (root Vh_r) L^-1, i.e. solve X L = root Vh_r for X.
    V0 = torch.linalg.solve_triangular(L, root[:, None] * Vh, upper=False, left=False)
    return U0, V0


# Largest sigma_1 / sigma_r for which the Gram route is used: its error on the rank-r truncation is
# about eps_64 (sigma_1 / sigma_r)^2 <= 1e-16 x 1e6 = 1e-10, far below the float32 rounding (6e-8) of the
# factors the layers store. Beyond it (near rank-deficient W L) the full SVD is used.
GRAM_ROUTE_MAX_CONDITION = 1e3


def top_singular_triplets(
    A: torch.Tensor, rank: int, max_condition: float = GRAM_ROUTE_MAX_CONDITION
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets of A (m, n): U (m, r), s (r,) descending, Vh (r, n), float64.

    From the symmetric eigendecomposition of the smaller Gram (A^T A or A A^T, min(m, n) square), then
    the other side's vectors as A v / s: 2-7x faster than the SVD of A on the CPU (a 576 x 1536 float64
    SVD took 0.72 s, the 576 x 576 Gram eigendecomposition 0.10 s). Falls back to the SVD of A when
    sigma_1 / sigma_r > ``max_condition`` (see GRAM_ROUTE_MAX_CONDITION). Singular vectors are defined up
    to sign (and rotation inside repeated singular values) either way; U diag(s) Vh is what is unique.
    """
    A = A.double()
    m, n = A.shape
    tall = m >= n
    C = A.T @ A if tall else A @ A.T
    w, Q = torch.linalg.eigh(C)  # ascending
    w, Q = w.flip(0)[:rank], Q.flip(1)[:, :rank]
    s = w.clamp_min(0).sqrt()
    # (a zero singular value has no direction to recover as A v / s: that also takes the SVD)
    if not bool(s[-1] > 0) or not bool(s[-1] * max_condition >= s[0]) or not bool(torch.isfinite(s).all()):
        U, s, Vh = torch.linalg.svd(A, full_matrices=False)
        return U[:, :rank], s[:rank], Vh[:rank]
    if tall:
        return (A @ Q) / s, s, Q.T
    return Q, s, (Q.T @ A) / s[:, None]


# torch.linalg.lstsq's default CPU driver (LAPACK gelsy) gives different last bits from run to run (measured: 21
# of 30 calls on the same inputs differed), which made MPIFA's output depend on the process and on memory vs
# streaming mode. These drivers are deterministic: QR for the V-step (U has full column rank: its null
# directions were dropped after the init), the SVD-based solver where the system is singular by construction.
FULL_RANK_LSTSQ = "gels"
RANK_REVEALING_LSTSQ = "gelsd"


def _spd_solve(A: torch.Tensor, B: torch.Tensor, damping: float) -> torch.Tensor:
    """Solve (A + damping * mean(diag A) I) X = B for symmetric PSD A (n, n), B (n, k)."""
    scale = A.diagonal().mean().clamp_min(torch.finfo(A.dtype).tiny)
    A = A + damping * scale * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return torch.cholesky_solve(B, L)
    return torch.linalg.lstsq(A, B, driver=RANK_REVEALING_LSTSQ).solution


def alternating_steps(
    W: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    stats: GramStats,
    *,
    alpha: float = 0.25,
    steps: int = 2,
    damping: float = 1e-2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form alternating minimisation of ||Y - U V X_c||_F, starting with a U-step.

    U-step: U = H V^T (V G V^T)^-1.
    V-step: W* = (H + lambda W)(G + lambda I)^-1, V = U^+ W*.
    ``damping`` is relative: lambda = damping * mean(diag G) (an absolute 1e-3 would vanish against
    Grams of thousands of tokens).
    Args: W (m, n); U (m, r); V (r, n). Returns updated (U, V) float64.
    """
    if steps <= 0:
        return U, V
    W = W.double()
    G = stats.G.double()
    if alpha != 0.0:
        if stats.K is None:
            raise ValueError("alpha > 0 needs the cross-Gram K = X_d X_c^T")
        target_gram = (1.0 - alpha) * G + alpha * stats.K.double()
    else:
        target_gram = G
    H = W @ target_gram  # Y X_c^T = W ((1 - alpha) G + alpha K), with K = X_d X_c^T
    lam = damping * G.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    for step in range(steps):
        if step % 2 == 0:
            A = V @ G @ V.T  # (r, r)
            U = _spd_solve(A, V @ H.T, 0.0).T  # (m, r); r x r is well conditioned, lstsq if not
        else:
            eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
            W_star = torch.linalg.solve(G + lam * eye, (H + lam * W).T).T  # (m, n), G symmetric
            V = torch.linalg.lstsq(U, W_star, driver=FULL_RANK_LSTSQ).solution  # U^+ W*
    return U, V


def drop_null_directions(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The init's factors without the directions of a (numerically) zero singular value: a weight of rank
    k < r gets k factors (>= 1; a zero weight gets zero factors of rank 1). The steps would otherwise solve
    singular r x r systems. Columns of an SVD init come in descending singular value, so the kept ones
    are the first. Factors of full rank are returned as they are (the same tensors)."""
    strength = U.norm(dim=0) * V.norm(dim=1)
    top = float(strength.max()) if strength.numel() else 0.0
    if not torch.isfinite(strength).all():
        return U, V  # left to the finiteness checks downstream, which name the module
    if top == 0.0:
        return torch.zeros_like(U[:, :1]), torch.zeros_like(V[:1])
    keep = int((strength > top * U.shape[1] * 1e3 * torch.finfo(torch.float64).eps).sum())
    return (U, V) if keep == U.shape[1] else (U[:, :keep], V[:keep])


def reconstruct(
    W: torch.Tensor,
    rank: int,
    stats: GramStats | None,
    *,
    init: str = "whiten",
    alpha: float = 0.25,
    steps: int = 2,
    damping: float = 1e-2,
    L: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-rank factors of W (m, n): U (m, r), V (r, n), float64.

    init: "whiten" (SVD-LLM, needs stats.S or a precomputed Cholesky factor ``L``) or "svd" (plain).
    steps: closed-form alternating steps after the init (0 = init only; 1 = U-step; 2 = U then V).
    """
    if not 1 <= rank <= min(W.shape):
        raise ValueError(f"rank {rank} outside [1, {min(W.shape)}] for a weight of shape {tuple(W.shape)}")
    if init == "svd":
        U, V = svd_init(W, rank)
    elif init == "whiten":
        if L is None:
            if stats is None or stats.S is None:
                raise ValueError("whitening init needs the dense Gram S = X_d X_d^T")
            L = cholesky_with_damping(stats.S)
        U, V = whitened_svd_init(W, L, rank)
    else:
        raise ValueError(f"unknown init {init!r}: use 'whiten' or 'svd'")
    U, V = drop_null_directions(U, V)
    if steps > 0:
        if stats is None:
            raise ValueError("alternating steps need calibration statistics")
        U, V = alternating_steps(W, U, V, stats, alpha=alpha, steps=steps, damping=damping)
    return U, V


# Width of the strips ``gram`` multiplies: narrower strips skip more of the lower triangle but make smaller
# GEMMs. At most 8 strips of >= 192 columns took a 4096-token Gram to 0.64-0.66x the time of one GEMM for
# n = 576 and 1536 and 0.64x for n = 4096 (2 CPU threads, docs/benchmarks.md §20).
GRAM_STRIP_MIN_WIDTH = 192
GRAM_MAX_STRIPS = 8


def gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x (n, n) of x (t, n), in x's dtype; exactly symmetric from n = 2 x GRAM_STRIP_MIN_WIDTH on.

    There, only the block upper triangle is multiplied (row strip i of the result against its columns >= the
    strip's start) and the lower part is its transpose: k(k+1)/2 of k^2 blocks, where one GEMM of x^T x
    computes both triangles. Each entry is still one GEMM dot product over the t tokens.
    """
    n = x.shape[1]
    k = min(GRAM_MAX_STRIPS, n // GRAM_STRIP_MIN_WIDTH)
    if k < 2:
        return x.T @ x
    edges = [n * i // k for i in range(k + 1)]
    out = x.new_empty(n, n)
    for a, b in zip(edges, edges[1:]):
        strip = x[:, a:b].T @ x[:, a:]  # (b - a, n - a): the diagonal block and everything right of it
        out[a:b, b:] = strip[:, b - a :]
        out[b:, a:b] = strip[:, b - a :].T
        diagonal = strip[:, : b - a]  # a GEMM need not give (i, j) and (j, i) the same last bit
        out[a:b, a:b] = diagonal.triu() + diagonal.triu(1).T
    return out


@torch.no_grad()
def accumulate_grams(
    pairs: Iterable[tuple[torch.Tensor | None, torch.Tensor | None]],
    device: torch.device,
    *,
    need_gram: bool,
    need_cross: bool,
    need_dense: bool,
    name: str = "the group",
) -> GramStats:
    """G = X_c X_c^T, K = X_d X_c^T, S = X_d X_d^T of one linear's input, over the calibration batches.

    ``pairs``: one (x_dense, x_compressed) per batch, each (batch, seq, n) or None where not needed (the
    inputs of the linear in the dense model and in the partly compressed one, token by token on the same
    batch). Products in float32 on ``device``, sums in float64. Only the asked matrices are built (the
    others are None). Raises FloatingPointError naming ``name`` when an input is non-finite.
    """
    G = K = S = None
    tokens = 0
    for xd, xc in pairs:
        if xc is not None:
            xc = xc.reshape(-1, xc.shape[-1]).float()
        if need_gram:
            g = gram(xc).double()
            G = g if G is None else G.add_(g)
        if need_cross or need_dense:
            xd = xd.to(device).reshape(-1, xd.shape[-1]).float()
            if need_cross:
                k = (xd.T @ xc).double()
                K = k if K is None else K.add_(k)
            if need_dense:
                s = gram(xd).double()
                S = s if S is None else S.add_(s)
        tokens += (xc if xc is not None else xd).shape[0]
    # An inf/NaN anywhere in feature j of X makes the diagonal entry sum_t x_tj^2 non-finite, so checking
    # the diagonals of G and S is as strict as checking every activation, at O(n) instead of O(t n)
    # (isfinite over the activations cost ~4 % of the compression time).
    for product in (G, S):
        if product is not None and not torch.isfinite(product.diagonal()).all():
            raise FloatingPointError(f"non-finite activations at the input of {name}")
    return GramStats(G, K, S, tokens)


@torch.no_grad()
def accumulate_square_norms(
    inputs: Iterable[tuple[torch.Tensor | None, torch.Tensor | None]], device: torch.device, *, name: str
) -> torch.Tensor:
    """sum_t x_tj^2 (n,) float64 of one linear's compressed-stream input: the diagonal of G = X_c X_c^T
    at O(t n) instead of O(t n^2) (Wanda reads nothing else). ``inputs`` as for ``accumulate_grams``."""
    total = None
    for _, xc in inputs:
        sq = xc.to(device).reshape(-1, xc.shape[-1]).double().square().sum(dim=0)
        total = sq if total is None else total.add_(sq)
    if total is None or not torch.isfinite(total).all():
        raise FloatingPointError(f"non-finite activations at the input of {name}")
    return total


def numerical_rank_factors(
    U: torch.Tensor, V: torch.Tensor, keep: str = "left"
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Factors of the same product U V (m, r) x (r, n) at its numerical rank r' (>= 1), float64.

    With U = Q_u R_u and V^T = Q_v R_v, U V = Q_u (R_u R_v^T) Q_v^T: the SVD of the r x r core gives the
    singular values; r' counts those above s_max * r * 1e3 * eps (the conditioning PIFA's pivot solve
    accepts). A zero product keeps rank 1 with a unit vector on the ``keep`` side ("left": U = e, V = 0;
    "right": U = 0, V = e^T), so that a PIFA of the zero matrix has an invertible pivot block in the form
    that reads that side (row form: U; column form: V).
    """
    U, V = U.double(), V.double()
    Qu, Ru = torch.linalg.qr(U)
    Qv, Rv = torch.linalg.qr(V.T)
    Uc, s, Vch = torch.linalg.svd(Ru @ Rv.T)
    r = U.shape[1]
    tol = float(s[0]) * r * 1e3 * torch.finfo(torch.float64).eps
    rank = max(1, int((s > tol).sum()))
    if float(s[0]) == 0.0:
        left, right = Qu[:, :1], Qv[:, :1].T
        if keep == "left":
            return left, torch.zeros_like(right), 1
        return torch.zeros_like(left), right, 1
    root = s[:rank].sqrt()
    return (Qu @ Uc[:, :rank]) * root, root[:, None] * (Vch[:rank] @ Qv.T), rank
