"""Pure maths of Sparse Spectral Training: tensors in, tensors out (no modules, no optimizer, no I/O).

Shapes follow the linear-layer convention W (m, n) = (out, in), k = min(m, n), W = U diag(S) Vh with
U (m, k), S (k,), Vh (k, n), and r active singular-vector pairs at indices ``idx`` (r,). T is the
number of tokens of one call (all leading dimensions of x).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = [
    "SPECTRAL_PATHS",
    "FactoredSpectralLinearFunction",
    "SpectralLinearFunction",
    "effective_weight",
    "factored_is_cheaper",
    "inference_weight",
    "linear_with_weight",
    "orthogonality_error",
    "spectral_dtypes",
    "spectral_linear",
    "thin_svd",
    "thin_svds",
]

SPECTRAL_PATHS = ("auto", "factored", "materialized")


@contextlib.contextmanager
def _one_intra_op_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


def thin_svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in float32 on the weight's device.

    On the CPU it runs on one intra-op thread: MKL's multi-threaded SVD returns other bits for other
    thread counts, and a compact adapter recomputes the base model's SVD on reload, bit for bit.

    Args:
        weight: (m, n) in any float dtype.
    Returns:
        U (m, k), S (k,) descending and >= 0, Vh (k, n); all float32.
    """
    if weight.device.type == "meta":
        raise ValueError("cannot take the SVD of a meta tensor: materialise the weights first")
    dense = weight.detach().to(torch.float32)
    if dense.device.type == "cpu":
        with _one_intra_op_thread():
            U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    else:
        U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    return U.contiguous(), S.contiguous(), Vh.contiguous()


def thin_svds(
    weights: Sequence[torch.Tensor], workers: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`thin_svd` of every weight, in order, several CPU weights at a time.

    Each SVD runs on one thread (same bits as :func:`thin_svd`); up to ``workers`` (default: torch's
    intra-op thread count) run side by side, which is faster than one multi-threaded SVD after another
    for LLM-sized matrices. GPU weights are factorised one after another on their device.
    """
    workers = torch.get_num_threads() if workers is None else workers
    cpu = all(w.device.type == "cpu" for w in weights)
    if workers <= 1 or len(weights) <= 1 or not cpu:
        for weight in weights:
            yield thin_svd(weight)
        return
    with ThreadPoolExecutor(max_workers=min(workers, len(weights))) as pool:
        yield from pool.map(thin_svd, weights)


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
    """y = x W^T (+ b) with W = U_eff diag(S) Vh_eff built once per forward (the *materialised* path).

    The weight is built once per call (O(m n k), independent of the token count), the token matmuls
    are the dense ones, and the factor gradients come from the dense weight gradient dW = dy^T x (one
    layer at a time, never stored; :class:`FactoredSpectralLinearFunction` is the other path):

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


class FactoredSpectralLinearFunction(torch.autograd.Function):
    """y = ((x Vh_eff^T) * S) U_eff^T (+ b): the *factored* path, no (m, n) weight built.

    Costs T k (m + n) per direction instead of the materialised path's O(m n k) weight builds plus
    three dense token products (forward, dx, dW); it never forms dW. With z = x Vh_eff^T (T, k) and
    gz = dy U_eff (T, k), the gradients are (enhanced: the S_a factor left out, as in the other path):

        dS        = sum over tokens of gz * z
        dU_active = dy^T z[:, idx]                 (times S_a when not enhanced)
        dVh_active = gz[:, idx]^T x                (times S_a when not enhanced)
        dx        = (gz * S) Vh_eff

    U_eff / Vh_eff are never copied: the stale ``idx`` slots of U / Vh are masked out and the active
    vectors added as an (·, r) product. Token products run in the token dtype (the autocast dtype under
    autocast); the gradients are handed back in the factors' dtype.
    """

    @staticmethod
    def forward(ctx, x, S, U_active, Vh_active, bias, U, Vh, idx, enhanced: bool, compute_dtype):
        dtype = compute_dtype if compute_dtype is not None else x.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        z = x2 @ Vh.to(dtype).t()  # (T, k); the idx columns are stale and replaced next
        z.index_copy_(1, idx, x2 @ Vh_active.to(dtype).t())
        zs = z * S.to(dtype)
        y = zs.index_fill(1, idx, 0) @ U.to(dtype).t() + zs.index_select(1, idx) @ U_active.to(dtype).t()
        if bias is not None:
            y = y + bias.to(dtype)
        ctx.save_for_backward(x2, z, S, U_active, Vh_active, U, Vh, idx)
        ctx.enhanced = enhanced
        ctx.dtype = dtype
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, z, S, U_active, Vh_active, U, Vh, idx = ctx.saved_tensors
        dtype, work = ctx.dtype, _work_dtype(S)
        with torch.no_grad():
            g2 = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
            gz = g2 @ U.to(dtype)  # (T, k); idx columns replaced by the active vectors' next
            gz.index_copy_(1, idx, g2 @ U_active.to(dtype))
            grad_S = (gz.to(work) * z.to(work)).sum(dim=0)
            grad_x = None
            if ctx.needs_input_grad[0]:
                gzs = gz * S.to(dtype)
                grad_x = gzs.index_fill(1, idx, 0) @ Vh.to(dtype) + gzs.index_select(1, idx) @ Vh_active.to(
                    dtype
                )
                grad_x = grad_x.reshape(ctx.x_shape).to(ctx.x_dtype)
            grad_U_a = (g2.t() @ z.index_select(1, idx)).to(work)  # (m, r)
            grad_Vh_a = (gz.index_select(1, idx).t() @ x2).to(work)  # (r, n)
            if not ctx.enhanced:
                S_a = S.to(work).index_select(0, idx)
                grad_U_a = grad_U_a * S_a[None, :]
                grad_Vh_a = grad_Vh_a * S_a[:, None]
            grad_b = None
            if ctx.bias_dtype is not None and ctx.needs_input_grad[4]:
                grad_b = g2.sum(dim=0).to(ctx.bias_dtype)
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


def factored_is_cheaper(tokens: int, m: int, n: int, k: int) -> bool:
    """Whether one training call (forward + backward) of an (m, n) SST layer on ``tokens`` tokens costs
    fewer multiply-adds factored than materialised.

    Factored: 2 T k (m + n). Materialised: the weight built twice (forward, backward) and U_eff^T dW
    (3 m n k) plus the forward, dx and dW products (3 T m n). The r-sized terms of both are left out.
    Fine-tuning batches (T of a few hundred) favour the factored path; large pretraining batches on
    square layers (T > about 3k) the materialised one.
    """
    return 2 * tokens * k * (m + n) < 3 * m * n * k + 3 * tokens * m * n


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
    path: str = "auto",
) -> torch.Tensor:
    """Apply the SST layer to x (..., n) -> (..., m) with gradients for S and the active vectors.

    Args:
        path: ``"auto"`` (per call, :func:`factored_is_cheaper` on this call's token count),
            ``"factored"`` (:class:`FactoredSpectralLinearFunction`) or ``"materialized"``
            (:class:`SpectralLinearFunction`). Both compute the same function and gradients.

    Under autocast the token matmuls run in the autocast dtype; the factors stay float32.
    """
    if path not in SPECTRAL_PATHS:
        raise ValueError(f"unknown SST path {path!r}; use one of {SPECTRAL_PATHS}")
    m, n = U.shape[0], Vh.shape[1]
    if path == "auto":
        path = "factored" if factored_is_cheaper(x.numel() // n, m, n, S.shape[0]) else "materialized"
    function = FactoredSpectralLinearFunction if path == "factored" else SpectralLinearFunction
    device_type = x.device.type
    compute_dtype = None
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    with torch.autocast(device_type=device_type, enabled=False):
        return function.apply(x, S, U_active, Vh_active, bias, U, Vh, idx, enhanced, compute_dtype)


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


def orthogonality_error(U: torch.Tensor, Vh: torch.Tensor) -> float:
    """max(|U^T U - I|, |Vh Vh^T - I|) (max abs entry)."""
    U = U.detach().to(torch.float32)
    Vh = Vh.detach().to(torch.float32)
    eye = torch.eye(U.shape[1], device=U.device)
    return float(max((U.t() @ U - eye).abs().max(), (Vh @ Vh.t() - eye).abs().max()))
