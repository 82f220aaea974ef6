"""2:4 Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models"):
score |W_ij| * ||X_j||_2 and keep the N best of every M consecutive inputs of each output row."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from leanformers.compression.compressor import register_compressor
from leanformers.compressors.reconstruct import accumulate_square_norms
from leanformers.compressors.semistructured import (
    SemiStructuredCompressor,
    SemiStructuredConfig,
    semi_structured_mask,
)

__all__ = ["WandaCompressor", "WandaConfig", "wanda_prune_by_norms", "wanda_prune_weight"]


def wanda_prune_by_norms(W: torch.Tensor, square_norms: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """W (out, in) with all but the n best of every m inputs zeroed, by |W_ij| ||X_j||, where
    ``square_norms`` (in,) holds ||X_j||^2 = sum_t x_tj^2."""
    if square_norms.shape != (W.shape[1],):
        raise ValueError(
            f"square_norms must be ({W.shape[1]},) for a weight of shape {tuple(W.shape)}, got "
            f"{tuple(square_norms.shape)} (a full Gram goes to wanda_prune_weight)"
        )
    norms = square_norms.to(W.dtype).clamp_min(0).sqrt()
    return W * semi_structured_mask(W.abs() * norms[None, :], n, m)


def wanda_prune_weight(W: torch.Tensor, G: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """``wanda_prune_by_norms`` with ||X_j||^2 = G_jj read from the input Gram G (in, in)."""
    return wanda_prune_by_norms(W, torch.diag(G), n, m)


@dataclass
class WandaConfig(SemiStructuredConfig):
    """2:4 Wanda (``pattern`` N:M)."""


@register_compressor
class WandaCompressor(SemiStructuredCompressor):
    name = "wanda-2:4"
    config_class = WandaConfig

    def group_statistics(self, group, inputs) -> torch.Tensor:
        """||X_j||^2 (n,) float64 of the group's input: the Gram's diagonal, at O(n) per token."""
        return accumulate_square_norms(inputs, self.device, name=group[0])

    def prune(self, W: torch.Tensor, square_norms: torch.Tensor) -> torch.Tensor:
        return wanda_prune_by_norms(W, square_norms, self.n, self.m)
