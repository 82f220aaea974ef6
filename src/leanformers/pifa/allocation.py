"""Density allocation across modules: global, attention/MLP split, OWL layer-wise (pure maths)."""

from __future__ import annotations

import torch

__all__ = ["default_rank_multiple", "module_ranks", "outlier_ratio", "owl_densities", "solve_mlp_density"]


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
    from leanformers.pifa.rank import lowrank_rank, pifa_rank

    if rank_multiple is None:
        rank_multiple = default_rank_multiple(device)
    fn = pifa_rank if kind == "pifa" else lowrank_rank
    return {name: fn(m, n, densities[name], round_to=rank_multiple) for name, (m, n) in shapes.items()}


def default_rank_multiple(device: torch.device | str) -> int:
    """8 for CUDA devices (fp16/bf16 tensor cores want K and N multiples of 8), 1 elsewhere."""
    return 8 if torch.device(device).type == "cuda" else 1
