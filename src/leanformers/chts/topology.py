"""Initial sparse topologies: ER (uniform), ERK layer densities, BRF (bipartite receptive field).

All functions are pure: shapes/densities in, boolean masks out, every random draw from the given
generator, exact link counts (round(density * out * in)).
"""

from __future__ import annotations

import math

import torch

from leanformers.chts.sampling import gumbel_noise, select

__all__ = [
    "BRF_DEGREE_KINDS",
    "SPARSE_INIT_FANS",
    "brf_degrees",
    "brf_mask",
    "correlated_mask",
    "er_mask",
    "erk_densities",
    "input_correlation",
    "link_count",
    "sparse_init_",
]


BRF_DEGREE_KINDS = ("fixed", "random")  # brf_degrees(kind=...)
SPARSE_INIT_FANS = ("in", "out")  # sparse_init_(fan=...)


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


def brf_degrees(
    n_small: int,
    n_large: int,
    k: int,
    kind: str = "fixed",
    generator: torch.Generator | None = None,
    device="cpu",
) -> torch.Tensor:
    """Degrees (LongTensor (n_small,), summing to exactly ``k``) of the small-side BRF nodes.

    fixed: k // n_small each, the remainder on the first nodes. random (the reference LLM code's
    ``degree_dist uniform``): every node gets 1 link, each of the other k - n_small links goes to a
    uniformly random node; a node above n_large gives its excess to random nodes below it (the
    reference drops it, losing links).
    """
    if kind == "fixed":
        base, extra = divmod(k, n_small)
        degrees = torch.full((n_small,), base, dtype=torch.long, device=device)
        degrees[:extra] += 1
        return degrees
    if kind not in BRF_DEGREE_KINDS:
        raise ValueError(f"BRF degrees {kind!r} is not one of {BRF_DEGREE_KINDS}")
    if k < n_small:
        raise ValueError(
            f"brf_degrees='random' gives each of the {n_small} small-side nodes at least one link, but the "
            f"layer holds only {k} links: raise the density or use brf_degrees='fixed'."
        )
    if k > n_small * n_large:
        raise ValueError(f"{k} links do not fit in a {n_small} x {n_large} layer")
    picks = torch.randint(n_small, (k - n_small,), generator=generator, device=device)
    degrees = 1 + torch.bincount(picks, minlength=n_small)
    while True:
        excess = int((degrees - n_large).clamp_min(0).sum())
        if not excess:
            return degrees
        degrees.clamp_max_(n_large)
        room = torch.nonzero(degrees < n_large).flatten()
        picks = room[torch.randint(len(room), (excess,), generator=generator, device=device)]
        degrees += torch.bincount(picks, minlength=n_small)


def brf_mask(
    shape: tuple[int, int],
    density: float,
    randomness: float = 0.25,
    generator: torch.Generator | None = None,
    device="cpu",
    degrees: str = "fixed",
) -> torch.Tensor:
    """Bipartite receptive field mask with exactly ``link_count`` links.

    Nodes of the small side sit on a ring over the large side, node i centred at
    c_i = i * max(1, n_large // n_small) mod n_large. Each small-side node draws its degree
    (:func:`brf_degrees`: ``"fixed"`` or ``"random"``) columns of the large side without replacement
    with p proportional to (1 + ring distance)^(-(1 - r) / r): r = 0 takes the nearest neighbours,
    r = 1 is uniform (ER per node).
    """
    n_out, n_in = int(shape[0]), int(shape[1])
    small_is_out = n_out <= n_in
    n_small, n_large = (n_out, n_in) if small_is_out else (n_in, n_out)
    k = link_count(shape, density)
    degree = brf_degrees(n_small, n_large, k, degrees, generator, device)
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
    k_max = int(degree.max())
    idx = torch.topk(keys, k_max, dim=1).indices
    take = torch.arange(k_max, device=device)[None, :] < degree[:, None]
    small_mask = torch.zeros((n_small, n_large), dtype=torch.bool, device=device)
    small_mask.scatter_(1, idx, take)
    return small_mask if small_is_out else small_mask.T.contiguous()


def input_correlation(x: torch.Tensor) -> torch.Tensor:
    """Pearson correlation (n, n) float32 of the n input features of samples ``x`` (N, n).

    Constant features (zero variance, e.g. MNIST's border pixels) correlate 0 with everything, and
    the diagonal is 0: a feature is not its own neighbour.
    """
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    x = x - x.mean(0, keepdim=True)
    std = x.pow(2).sum(0).sqrt()
    safe = torch.where(std > 0, std, torch.ones_like(std))
    corr = (x.T @ x) / (safe[:, None] * safe[None, :])
    corr = torch.where((std[:, None] > 0) & (std[None, :] > 0), corr, torch.zeros_like(corr))
    corr.fill_diagonal_(0.0)
    return corr.to(torch.float32)


def correlated_mask(
    correlation: torch.Tensor,
    shape: tuple[int, int],
    density: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Correlated sparse topological initialisation (CSTI) with exactly ``link_count`` links.

    The |input correlation| (n, n) is tiled over the (out, in) matrix, score[o, i] =
    |corr[o mod n, i mod n]| (the reference MLP code's ``--dim 2`` tiling, for every layer), and the
    links are the top-k scores, ties broken at random (the reference takes every score >= the k-th,
    which can give more links).
    """
    n_out, n_in = int(shape[0]), int(shape[1])
    n = correlation.shape[0]
    if correlation.dim() != 2 or correlation.shape[1] != n:
        raise ValueError(f"correlation must be square (n, n); got shape {tuple(correlation.shape)}")
    corr = torch.nan_to_num(correlation.detach().abs().to(torch.float32), nan=0.0)
    rows = torch.arange(n_out, device=corr.device) % n
    cols = torch.arange(n_in, device=corr.device) % n
    scores = corr[rows][:, cols]
    chosen, _ = select(scores, link_count(shape, density), None, "hard", 1.0, generator)
    return chosen


@torch.no_grad()
def sparse_init_(
    weight: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None, fan: str = "in"
) -> torch.Tensor:
    """Re-draw ``weight`` (out, in) as N(0, 2 / (density * fan)) on links, 0 elsewhere (in place).

    A dense Kaiming init divides by the full fan-in; a neuron at 1 % density sees 1 % of its inputs,
    so its activations would shrink 10x without the rescaling. ``fan="out"`` divides by
    density * out_features instead, as the reference code's ``swi`` does (numel / in_features).
    """
    if fan not in SPARSE_INIT_FANS:
        raise ValueError(f"fan={fan!r} is not one of {SPARSE_INIT_FANS}")
    density = float(mask.float().mean())
    width = weight.shape[1] if fan == "in" else weight.shape[0]
    std = math.sqrt(2.0 / max(density * width, 1e-12))
    draw = torch.randn(weight.shape, generator=generator, device=weight.device, dtype=torch.float32)
    weight.copy_((draw * std * mask.to(torch.float32)).to(weight.dtype))
    return weight
