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

Both act on the same linears as MPIFA (the block layout of ``leanformers.pifa.calibration``) so that
densities compare like with like. The maths (``asvd_factors``, ``semi_structured_mask``) is pure.
"""

from __future__ import annotations

import torch
from torch import nn

from leanformers.pifa.calibration import capture_block_inputs, find_layout, linear_weight, run_block
from leanformers.pifa.layer import LowRankLinear
from leanformers.pifa.rank import lowrank_rank

__all__ = ["asvd_compress", "asvd_factors", "semi_structured_mask", "wanda_2_4_prune"]


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
def wanda_2_4_prune(
    model: nn.Module, calibration: torch.Tensor, *, batch_size: int = 8, n: int = 2, m: int = 4
) -> dict:
    """2:4 semi-structured Wanda pruning of every targeted linear of ``model`` (in place).

    calibration: (nsamples, seqlen) token ids. Block by block, with the pruned model's inputs (see the
    module docstring). Returns {"targeted_before", "targeted_after"} (non-zero weights).
    """
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
        sq = {name: None for name in layout.modules}
        handles = []
        for name in layout.modules:

            def hook(mod, args, _name=name, _sq=sq):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                part = (x * x).sum(0)
                _sq[_name] = part if _sq[_name] is None else _sq[_name] + part

            handles.append(block.get_submodule(name).register_forward_pre_hook(hook))
        try:
            for s, c in zip(states, calls):
                run_block(block, s, c, device, dtype)
        finally:
            for h in handles:
                h.remove()
        for name in layout.modules:
            W = linear_weight(block.get_submodule(name))  # a view for GPT-2 Conv1D: masks in place either way
            scores = W.detach().float().abs() * sq[name].sqrt()[None, :]
            keep = semi_structured_mask(scores, n, m)
            W.mul_(keep.to(W.dtype))
            before += W.numel()
            after += int(keep.sum())
        # Feed the next block with the outputs of this PRUNED block (Wanda's sequential variant).
        states = [run_block(block, s, c, device, dtype) for s, c in zip(states, calls)]
    model.train(was_training)
    return {"targeted_before": before, "targeted_after": after}
