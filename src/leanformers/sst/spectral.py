"""Pure maths of Sparse Spectral Training: tensors in, tensors out (no modules, no optimizer, no I/O).

Shapes follow the linear-layer convention W (m, n) = (out, in), k = min(m, n), W = U diag(S) Vh with
U (m, k), S (k,), Vh (k, n), and r active singular-vector pairs at indices ``idx`` (r,).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "SAMPLING_MODES",
    "SpectralLinearFunction",
    "effective_rank",
    "effective_weight",
    "inference_weight",
    "linear_with_weight",
    "orthogonality_error",
    "sample_indices",
    "sampling_probabilities",
    "spectral_dtypes",
    "spectral_linear",
    "thin_svd",
]

SAMPLING_MODES = ("multinomial", "uniform", "top_r", "sequential")


def thin_svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in float32 on the weight's device.

    Args:
        weight: (m, n) in any float dtype.
    Returns:
        U (m, k), S (k,) descending and >= 0, Vh (k, n); all float32.
    """
    if weight.device.type == "meta":
        raise ValueError("cannot take the SVD of a meta tensor: materialise the weights first")
    U, S, Vh = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
    return U.contiguous(), S.contiguous(), Vh.contiguous()


def sampling_probabilities(S: torch.Tensor, magnitude_mix: float = 0.5) -> torch.Tensor:
    """p_i = (1 - beta) / k + beta * S_i / sum(S): a mix of uniform and magnitude sampling.

    Args:
        S: (k,) non-negative singular values.
        magnitude_mix: beta in [0, 1]; 1 is pure magnitude sampling, 0 is uniform.
    Returns:
        (k,) float32 probabilities summing to 1.
    """
    S = S.detach().to(torch.float32).clamp_min(0)
    k = S.numel()
    total = S.sum()
    uniform = torch.full_like(S, 1.0 / k)
    if total <= 0:  # all-zero spectrum: magnitude carries no information
        return uniform
    return (1.0 - magnitude_mix) * uniform + magnitude_mix * S / total


def sample_indices(
    S: torch.Tensor,
    r: int,
    mode: str = "multinomial",
    *,
    magnitude_mix: float = 0.5,
    iteration: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Choose r distinct singular-vector indices for the next iteration.

    Args:
        S: (k,) singular values (sorted descending after an SVD).
        r: number of active pairs, 1 <= r <= k.
        mode: ``multinomial`` (p from :func:`sampling_probabilities`, without replacement),
            ``uniform``, ``top_r`` (the r largest S) or ``sequential`` (cyclic blocks
            ``[iteration * r, iteration * r + r) mod k``).
        iteration: iteration number (used by ``sequential``).
        generator: a CPU generator; pass the same seeded one on every rank.
    Returns:
        (r,) int64 indices, sorted ascending, on S's device.
    """
    k = S.numel()
    if not 1 <= r <= k:
        raise ValueError(f"r={r} must be between 1 and k={k} (the smaller dimension of the layer)")
    if mode == "multinomial":
        probs = sampling_probabilities(S, magnitude_mix).cpu()
        idx = torch.multinomial(probs, r, replacement=False, generator=generator)
    elif mode == "uniform":
        idx = torch.randperm(k, generator=generator)[:r]
    elif mode == "top_r":
        idx = torch.topk(S.detach().float().cpu(), r).indices
    elif mode == "sequential":
        idx = (torch.arange(r) + iteration * r) % k
    else:
        raise ValueError(f"unknown sampling mode {mode!r}; use one of {SAMPLING_MODES}")
    return torch.sort(idx.to(torch.long)).values.to(S.device)


def _work_dtype(S: torch.Tensor) -> torch.dtype:
    """Factor maths runs in float32 at least (float64 when the factors are float64, e.g. in tests)."""
    return torch.promote_types(S.dtype, torch.float32)


def effective_weight(
    U: torch.Tensor,
    S: torch.Tensor,
    Vh: torch.Tensor,
    idx: torch.Tensor,
    U_active: torch.Tensor,
    Vh_active: torch.Tensor,
) -> torch.Tensor:
    """W = U_eff diag(S) Vh_eff where the ``idx`` columns / rows come from the active factors.

    Args:
        U (m, k), S (k,), Vh (k, n): stored factors (the active slots may be stale).
        idx (r,), U_active (m, r), Vh_active (r, n).
    Returns:
        (m, n) in float32 (or the factors' dtype if wider).
    """
    return _weight(U, S, Vh, idx, U_active, Vh_active, _work_dtype(S))


class SpectralLinearFunction(torch.autograd.Function):
    """y = x W^T (+ b) with W = U_eff diag(S) Vh_eff built once per forward.

    A naive ``U (S * (Vh x))`` costs k(m + n) per token (2x a dense layer when m = n). Here the
    weight is materialised once (O(m n k) per call, independent of the token count), the token
    matmuls are the dense ones, and the factor gradients come from the dense weight gradient
    dW = dy^T x (one layer at a time, never stored):

        dS_i        = U_i^T dW V_i                 (diag of U_eff^T dW Vh_eff^T)
        dU_active   = dW Vh_active^T diag(S_a)     (enhanced: without diag(S_a), i.e. divided by S_a)
        dVh_active  = diag(S_a) U_active^T dW      (enhanced: without diag(S_a))

    W is recomputed in backward instead of being saved, so no dense copy is held between
    forward and backward. Under autocast (``compute_dtype`` bf16/fp16) the O(m n k) products run in
    that dtype like every other matmul of mixed-precision training (fp32 accumulation on tensor
    cores); the gradients are handed back in float32. Without autocast everything is at least fp32.
    """

    @staticmethod
    def forward(ctx, x, S, U_active, Vh_active, bias, U, Vh, idx, enhanced: bool, compute_dtype):
        dtype = compute_dtype if compute_dtype is not None else x.dtype
        mm = _matmul_dtype(S, compute_dtype)
        W = _weight(U, S, Vh, idx, U_active, Vh_active, mm)
        out = torch.nn.functional.linear(x.to(dtype), W.to(dtype), None if bias is None else bias.to(dtype))
        ctx.save_for_backward(x, S, U_active, Vh_active, U, Vh, idx)
        ctx.enhanced = enhanced
        ctx.compute_dtype = dtype
        ctx.mm_dtype = mm
        ctx.x_dtype = x.dtype
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, S, U_active, Vh_active, U, Vh, idx = ctx.saved_tensors
        dtype, mm = ctx.compute_dtype, ctx.mm_dtype
        work = _work_dtype(S)
        with torch.no_grad():
            U_eff = U.to(mm).index_copy(1, idx, U_active.to(mm))
            Vh_eff = Vh.to(mm).index_copy(0, idx, Vh_active.to(mm))
            grad_x = None
            if ctx.needs_input_grad[0]:
                W = U_eff @ (S.to(mm)[:, None] * Vh_eff)
                grad_x = (grad_out.to(dtype) @ W.to(dtype)).to(ctx.x_dtype)
            g2 = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            dW = (g2.t() @ x2).to(mm)  # (m, n): one layer's dense gradient, freed on return
            UtdW = U_eff.t() @ dW  # (k, n)
            grad_S = (UtdW.to(work) * Vh_eff.to(work)).sum(dim=1)
            grad_U_a = (dW @ Vh_eff.index_select(0, idx).t()).to(work)  # (m, r)
            grad_Vh_a = UtdW.index_select(0, idx).to(work)  # (r, n)
            if not ctx.enhanced:
                S_a = S.to(work).index_select(0, idx)
                grad_U_a = grad_U_a * S_a[None, :]
                grad_Vh_a = grad_Vh_a * S_a[:, None]
            grad_b = g2.sum(dim=0).to(ctx.bias_dtype) if ctx.has_bias and ctx.needs_input_grad[4] else None
        return (
            grad_x,
            grad_S.to(S.dtype),
            grad_U_a.to(U_active.dtype),
            grad_Vh_a.to(Vh_active.dtype),
            grad_b,
            None,
            None,
            None,
            None,
            None,
        )


def _matmul_dtype(S: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.dtype:
    """Half-precision products under autocast, otherwise at least float32."""
    if compute_dtype in (torch.float16, torch.bfloat16):
        return compute_dtype
    return _work_dtype(S)


def _weight(U, S, Vh, idx, U_active, Vh_active, dtype: torch.dtype) -> torch.Tensor:
    U_eff = U.to(dtype).index_copy(1, idx, U_active.to(dtype))
    Vh_eff = Vh.to(dtype).index_copy(0, idx, Vh_active.to(dtype))
    return U_eff @ (S.to(dtype)[:, None] * Vh_eff)


def spectral_linear(
    x: torch.Tensor,
    S: torch.Tensor,
    U_active: torch.Tensor,
    Vh_active: torch.Tensor,
    bias: torch.Tensor | None,
    U: torch.Tensor,
    Vh: torch.Tensor,
    idx: torch.Tensor,
    *,
    enhanced: bool = True,
) -> torch.Tensor:
    """Apply the SST layer to x (..., n) -> (..., m); see :class:`SpectralLinearFunction`.

    Under autocast the token matmuls run in the autocast dtype; the factors stay float32.
    """
    device_type = x.device.type
    compute_dtype = None
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    with torch.autocast(device_type=device_type, enabled=False):
        return SpectralLinearFunction.apply(
            x, S, U_active, Vh_active, bias, U, Vh, idx, enhanced, compute_dtype
        )


def spectral_dtypes(x: torch.Tensor, S: torch.Tensor) -> tuple[torch.dtype | None, torch.dtype, torch.dtype]:
    """(autocast dtype or None, token-matmul dtype, weight-product dtype) of :func:`spectral_linear` for x."""
    device_type = x.device.type
    compute_dtype = None
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    dtype = compute_dtype if compute_dtype is not None else x.dtype
    return compute_dtype, dtype, _matmul_dtype(S, compute_dtype)


def inference_weight(U, S, Vh, idx, U_active, Vh_active, x: torch.Tensor) -> torch.Tensor:
    """The (m, n) weight :func:`spectral_linear` multiplies ``x`` with, already in the token dtype.

    Computed exactly as inside :class:`SpectralLinearFunction`, so that ``linear_with_weight`` on it gives
    bit-identical outputs; meant to be cached while the factors do not change (no gradients).
    """
    _, dtype, mm = spectral_dtypes(x, S)
    with torch.no_grad():
        return _weight(U, S, Vh, idx, U_active, Vh_active, mm).to(dtype)


def linear_with_weight(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x W^T + b in W's dtype, autocast off (the no-gradient twin of :func:`spectral_linear`)."""
    dtype = weight.dtype
    b = bias if bias is None or bias.dtype == dtype else bias.to(dtype)
    x = x if x.dtype == dtype else x.to(dtype)
    if torch.is_autocast_enabled(x.device.type):  # entering the context costs more than a small matmul
        with torch.autocast(device_type=x.device.type, enabled=False):
            return torch.nn.functional.linear(x, weight, b)
    return torch.nn.functional.linear(x, weight, b)


def effective_rank(S: torch.Tensor) -> float:
    """exp(entropy of S / sum(S)) (Roy & Vetterli): between 1 and k."""
    S = S.detach().to(torch.float32).clamp_min(0)
    total = S.sum()
    if total <= 0:
        return 0.0
    p = S / total
    p = p[p > 0]
    return float(math.exp(float(-(p * p.log()).sum())))


def orthogonality_error(U: torch.Tensor, Vh: torch.Tensor) -> float:
    """max(|U^T U - I|, |Vh Vh^T - I|) (max abs entry)."""
    U = U.detach().to(torch.float32)
    Vh = Vh.detach().to(torch.float32)
    eye = torch.eye(U.shape[1], device=U.device)
    return float(max((U.t() @ U - eye).abs().max(), (Vh @ Vh.t() - eye).abs().max()))
