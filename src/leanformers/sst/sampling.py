"""How SST chooses its active singular vectors, and what it reports about a spectrum (pure maths).

S is a (k,) vector of singular values; indices are int64 positions into it.
"""

from __future__ import annotations

import math

import torch

__all__ = ["SAMPLING_MODES", "effective_rank", "sample_indices", "sampling_probabilities"]

SAMPLING_MODES = ("multinomial", "uniform", "top_r", "sequential")


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


def effective_rank(S: torch.Tensor) -> float:
    """exp(entropy of S / sum(S)) (Roy & Vetterli): between 1 and k."""
    S = S.detach().to(torch.float32).clamp_min(0)
    total = S.sum()
    if total <= 0:
        return 0.0
    p = S / total
    p = p[p > 0]
    return float(math.exp(float(-(p * p.log()).sum())))
