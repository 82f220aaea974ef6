"""Optimizer-state surgery on (parts of) parameters, for Adam, AdamW and SGD.

SST resets the moments of re-sampled singular vectors; CHTss zeroes the moments of removed and
regrown links. Both go through these functions so that every supported optimizer is handled once.
"""

from __future__ import annotations

import torch

from leanformers.training.fsdp import local

__all__ = ["MOMENT_KEYS", "check_optimizer", "mask_state_", "reset_state", "unwrap_optimizer"]

# Per-element state tensors of the supported optimizers (shape == param.shape).
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")
_SUPPORTED = {torch.optim.Adam: "adam", torch.optim.AdamW: "adam", torch.optim.SGD: "sgd"}


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's ``AcceleratedOptimizer`` (or any ``.optimizer`` wrapper)."""
    seen = 0
    while type(optimizer) not in _SUPPORTED and hasattr(optimizer, "optimizer") and seen < 8:
        optimizer = optimizer.optimizer
        seen += 1
    return optimizer


def check_optimizer(optimizer: torch.optim.Optimizer) -> str:
    """Return ``"adam"`` or ``"sgd"`` for a supported optimizer; raise a clear error otherwise."""
    inner = unwrap_optimizer(optimizer)
    for cls, family in _SUPPORTED.items():
        if type(inner) is cls:
            return family
    raise ValueError(
        f"optimizer {type(inner).__module__}.{type(inner).__name__} is not supported: its state cannot be "
        "reset per element safely. Use torch.optim.Adam, AdamW or SGD (Trainer optim='adamw_torch', "
        "'adamw_torch_fused', 'adam' or 'sgd')."
    )


def _state_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict | None:
    state = unwrap_optimizer(optimizer).state
    return state.get(param) if param in state else None


@torch.no_grad()
def reset_state(
    optimizer: torch.optim.Optimizer,
    param: torch.Tensor,
    index: torch.Tensor | None = None,
    dim: int = 0,
) -> None:
    """Forget optimizer state of ``param``.

    Args:
        index: None drops the whole state, step count included (the next step starts afresh);
            otherwise a LongTensor of positions along ``dim`` whose moments are zeroed.
    """
    inner = unwrap_optimizer(optimizer)
    if param not in inner.state:
        return
    if index is None:
        del inner.state[param]
        return
    state = inner.state[param]
    for key in MOMENT_KEYS:
        buf = state.get(key)
        if isinstance(buf, torch.Tensor) and buf.shape == param.shape:
            buf.index_fill_(dim, index.to(buf.device), 0)


@torch.no_grad()
def mask_state_(optimizer: torch.optim.Optimizer, param: torch.Tensor, mask: torch.Tensor) -> None:
    """Zero the moments of ``param`` wherever ``mask`` (bool, broadcastable to param) is False.

    Under FSDP2 (DTensor ``param`` and moments) ``mask`` is this rank's shard, laid out like the
    parameter's local shard; only the local moments are touched.
    """
    state = _state_of(optimizer, param)
    if not state:
        return
    # A bool mask multiplies through its zero-copy 0/1 uint8 view: no copy in the moment's dtype.
    factor = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    for key in MOMENT_KEYS:
        buf = state.get(key)
        if isinstance(buf, torch.Tensor) and buf.shape == param.shape:
            shard = local(buf)
            shard.mul_(factor.to(device=shard.device))
