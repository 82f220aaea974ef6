"""Rank planning: the density and rank of every targeted linear, decided before any block changes.

Uniform (every module at ``density``), attention split (``attn_density`` for attention, the MLP density
solved to keep the budget) or OWL (a density per block from its outlier share); ranks then follow from
the densities (``allocation.module_ranks``). The OWL scan runs the dense blocks on the calibration
inputs; everything else is arithmetic on shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from leanformers.pifa.allocation import module_ranks, outlier_ratio, owl_densities, solve_mlp_density
from leanformers.pifa.calibration import BlockCall, BlockLayout, input_of, linear_weight, run_block
from leanformers.pifa.config import MPIFAConfig

__all__ = ["RankPlan", "owl_block_densities", "plan_ranks"]


@dataclass
class RankPlan:
    """Per module key ``"{block}.{name}"``: target density and rank; per block: the OWL density."""

    densities: dict[str, float]
    ranks: dict[str, int]
    block_densities: dict[int, float] = field(default_factory=dict)


def _group_input_norm(block, group, states, calls, device) -> torch.Tensor:
    """||X_j|| over all calibration tokens for each input feature j of the group's first linear."""
    sq = None
    first = block.get_submodule(group[0])
    for s, c in zip(states, calls):
        x = input_of(block, first, s, c, device, torch.float32)
        x = x.reshape(-1, x.shape[-1]).float()
        part = (x * x).sum(0)
        sq = part if sq is None else sq + part
    return sq.sqrt()


def owl_block_densities(
    blocks: nn.ModuleList,
    layout: BlockLayout,
    hidden: list[torch.Tensor],
    calls: list[BlockCall],
    config: MPIFAConfig,
    device: torch.device,
) -> list[float]:
    """Per-block densities from the outlier share of each block (dense model, calibration inputs)."""
    ratios, sizes = [], []
    states = hidden
    for block in tqdm(blocks, desc="OWL outlier scan", leave=False):
        orig = next(block.parameters())
        block.to(device, torch.float32)
        outliers = total = 0
        for group in layout.groups:
            norm = _group_input_norm(block, group, states, calls, device)
            for name in group:
                o, t = outlier_ratio(
                    linear_weight(block.get_submodule(name)).detach(), norm, config.owl_threshold
                )
                outliers += o
                total += t
        ratios.append(outliers / total)
        sizes.append(total)
        states = [run_block(block, s, c, device, torch.float32) for s, c in zip(states, calls)]
        block.to(orig.device, orig.dtype)
    return owl_densities(ratios, sizes, config.density, config.owl_lambda)


def _split_densities(shapes: dict[str, tuple[int, int]], layout: BlockLayout, config: MPIFAConfig):
    """Attention modules at ``attn_density``, the others at the MLP density that keeps the budget."""
    attn = {k for k in shapes if k.split(".", 1)[1] in layout.attention}
    d_mlp = solve_mlp_density(
        [shapes[k] for k in attn],
        [shapes[k] for k in shapes if k not in attn],
        config.density,
        config.attn_density,
    )
    return {k: (config.attn_density if k in attn else d_mlp) for k in shapes}


def plan_ranks(
    blocks: nn.ModuleList,
    layout: BlockLayout,
    config: MPIFAConfig,
    device: torch.device,
    hidden: list[torch.Tensor],
    calls: list[BlockCall],
    scan_blocks=None,
) -> RankPlan:
    """Densities and ranks of every targeted module; ``hidden``/``calls`` (the first block's dense
    inputs) are only read by OWL. ``scan_blocks``: what the OWL scan iterates instead of ``blocks``
    (the streaming mode passes an iterator that loads each block's weights for the scan and frees them);
    the shapes are read from ``blocks``, which may be on the meta device."""
    shapes = {
        f"{i}.{name}": tuple(linear_weight(block.get_submodule(name)).shape)
        for i, block in enumerate(blocks)
        for name in layout.modules
    }
    densities = {k: config.density for k in shapes}
    block_densities: dict[int, float] = {}
    if config.attn_density is not None:
        densities = _split_densities(shapes, layout, config)
    if config.owl:
        per_block = owl_block_densities(
            blocks if scan_blocks is None else scan_blocks, layout, hidden, calls, config, device
        )
        densities = {k: per_block[int(k.split(".", 1)[0])] for k in shapes}
        block_densities = dict(enumerate(per_block))
    ranks = module_ranks(
        shapes, densities, kind=config.output, rank_multiple=config.rank_multiple, device=device
    )
    return RankPlan(densities, ranks, block_densities)
