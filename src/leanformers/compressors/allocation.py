"""Density allocation across modules: global, attention/MLP split, OWL layer-wise, and data-driven
from the whitened spectra (pure maths)."""

from __future__ import annotations

import heapq

import torch

from leanformers.compressors.reconstruct import cholesky_with_damping
from leanformers.storage.rank import lowrank_num_params, lowrank_rank, pifa_num_params, pifa_rank

__all__ = [
    "default_rank_multiple",
    "module_ranks",
    "outlier_ratio",
    "owl_densities",
    "solve_mlp_density",
    "spectrum_bounds",
    "spectrum_ranks",
    "whitened_spectrum",
]


def solve_mlp_density(
    attn_shapes: list[tuple[int, int]], mlp_shapes: list[tuple[int, int]], density: float, attn_density: float
) -> float:
    """MLP density that keeps the block budget when attention gets ``attn_density``.

    density * sum(m n) = attn_density * sum_attn(m n) + d_mlp * sum_mlp(m n).
    """
    attn = sum(m * n for m, n in attn_shapes)
    mlp = sum(m * n for m, n in mlp_shapes)
    if mlp == 0:
        raise ValueError("attn_density needs MLP modules among the targets to keep the budget")
    d_mlp = (density * (attn + mlp) - attn_density * attn) / mlp
    if not 0.0 < d_mlp <= 1.0:
        raise ValueError(
            f"attn_density={attn_density} with density={density} leaves an MLP density of {d_mlp:.3f}, "
            "outside (0, 1]; move attn_density closer to density"
        )
    return d_mlp


def outlier_ratio(weight: torch.Tensor, input_norm: torch.Tensor, threshold: float = 5.0) -> tuple[int, int]:
    """OWL outliers of one linear: entries with |W_ij| ||X_j|| > threshold * mean(|W| ||X||).

    Args: weight (m, n); input_norm (n,) L2 norm of each input feature over the calibration tokens.
    Returns (outlier count, m n) so that a layer's ratio can pool several linears.
    """
    score = weight.abs().float() * input_norm.float()[None, :].to(weight.device)
    return int((score > threshold * score.mean()).sum()), score.numel()


def owl_densities(ratios: list[float], sizes: list[int], density: float, lam: float = 0.08) -> list[float]:
    """Layer densities following the outlier share (OWL), keeping the size-weighted mean at ``density``.

    Layers with more outliers keep more: d_l = density + lam * (2 (D_l - min) / (max - min) - 1), then
    shifted so that sum(d_l * size_l) = density * sum(size_l), clipped to (0, 1] (re-balanced).
    """
    if not 0.0 <= lam < density:
        raise ValueError(f"OWL lambda {lam} must lie in [0, density={density})")
    if density >= 1.0:  # every layer full: nothing to move (clipping at 1 would not converge to it)
        return [1.0] * len(ratios)
    r = torch.tensor(ratios, dtype=torch.float64)
    w = torch.tensor(sizes, dtype=torch.float64)
    spread = r.max() - r.min()
    d = torch.full_like(r, density) if spread == 0 else density + lam * (2 * (r - r.min()) / spread - 1)
    for _ in range(20):
        d = d + (density * w.sum() - (d * w).sum()) / w.sum()
        clipped = d.clamp(1e-3, 1.0)
        if torch.equal(clipped, d):
            break
        d = clipped
    return d.tolist()


def module_ranks(
    shapes: dict[str, tuple[int, int]],
    densities: dict[str, float],
    *,
    kind: str = "pifa",
    rank_multiple: int | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, int]:
    """Largest rank per module whose stored parameters stay within density * m * n.

    Rounding to ``rank_multiple`` goes down, so the budget is never exceeded (the reference rounds up
    after M and overshoots). ``rank_multiple=None`` picks ``default_rank_multiple(device)``: 8 on a GPU,
    where an odd rank misaligns the tensor-core operands of both GEMMs, 1 on the CPU.
    """
    if rank_multiple is None:
        rank_multiple = default_rank_multiple(device)
    fn = pifa_rank if kind == "pifa" else lowrank_rank
    return {name: fn(m, n, densities[name], round_to=rank_multiple) for name, (m, n) in shapes.items()}


def default_rank_multiple(device: torch.device | str) -> int:
    """8 for CUDA devices (fp16/bf16 tensor cores want K and N multiples of 8), 1 elsewhere."""
    return 8 if torch.device(device).type == "cuda" else 1


def whitened_spectrum(weight: torch.Tensor, gram: torch.Tensor | None) -> torch.Tensor:
    """Squared singular values of W L, where S = X X^T = L L^T, descending (min(m, n),) float64.

    sum_{i > r} sigma_i^2 is the error ||W X - U V X||_F^2 of the best rank-r factors in the metric
    of the calibration inputs (SVD-LLM's truncation loss). Computed as the eigenvalues of the smaller
    of W S W^T (m, m) and L^T W^T W L (n, n). ``gram`` None: the plain spectrum of W (S = I).
    Args: weight (m, n); gram (n, n) S of the linear's input.
    """
    W = weight.double()
    m, n = W.shape
    if gram is None:
        C = W @ W.T if m <= n else W.T @ W
    elif m <= n:
        C = W @ gram.double() @ W.T
    else:
        WL = W @ cholesky_with_damping(gram)
        C = WL.T @ WL
    C = (C + C.T) / 2  # exact symmetry for eigvalsh
    return torch.linalg.eigvalsh(C).flip(0).clamp_min(0)


def spectrum_bounds(density: float) -> tuple[float, float]:
    """Density range of one linear under ``allocation="spectrum"``: [density / 2, min(1, 1.5 density)].

    The spectra measure each linear's own output error, not what it does to the loss downstream; the
    bounds keep the greedy from emptying a linear whose error matters more than its spectrum says.
    """
    return density / 2, min(1.0, 1.5 * density)


def spectrum_ranks(
    spectra: dict[str, torch.Tensor],
    shapes: dict[str, tuple[int, int]],
    density: float,
    *,
    kind: str = "pifa",
    rank_multiple: int = 1,
    bounds: tuple[float, float] | None = None,
) -> dict[str, int]:
    """Ranks under one global budget, placed where they cut the most relative truncation loss.

    Every linear j starts at the rank of the lower density bound; then, greedily, the next
    ``rank_multiple`` ranks of the linear with the largest gain per stored parameter are added, where
    gain = m n (sigma_r^2 + ...) / sum_i sigma_i^2: the share of the linear's whitened output energy
    the ranks recover, weighted by the linear's size so that linears whose spectra have the same shape
    keep the same density (unweighted shares favour the small linears, whose ranks are cheap). The
    cost counts what the layer stores (PIFA: r(m + n) - r^2, so its cheaper high ranks are accounted
    for; low-rank: r(m + n)). Stops when no step fits the budget
    density * sum(m n). Never exceeds the budget, never leaves [bounds] (``spectrum_bounds`` by default).
    Args: spectra key -> (min(m, n),) squared singular values, descending; shapes key -> (m, n).
    Returns key -> rank (a multiple of ``rank_multiple`` where the bounds allow).
    """
    if set(spectra) != set(shapes):
        raise ValueError("spectra and shapes must name the same linears")
    lo_d, hi_d = bounds if bounds is not None else spectrum_bounds(density)
    if not 0.0 < lo_d <= density <= hi_d <= 1.0:
        raise ValueError(f"bounds {lo_d}, {hi_d} must satisfy 0 < low <= density={density} <= high <= 1")
    params = pifa_num_params if kind == "pifa" else lowrank_num_params
    rank_of = pifa_rank if kind == "pifa" else lowrank_rank
    budget = density * sum(m * n for m, n in shapes.values())
    ranks, caps, heap = {}, {}, []

    def push(key: str) -> None:
        m, n = shapes[key]
        r = ranks[key]
        nxt = min(r + rank_multiple, caps[key])
        if nxt <= r:
            return
        energy = float(spectra[key].sum()) or 1.0
        gain = m * n * float(spectra[key][r:nxt].sum()) / energy
        cost = params(m, n, nxt) - params(m, n, r)
        heapq.heappush(heap, (-gain / cost, key, nxt, cost))

    for key, (m, n) in shapes.items():
        ranks[key] = rank_of(m, n, lo_d, round_to=rank_multiple)
        caps[key] = rank_of(m, n, hi_d, round_to=rank_multiple)
    spent = sum(params(*shapes[k], r) for k, r in ranks.items())
    for key in shapes:
        push(key)
    while heap:
        _, key, nxt, cost = heapq.heappop(heap)
        if spent + cost > budget:
            continue  # this linear's next step does not fit; smaller ones elsewhere still may
        ranks[key], spent = nxt, spent + cost
        push(key)
    return ranks
