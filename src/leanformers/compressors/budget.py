"""Rank planning: the density and rank of every targeted linear, decided before any block changes.

Uniform (every module at ``density``), attention split (``attn_density`` for attention, the MLP density
solved to keep the budget) or OWL (a density per block from its outlier share); ranks then follow from
the densities (``allocation.module_ranks``). ``allocation="spectrum"`` instead places the ranks
directly from each linear's whitened spectrum (``allocation.spectrum_ranks``). The OWL and spectrum
scans run the dense blocks on the calibration inputs; everything else is arithmetic on shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from leanformers.compression.layout import BlockLayout, linear_weight
from leanformers.compression.pipeline import check_weights_finite
from leanformers.compression.precision import single_threaded_linalg
from leanformers.compression.replay import BlockCall, run_block_capturing
from leanformers.compression.streams import DENSE_ERROR, block_errors
from leanformers.compressors.allocation import (
    default_rank_multiple,
    module_ranks,
    outlier_ratio,
    owl_densities,
    solve_mlp_density,
    spectrum_ranks,
    whitened_spectrum,
)
from leanformers.compressors.reconstruct import GramStats, shrink_stats
from leanformers.storage.rank import lowrank_num_params, pifa_num_params

__all__ = ["ALLOCATIONS", "BudgetOptions", "RankPlan", "owl_block_densities", "plan_ranks", "spectrum_scan"]


@dataclass(frozen=True)
class BudgetOptions:
    """How the parameter budget of the targeted linears is spread.

    density: kept fraction of their parameters; kind: what the layers store ("pifa": r(m+n) - r^2,
    "lowrank": r(m+n)); rank_multiple: round ranks down to a multiple (None: 8 on a GPU, 1 on the CPU);
    allocation: a key of ``ALLOCATIONS``; attn_density: density of the attention linears (the MLP density
    is solved to keep the budget); owl, owl_lambda, owl_threshold: OWL layer-wise densities; shrinkage:
    of the Gram of the spectrum scan (as the compression will use it).
    """

    density: float
    kind: str = "pifa"
    rank_multiple: int | None = None
    allocation: str = "uniform"
    attn_density: float | None = None
    owl: bool = False
    owl_lambda: float = 0.08
    owl_threshold: float = 5.0
    shrinkage: float = 0.0


@dataclass
class RankPlan:
    """Per module key ``"{block}.{name}"``: target density and rank; per block: the OWL density."""

    densities: dict[str, float]
    ranks: dict[str, int]
    block_densities: dict[int, float] = field(default_factory=dict)


def _dense_input_norms(block, first_modules, states, calls, device):
    """One dense pass of ``block`` per batch: its outputs, and ||X_j|| over all calibration tokens of each
    input feature j of every module in ``first_modules`` (a group's first linear; its first call)."""
    sq: dict[str, torch.Tensor] = {}
    outputs = []
    for s, c in zip(states, calls):  # per batch: only one batch's inputs are held at a time
        out, captured = run_block_capturing(block, [s], [c], first_modules, device, torch.float32)
        outputs.extend(out)
        for name in first_modules:
            if not captured[name]:
                raise RuntimeError(f"{name} was not called by its block")
            x = captured[name][0]
            x = x.reshape(-1, x.shape[-1]).float()
            part = (x * x).sum(0)
            sq[name] = part if name not in sq else sq[name] + part
    return outputs, {name: v.sqrt() for name, v in sq.items()}


def owl_block_densities(
    blocks: nn.ModuleList,
    layout: BlockLayout,
    hidden: list[torch.Tensor],
    calls: list[BlockCall],
    config: BudgetOptions,
    device: torch.device,
    *,
    progress: bool = True,
) -> list[float]:
    """Per-block densities from the outlier share of each block (dense model, calibration inputs): one
    dense pass per block (a progress bar unless ``progress`` is False)."""
    ratios, sizes = [], []
    states = hidden
    for i, block in enumerate(tqdm(blocks, desc="OWL outlier scan", leave=False, disable=not progress)):
        check_weights_finite(block, i, layout.modules)  # the same errors as the compression's own pass
        orig = next(block.parameters())
        block.to(device, torch.float32)
        with block_errors(i, DENSE_ERROR):
            states, norms = _dense_input_norms(block, [g[0] for g in layout.groups], states, calls, device)
        outliers = total = 0
        for group in layout.groups:
            for name in group:
                o, t = outlier_ratio(
                    linear_weight(block.get_submodule(name)).detach(), norms[group[0]], config.owl_threshold
                )
                outliers += o
                total += t
        ratios.append(outliers / total)
        sizes.append(total)
        block.to(orig.device, orig.dtype)
    return owl_densities(ratios, sizes, config.density, config.owl_lambda)


@torch.no_grad()
def spectrum_scan(
    blocks,
    layout: BlockLayout,
    hidden: list[torch.Tensor],
    calls: list[BlockCall],
    config: BudgetOptions,
    device: torch.device,
    *,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Whitened spectrum of every targeted linear of the DENSE model, key ``"{block}.{name}"``.

    One dense pass per block over the calibration inputs (a progress bar unless ``progress`` is False);
    S = X X^T of each group's input (shrunk by ``config.shrinkage`` like the statistics the compression
    will use), then ``whitened_spectrum``.
    """
    spectra: dict[str, torch.Tensor] = {}
    states = hidden
    for i, block in enumerate(tqdm(blocks, desc="rank allocation scan", leave=False, disable=not progress)):
        check_weights_finite(block, i, layout.modules)
        orig = next(block.parameters())
        block.to(device, torch.float32)
        with block_errors(i, DENSE_ERROR):
            states, inputs = run_block_capturing(
                block, states, calls, [g[0] for g in layout.groups], device, torch.float32
            )
        for group in layout.groups:
            S = None
            for x in inputs.pop(group[0]):
                x = x.reshape(-1, x.shape[-1]).float()
                s = (x.T @ x).double()
                S = s if S is None else S.add_(s)
            S = shrink_stats(GramStats(S, None, S, 0), config.shrinkage).S
            with single_threaded_linalg(device):
                for name in group:
                    W = linear_weight(block.get_submodule(name)).detach()
                    spectra[f"{i}.{name}"] = whitened_spectrum(W, S).cpu()
        block.to(orig.device, orig.dtype)
    return spectra


def _split_densities(shapes: dict[str, tuple[int, int]], layout: BlockLayout, config: BudgetOptions):
    """Attention modules at ``attn_density``, the others at the MLP density that keeps the budget."""
    attn = {k for k in shapes if k.split(".", 1)[1] in layout.attention}
    d_mlp = solve_mlp_density(
        [shapes[k] for k in attn],
        [shapes[k] for k in shapes if k not in attn],
        config.density,
        config.attn_density,
    )
    return {k: (config.attn_density if k in attn else d_mlp) for k in shapes}


def _uniform(
    shapes, blocks, layout, config: BudgetOptions, device, hidden, calls, scan, progress
) -> RankPlan:
    """Every module at ``density``, or the attention split, or OWL per-block densities; ranks from them."""
    densities = {k: config.density for k in shapes}
    block_densities: dict[int, float] = {}
    if config.attn_density is not None:
        densities = _split_densities(shapes, layout, config)
    if config.owl:
        per_block = owl_block_densities(scan, layout, hidden, calls, config, device, progress=progress)
        densities = {k: per_block[int(k.split(".", 1)[0])] for k in shapes}
        block_densities = dict(enumerate(per_block))
    ranks = module_ranks(
        shapes, densities, kind=config.kind, rank_multiple=config.rank_multiple, device=device
    )
    return RankPlan(densities, ranks, block_densities)


def _spectrum(
    shapes, blocks, layout, config: BudgetOptions, device, hidden, calls, scan, progress
) -> RankPlan:
    """Ranks placed greedily from each linear's whitened spectrum (one dense scan)."""
    spectra = spectrum_scan(scan, layout, hidden, calls, config, device, progress=progress)
    multiple = config.rank_multiple or default_rank_multiple(device)
    ranks = spectrum_ranks(spectra, shapes, config.density, kind=config.kind, rank_multiple=multiple)
    params = pifa_num_params if config.kind == "pifa" else lowrank_num_params
    densities = {k: params(*shapes[k], r) / (shapes[k][0] * shapes[k][1]) for k, r in ranks.items()}
    return RankPlan(densities, ranks, {})


# allocation name -> planner(shapes, blocks, layout, options, device, hidden, calls, scan) -> RankPlan
ALLOCATIONS = {"uniform": _uniform, "spectrum": _spectrum}


def plan_ranks(
    blocks: nn.ModuleList,
    layout: BlockLayout,
    config: BudgetOptions,
    device: torch.device,
    hidden: list[torch.Tensor],
    calls: list[BlockCall],
    scan_blocks=None,
    *,
    progress: bool = True,
) -> RankPlan:
    """Densities and ranks of every targeted module, by ``config.allocation`` (a key of ``ALLOCATIONS``).
    ``hidden``/``calls`` (the first block's dense inputs) are only read by the OWL and spectrum scans.
    ``scan_blocks``: what those scans iterate instead of ``blocks`` (the streaming mode passes an iterator
    that loads each block's weights for the scan and frees them); the shapes are read from ``blocks``,
    which may be on the meta device. ``progress``: the scans' progress bars."""
    if config.allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {sorted(ALLOCATIONS)}, got {config.allocation!r}")
    if config.owl and config.attn_density is not None:
        raise ValueError("choose either owl or attn_density, not both")
    shapes = {
        f"{i}.{name}": tuple(linear_weight(block.get_submodule(name)).shape)
        for i, block in enumerate(blocks)
        for name in layout.modules
    }
    scan = blocks if scan_blocks is None else scan_blocks
    return ALLOCATIONS[config.allocation](
        shapes, blocks, layout, config, device, hidden, calls, scan, progress
    )
