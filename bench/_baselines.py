"""Bench-only baselines for BENCHMARKS.md §1 (not part of the package API).

- ASVD (Yuan et al. 2023, "ASVD: Activation-aware Singular Value Decomposition"): scale the input
  channels of W by s_j = mean_t |x_tj|^alpha (alpha 0.5) measured on the DENSE model, truncate the
  SVD of W diag(s) to the low-rank budget and fold diag(s)^-1 back into V:
      W diag(s) ~= U_r Sigma_r V_r^T  ->  W ~= (U_r Sigma_r^1/2) (Sigma_r^1/2 V_r^T diag(s)^-1).
  The statistics come from forward hooks on every targeted linear during one pass of the dense model.
- 2:4 Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs"): score
  |W_ij| * ||X_j||_2 and keep the 2 best of every 4 consecutive inputs of each output row. As in the
  Wanda code, blocks are pruned one after another: the inputs of block i come from the already
  pruned blocks 0..i-1; every linear of a block gets its input norms from one pass of the (not yet
  pruned) block on those inputs, then the block is pruned and replayed to feed block i + 1.
- 2:4 SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
  Pruned in One-Shot"): the same block-sequential walk, but each linear is pruned column by column
  with the inverse-Hessian error compensation of Optimal Brain Surgeon, H = X^T X + damping; the 2 of
  every 4 inputs to drop are chosen per row by w^2 / [H^-1]_jj^2 when the group is reached.

All act on the same linears as MPIFA (the block layout of ``leanformers.compression.layout``) so that
densities compare like with like. The maths (``asvd_factors``, ``semi_structured_mask``) is pure.
"""

from __future__ import annotations

import torch
from torch import nn

from leanformers.compression.layout import find_layout, linear_weight
from leanformers.compression.replay import capture_block_inputs, run_block
from leanformers.storage.layers import LowRankLinear
from leanformers.storage.rank import lowrank_rank

__all__ = [
    "asvd_compress",
    "asvd_factors",
    "semi_structured_mask",
    "sparsegpt_2_4_prune",
    "sparsegpt_prune_weight",
    "wanda_2_4_prune",
]


# ---------------------------------------------------------------------------------------------
# pure maths
# ---------------------------------------------------------------------------------------------
def asvd_factors(
    W: torch.Tensor, mean_abs: torch.Tensor, rank: int, alpha: float = 0.5, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """ASVD factors of ``W`` (m, n) at ``rank`` from the mean |x| per input feature ``mean_abs`` (n,).

    Returns U (m, rank) and V (rank, n) in float32 with U V ~= W (exact when rank = min(m, n)).
    """
    if W.ndim != 2 or mean_abs.shape != (W.shape[1],):
        raise ValueError(
            f"expected W (m, n) and mean_abs (n,), got {tuple(W.shape)} and {tuple(mean_abs.shape)}"
        )
    if not 1 <= rank <= min(W.shape):
        raise ValueError(f"rank must lie in [1, {min(W.shape)}] for W {tuple(W.shape)}, got {rank}")
    # Dead input channels (mean |x| = 0) would make diag(s) singular: floor the scale.
    scale = mean_abs.double().clamp_min(eps).pow(alpha)
    U, S, Vh = torch.linalg.svd(W.double() * scale, full_matrices=False)
    root = S[:rank].sqrt()
    left = U[:, :rank] * root
    right = (root[:, None] * Vh[:rank]) / scale
    return left.float(), right.float()


def semi_structured_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Boolean keep-mask with the ``n`` largest of every ``m`` consecutive entries of each row.

    scores: (rows, cols), cols divisible by ``m``. Returns a bool tensor of the same shape with exactly
    ``n`` True per group (ties broken by position).
    """
    if scores.ndim != 2 or scores.shape[1] % m:
        raise ValueError(
            f"N:M sparsity needs a 2-D score matrix whose width is a multiple of {m}, got {tuple(scores.shape)}"
        )
    if not 0 < n <= m:
        raise ValueError(f"need 0 < n <= m, got n={n}, m={m}")
    groups = scores.reshape(scores.shape[0], -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(scores.shape)


@torch.no_grad()
def sparsegpt_prune_weight(
    W: torch.Tensor, H: torch.Tensor, *, n: int = 2, m: int = 4, blocksize: int = 128, damp: float = 0.01
) -> torch.Tensor:
    """SparseGPT's N:M pruning of one weight: returns the pruned and compensated copy of ``W``.

    W: (rows, cols) weight acting on inputs x of width cols; H: (cols, cols) input Gram matrix
    sum_t x_t x_t^T (any positive scale). ``damp`` times the mean of diag(H) is added to the diagonal
    (dead inputs, diag 0, get weight 0). Columns are visited left to right; when column j starts a
    group of ``m`` the ``m - n`` entries of each row with the least w^2 / [H^-1]_jj^2 are dropped; each
    dropped or kept column's error is pushed onto the columns to its right through the upper Cholesky
    factor of H^-1 (lazily, ``blocksize`` columns at a time, which gives the same result as one column
    at a time). The output has exactly ``n`` non-zeros in every group of ``m`` (if W had them).
    """
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(
            f"H must be ({cols}, {cols}) for a weight of shape {tuple(W.shape)}, got {tuple(H.shape)}"
        )
    if cols % m or blocksize % m:
        raise ValueError(f"the width ({cols}) and blocksize ({blocksize}) must be multiples of m={m}")
    W = W.detach().double().clone()
    H = H.detach().double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * torch.diag(H).mean())
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        drop = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if i % m == 0:
                saliency = W1[:, i : i + m] ** 2 / torch.diag(Hinv1)[i : i + m] ** 2
                drop[:, i : i + m].scatter_(1, saliency.topk(m - n, dim=1, largest=False).indices, True)
            w, d = W1[:, i], Hinv1[i, i]
            q = torch.where(drop[:, i], torch.zeros_like(w), w)
            err = (w - q) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W


# ---------------------------------------------------------------------------------------------
# glue (model walking)
# ---------------------------------------------------------------------------------------------
def _targeted(model: nn.Module) -> list[tuple[str, nn.Module]]:
    layout, blocks = find_layout(model)
    return [
        (f"{i}.{name}", block.get_submodule(name))
        for i, block in enumerate(blocks)
        for name in layout.modules
    ]


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def asvd_compress(
    model: nn.Module, calibration: torch.Tensor, density: float, *, alpha: float = 0.5, batch_size: int = 8
) -> dict:
    """Replace every targeted linear of ``model`` by an ASVD LowRankLinear at ``density`` (in place).

    calibration: (nsamples, seqlen) token ids, run through the dense model once. Ranks follow the
    low-rank budget r = floor(density m n / (m + n)). Returns {"targeted_before", "targeted_after"}.
    """
    targets = _targeted(model)
    sums = {key: None for key, _ in targets}
    count = {key: 0 for key, _ in targets}
    handles = []
    for key, module in targets:

        def hook(mod, args, _key=key):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            part = x.abs().sum(0)
            sums[_key] = part if sums[_key] is None else sums[_key] + part
            count[_key] += x.shape[0]

        handles.append(module.register_forward_pre_hook(hook))
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        for batch in calibration.split(batch_size):
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    # Modules are looked up by path again: replacing a child changes nothing upstream.
    layout, blocks = find_layout(model)
    before = after = 0
    for i, block in enumerate(blocks):
        for name in layout.modules:
            key = f"{i}.{name}"
            module = block.get_submodule(name)
            W = linear_weight(module).detach().float()
            m, n = W.shape
            rank = lowrank_rank(m, n, density)
            U, V = asvd_factors(W, sums[key] / max(1, count[key]), rank, alpha)
            bias = module.bias.detach().float() if getattr(module, "bias", None) is not None else None
            new = LowRankLinear.from_factors(U, V, bias, dtype=module.weight.dtype).to(module.weight.device)
            block.set_submodule(name, new)
            before += m * n
            after += new.num_parameters
    model.train(was_training)
    return {"targeted_before": before, "targeted_after": after}


@torch.no_grad()
def _prune_blocks_sequentially(model: nn.Module, calibration: torch.Tensor, batch_size: int, prune) -> dict:
    """Walk the blocks in order: Gram matrices of every linear's inputs from one pass of the (not yet
    pruned) block, ``prune(W, G)`` -> new W for each linear, then replay the PRUNED block to feed the next
    one (the sequential variant of the Wanda and SparseGPT code). Returns non-zero weight counts."""
    layout, blocks = find_layout(model)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    states, calls = capture_block_inputs(
        model, blocks, list(calibration.split(batch_size)), stream_device=device
    )
    before = after = 0
    for block in blocks:
        dtype = next(block.parameters()).dtype
        gram = {name: None for name in layout.modules}
        handles = []
        for name in layout.modules:

            def hook(mod, args, _name=name, _gram=gram):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                part = x.T @ x
                _gram[_name] = part if _gram[_name] is None else _gram[_name] + part

            handles.append(block.get_submodule(name).register_forward_pre_hook(hook))
        try:
            for s, c in zip(states, calls):
                run_block(block, s, c, device, dtype)
        finally:
            for h in handles:
                h.remove()
        for name in layout.modules:
            W = linear_weight(
                block.get_submodule(name)
            )  # a view for GPT-2 Conv1D: written in place either way
            before += W.numel()
            W.copy_(prune(W.detach().float(), gram[name]).to(W.dtype))
            after += int(torch.count_nonzero(W))
        states = [run_block(block, s, c, device, dtype) for s, c in zip(states, calls)]
    model.train(was_training)
    return {"targeted_before": before, "targeted_after": after}


def wanda_2_4_prune(
    model: nn.Module, calibration: torch.Tensor, *, batch_size: int = 8, n: int = 2, m: int = 4
) -> dict:
    """2:4 semi-structured Wanda pruning of every targeted linear of ``model`` (in place).

    calibration: (nsamples, seqlen) token ids. Block by block, with the pruned model's inputs (see the
    module docstring). Returns {"targeted_before", "targeted_after"} (non-zero weights).
    """

    def prune(W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        keep = semi_structured_mask(W.abs() * torch.diag(G).sqrt()[None, :], n, m)  # |W_ij| ||X_j||
        return W * keep

    return _prune_blocks_sequentially(model, calibration, batch_size, prune)


def sparsegpt_2_4_prune(
    model: nn.Module, calibration: torch.Tensor, *, batch_size: int = 8, n: int = 2, m: int = 4
) -> dict:
    """2:4 SparseGPT pruning of every targeted linear of ``model`` (in place), block by block with the
    pruned model's inputs, damping 1 % and 128-column lazy batches as in the paper.
    Returns {"targeted_before", "targeted_after"} (non-zero weights)."""
    return _prune_blocks_sequentially(
        model, calibration, batch_size, lambda W, G: sparsegpt_prune_weight(W, G, n=n, m=m)
    )
