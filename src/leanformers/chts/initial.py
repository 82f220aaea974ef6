"""The initial topology of a CHTss run: layer densities, initial masks, sparse weight init.

Registries (``CHTssConfig`` validates against their keys): :data:`LAYER_DENSITIES` (how a density
is spread over the matrices) and :data:`INIT_TOPOLOGIES` (how one matrix's first links are drawn).
A new initial topology is one function ``(layer, links, generator, correlation) -> (out, in) bool``
added to :data:`INIT_TOPOLOGIES`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from leanformers.chts.masks import SparseLayer, split_count
from leanformers.chts.sampling import select_mask
from leanformers.chts.topology import brf_mask, correlated_mask, erk_densities, link_count, sparse_init_
from leanformers.training.distributed import broadcast_, is_distributed, seeded_generator
from leanformers.training.fsdp import gather_full, local, write_full_

__all__ = ["INIT_TOPOLOGIES", "LAYER_DENSITIES", "draw_initial_masks", "sparse_init_layers", "target_counts"]

# (shapes, density) -> one density per matrix
LAYER_DENSITIES: dict[str, Callable[[list[tuple[int, int]], float], list[float]]] = {
    "uniform": lambda shapes, density: [density] * len(shapes),
    "erk": erk_densities,  # Erdos-Renyi-Kernel: density proportional to (out + in) / (out * in)
}


def target_counts(config: Any, layers: list[SparseLayer], density: float) -> list[int]:
    """Links per matrix at overall ``density`` (``config.layer_density``; ``init_topology="erk"`` implies ERK)."""
    kind = "erk" if config.init_topology == "erk" else config.layer_density
    densities = LAYER_DENSITIES[kind]([layer.shape for layer in layers], density)
    return [link_count(layer.shape, d) for layer, d in zip(layers, densities)]


def _er(layer: SparseLayer, k: int, gen: torch.Generator, correlation: torch.Tensor | None) -> torch.Tensor:
    """Uniformly random links, exactly ``k`` (split evenly over the head groups of a balanced layer)."""
    scores = torch.ones(layer.shape, device=local(layer.weight).device)
    chosen, _ = select_mask(layer.to_groups(scores), split_count(k, layer.groups), None, "soft", 1.0, gen)
    return layer.from_groups(chosen)


def _brf_of(randomness: float, degrees: str):
    def brf(
        layer: SparseLayer, k: int, gen: torch.Generator, correlation: torch.Tensor | None
    ) -> torch.Tensor:
        if layer.groups != 1:  # per-head balance: ER per head
            return _er(layer, k, gen, correlation)
        n_out, n_in = layer.shape
        return brf_mask(layer.shape, k / (n_out * n_in), randomness, gen, local(layer.weight).device, degrees)

    return brf


def _correlated(
    layer: SparseLayer, k: int, gen: torch.Generator, correlation: torch.Tensor | None
) -> torch.Tensor:
    if correlation is None:
        raise ValueError(
            "init_topology='correlated' needs the input correlation: pass input_correlation="
            "leanformers.chts.topology.input_correlation(x_train) to CHTssController (bench/mlp_mnist.py's "
            "train_mlp does)."
        )
    if layer.groups != 1:
        raise ValueError(
            f"init_topology='correlated' cannot balance heads ({layer.name}); set balance_heads=False."
        )
    n_out, n_in = layer.shape
    return correlated_mask(correlation.to(layer.weight.device), layer.shape, k / (n_out * n_in), gen)


# name -> factory(config) -> (layer, links, generator, input correlation) -> (out, in) bool mask
INIT_TOPOLOGIES: dict[str, Callable[[Any], Callable]] = {
    "er": lambda config: _er,
    "erk": lambda config: _er,  # ER per matrix with ERK layer densities (see target_counts)
    "brf": lambda config: _brf_of(config.brf_randomness, config.brf_degrees),
    "correlated": lambda config: _correlated,  # CSTI: top |input correlation| tiled over each matrix
}


@torch.no_grad()
def draw_initial_masks(
    config: Any, layers: list[SparseLayer], correlation: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """One (out, in) bool mask per layer at ``config.initial_density``, identical on every rank.

    Every draw comes from ``seeded_generator(seed, "init", layer index)``; rank 0's masks are broadcast
    as a guard.
    """
    draw = INIT_TOPOLOGIES[config.init_topology](config)
    masks = []
    for idx, (layer, k) in enumerate(zip(layers, target_counts(config, layers, config.initial_density))):
        gen = seeded_generator(config.seed, "init", idx, device=local(layer.weight).device)
        mask = draw(layer, k, gen, correlation)
        if is_distributed():
            broadcast_(mask)
        masks.append(mask)
    return masks


@torch.no_grad()
def sparse_init_layers(config: Any, layers: list[SparseLayer]) -> None:
    """Re-draw every layer's weight on its links (``topology.sparse_init_``), zero elsewhere.

    The whole matrix is drawn on every rank (same generator); under FSDP2 each rank keeps its shard.
    """
    for idx, layer in enumerate(layers):
        full = gather_full(layer.weight.data) if layer.sharded else layer.weight.data
        gen = seeded_generator(config.seed, "sparse_init", idx, device=local(layer.weight).device)
        sparse_init_(layer.logical(full), layer.mask, gen, config.sparse_init_fan)
        if layer.sharded:
            write_full_(layer.weight.data, full)
