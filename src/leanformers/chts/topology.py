"""Initial sparse topologies: ER (uniform), ERK layer densities, BRF (bipartite receptive field).

All functions are pure: shapes/densities in, boolean masks out, every random draw from the given
generator, exact link counts (round(density * out * in)).
"""

from __future__ import annotations

import math

import torch

from leanformers.chts.sampling import gumbel_noise

__all__ = ["brf_mask", "er_mask", "erk_densities", "link_count", "sparse_init_"]


def link_count(shape: tuple[int, int], density: float) -> int:
    """Exact number of links of a (out, in) matrix at ``density`` (at least 1)."""
    numel = int(shape[0]) * int(shape[1])
    return max(1, min(numel, int(round(float(density) * numel))))


def er_mask(
    shape: tuple[int, int], density: float, generator: torch.Generator | None = None, device="cpu"
) -> torch.Tensor:
    """Erdos-Renyi mask: exactly ``link_count`` links placed uniformly at random."""
    n_out, n_in = int(shape[0]), int(shape[1])
    k = link_count(shape, density)
    keys = torch.rand(n_out * n_in, generator=generator, device=device)
    idx = torch.topk(keys, k, sorted=False).indices
    mask = torch.zeros(n_out * n_in, dtype=torch.bool, device=device)
    mask[idx] = True
    return mask.view(n_out, n_in)


def erk_densities(shapes: list[tuple[int, int]], density: float) -> list[float]:
    """Erdos-Renyi-Kernel layer densities d_l proportional to (out + in) / (out * in).

    The total link count equals ``density`` times the total size; layers whose ERK density would
    exceed 1 are made dense and the remaining budget is redistributed over the others.
    """
    sizes = [int(o) * int(i) for o, i in shapes]
    total = density * sum(sizes)
    dense: set[int] = set()
    while True:
        budget = total - sum(sizes[j] for j in dense)
        raw = {j: (o + i) / (o * i) for j, (o, i) in enumerate(shapes) if j not in dense}
        denom = sum(raw[j] * sizes[j] for j in raw)
        if not raw or denom <= 0:
            break
        eps = budget / denom
        over = [j for j in raw if eps * raw[j] > 1.0]
        if not over:
            break
        dense.update(over)
    return [1.0 if j in dense else min(1.0, eps * raw[j]) for j in range(len(shapes))]


def brf_mask(
    shape: tuple[int, int],
    density: float,
    randomness: float = 0.25,
    generator: torch.Generator | None = None,
    device="cpu",
) -> torch.Tensor:
    """Bipartite receptive field mask with exactly ``link_count`` links.

    Nodes of the small side sit on a ring over the large side, node i centred at
    c_i = i * max(1, n_large // n_small) mod n_large. Each small-side node draws its degree
    (total / n_small, the remainder spread over the first nodes) columns of the large side without
    replacement with p proportional to (1 + ring distance)^(-(1 - r) / r): r = 0 takes the nearest
    neighbours, r = 1 is uniform (ER per node).
    """
    n_out, n_in = int(shape[0]), int(shape[1])
    small_is_out = n_out <= n_in
    n_small, n_large = (n_out, n_in) if small_is_out else (n_in, n_out)
    k = link_count(shape, density)
    base, extra = divmod(k, n_small)
    degrees = torch.full((n_small,), base, dtype=torch.long, device=device)
    degrees[:extra] += 1
    centres = (torch.arange(n_small, device=device) * max(1, n_large // n_small)) % n_large
    pos = torch.arange(n_large, device=device)
    diff = (pos[None, :] - centres[:, None]).abs()
    ring = torch.minimum(diff, n_large - diff).to(torch.float32)  # (small, large)
    noise = gumbel_noise((n_small, n_large), generator, torch.device(device))
    if randomness <= 0.0:
        # Nearest neighbours; ties (equal distance left/right) broken at random by a small noise.
        keys = -ring + 1e-3 * torch.sigmoid(noise)
    else:
        exponent = (1.0 - randomness) / randomness
        keys = -exponent * torch.log1p(ring) + noise
    k_max = int(degrees.max())
    idx = torch.topk(keys, k_max, dim=1).indices
    take = torch.arange(k_max, device=device)[None, :] < degrees[:, None]
    small_mask = torch.zeros((n_small, n_large), dtype=torch.bool, device=device)
    small_mask.scatter_(1, idx, take)
    return small_mask if small_is_out else small_mask.T.contiguous()


@torch.no_grad()
def sparse_init_(
    weight: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Re-draw ``weight`` (out, in) as N(0, 2 / (density * fan_in)) on links, 0 elsewhere (in place).

    A dense Kaiming init divides by the full fan-in; a neuron at 1 % density sees 1 % of its inputs,
    so its activations would shrink 10x without the rescaling.
    """
    density = float(mask.float().mean())
    std = math.sqrt(2.0 / max(density * weight.shape[1], 1e-12))
    draw = torch.randn(weight.shape, generator=generator, device=weight.device, dtype=torch.float32)
    weight.copy_((draw * std * mask.to(torch.float32)).to(weight.dtype))
    return weight
