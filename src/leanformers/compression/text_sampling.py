"""Sampling maths of self-calibration (pure: tensors in, tensors out): the temperature schedule, nucleus
(top-p) sampling by inverse CDF on given uniform numbers, and per-window generator seeds."""

from __future__ import annotations

import hashlib

import torch

__all__ = ["inverse_cdf", "sample_top_p", "temperature_at", "window_seed"]


def temperature_at(position: torch.Tensor, start: float, end: float, tokens: int) -> torch.Tensor:
    """A linear temperature schedule: ``start`` at position 0, ``end`` from position ``tokens`` on.

    Args:
        position: (B,) tokens sampled since each row's last prompt (0: the first token of an answer).
    Returns:
        (B,) float64 temperatures.
    """
    frac = position.double().clamp(max=tokens) / tokens
    return start + frac * (end - start)


def sample_top_p(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: float, uniform: torch.Tensor, head: int = 1024
) -> torch.Tensor:
    """Nucleus sampling by inverse CDF: deterministic given the numbers ``uniform`` in [0, 1).

    Only the ``head`` most likely tokens are sorted (a full sort of a 50k vocabulary per token costs more
    than a small model's forward); a row whose nucleus is wider falls back to the full sort, so the result
    is the full sort's either way.

    Args:
        logits: (B, V); temperature: (B,) > 0; top_p: kept probability mass; uniform: (B,).
    Returns:
        (B,) token ids, each from the smallest set of most likely tokens whose mass reaches top_p.
    """
    probs = torch.softmax(logits.double() / temperature.double()[:, None], dim=-1)
    k = min(head, probs.shape[-1])
    sorted_p, order = probs.topk(k, dim=-1, sorted=True)
    wide = sorted_p.sum(-1) < top_p
    if bool(wide.any()):  # rare: a flat distribution (high temperature, untrained model)
        full_p, full_order = probs[wide].sort(dim=-1, descending=True, stable=True)
        rows = wide.nonzero().flatten()
        picked = torch.empty(probs.shape[0], dtype=torch.long)
        picked[rows] = inverse_cdf(full_p, full_order, top_p, uniform[wide])
        narrow = (~wide).nonzero().flatten()
        if narrow.numel():
            picked[narrow] = inverse_cdf(sorted_p[narrow], order[narrow], top_p, uniform[narrow])
        return picked
    return inverse_cdf(sorted_p, order, top_p, uniform)


def inverse_cdf(
    sorted_p: torch.Tensor, order: torch.Tensor, top_p: float, uniform: torch.Tensor
) -> torch.Tensor:
    """The token at ``uniform`` of the renormalised nucleus; sorted_p (B, K) descending, order its ids."""
    kept = (sorted_p.cumsum(-1) - sorted_p) < top_p  # the first token is always kept
    sorted_p = sorted_p * kept
    cum = sorted_p.cumsum(-1)
    target = uniform.double().reshape(-1, 1) * cum[:, -1:]
    pick = torch.searchsorted(cum, target, right=True)
    pick = torch.minimum(pick, kept.sum(-1, keepdim=True) - 1)
    return order.gather(-1, pick).squeeze(-1)


def window_seed(seed: int, index: int, segment: int = 0) -> int:
    """The generator seed of segment ``segment`` of window ``index`` of a run seeded ``seed`` (63 bits of a
    sha256); segment 0 has the seed a whole window had before windows were split into segments."""
    key = f"self-calibration:{seed}:{index}" + (f":{segment}" if segment else "")
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1
