"""Selection of exactly k entries per row: soft (sampling without replacement) or hard (top-k).

Soft sampling draws k entries without replacement with probability proportional to score**T by
the Gumbel-top-k trick in log space: keys T * log(score) + Gumbel noise, keep the k largest. It
works for any number of entries (``torch.multinomial`` refuses more than 2**24 categories) and
never underflows (score**9 of a small weight is 0 in float32, its logarithm is not).

Entries with score 0 (or outside ``candidates``) are never chosen while enough positive ones
exist; when fewer than k positive candidates exist, the rest is filled uniformly at random among
the remaining candidates (never by top-k tie order) and the number filled is returned.
"""

from __future__ import annotations

import torch

__all__ = ["SAMPLING_MODES", "gumbel_noise", "select", "select_mask"]

# "soft": without replacement, probability proportional to score**T; "hard": top-k, random tie breaking.
SAMPLING_MODES = ("soft", "hard")


def gumbel_noise(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Standard Gumbel noise -log(-log U), float32."""
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    return -torch.log(-torch.log(u.clamp(tiny, 1.0 - 1e-7)))


def _rowwise_topk_mask(keys: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean (rows, n) mask of the k[r] largest finite keys of each row (k[r] <= finite count)."""
    rows, n = keys.shape
    out = torch.zeros_like(keys, dtype=torch.bool)
    k_max = int(k.max().item()) if rows else 0
    if k_max <= 0:
        return out
    _, idx = torch.topk(keys, k_max, dim=1, sorted=True)
    take = torch.arange(k_max, device=keys.device)[None, :] < k[:, None]
    out.scatter_(1, idx, take)
    return out


@torch.no_grad()
def select_mask(
    scores: torch.Tensor,
    k: torch.Tensor | int,
    candidates: torch.Tensor | None = None,
    mode: str = "soft",
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, int]:
    """Choose exactly ``k[r]`` entries of each row of ``scores``.

    Args:
        scores: (rows, n) non-negative float scores (a single matrix is passed as (1, numel)).
        k: per-row counts (LongTensor (rows,)) or one int for every row; k[r] must not exceed the
            number of candidates of row r.
        candidates: (rows, n) bool, entries that may be chosen (None: all).
        mode: "soft" (probability proportional to score**temperature, without replacement) or
            "hard" (largest scores; ties broken at random).
        temperature: exponent T of the soft rule (1 = proportional to the score).
        generator: torch.Generator on the scores' device (seeded: all ranks draw the same).

    Returns:
        (chosen, n_filled): bool (rows, n) with exactly k[r] True per row, and how many entries were
        filled uniformly because too few candidates had a positive score.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (rows, n); got shape {tuple(scores.shape)}")
    if mode not in SAMPLING_MODES:
        raise ValueError(f"mode={mode!r} is not one of {SAMPLING_MODES}")
    rows, n = scores.shape
    device = scores.device
    if isinstance(k, int):
        k = torch.full((rows,), k, dtype=torch.long, device=device)
    k = k.to(device=device, dtype=torch.long)
    if candidates is None:
        candidates = torch.ones_like(scores, dtype=torch.bool)
    n_candidates = candidates.sum(1)
    if bool((k > n_candidates).any()) or bool((k < 0).any()):
        bad = int(torch.nonzero((k > n_candidates) | (k < 0))[0, 0])
        raise ValueError(
            f"row {bad}: asked for {int(k[bad])} entries but only {int(n_candidates[bad])} candidates exist"
        )
    scores = scores.to(torch.float32)
    perm = None
    if mode == "hard":
        # Random tie breaking for top-k: permute the columns, so that whichever of equal scores
        # torch.topk prefers is a uniformly random one of the original entries.
        perm = torch.randperm(n, generator=generator, device=device)
        scores, candidates = scores[:, perm], candidates[:, perm]
    positive = candidates & (scores > 0)
    n_positive = positive.sum(1)
    k_first = torch.minimum(k, n_positive)

    neg_inf = torch.tensor(float("-inf"), device=device)
    if mode == "soft":
        keys = temperature * torch.log(torch.where(positive, scores, torch.ones_like(scores)))
        keys = keys + gumbel_noise((rows, n), generator, device)
    else:
        keys = scores
    keys = torch.where(positive, keys, neg_inf)
    chosen = _rowwise_topk_mask(keys, k_first)

    k_fill = k - k_first
    n_filled = int(k_fill.sum().item())
    if n_filled:
        rest = candidates & ~chosen
        fill_keys = torch.where(rest, torch.rand((rows, n), generator=generator, device=device), neg_inf)
        chosen |= _rowwise_topk_mask(fill_keys, k_fill)
    if perm is not None:
        unpermuted = torch.empty_like(chosen)
        unpermuted[:, perm] = chosen
        chosen = unpermuted
    return chosen, n_filled


@torch.no_grad()
def select(
    scores: torch.Tensor,
    k: int,
    candidates: torch.Tensor | None = None,
    mode: str = "soft",
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, int]:
    """:func:`select_mask` on a matrix of any shape as one row: returns a bool mask of its shape."""
    flat_candidates = None if candidates is None else candidates.reshape(1, -1)
    chosen, filled = select_mask(scores.reshape(1, -1), int(k), flat_candidates, mode, temperature, generator)
    return chosen.reshape(scores.shape), filled
