"""2:4 Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models"):
score |W_ij| * ||X_j||_2 and keep the N best of every M consecutive inputs of each output row."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from leanformers.compression.compressor import register_compressor
from leanformers.compressors.semistructured import (
    SemiStructuredCompressor,
    SemiStructuredConfig,
    semi_structured_mask,
)

__all__ = ["WandaCompressor", "WandaConfig", "wanda_prune_weight"]


def wanda_prune_weight(W: torch.Tensor, G: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """W (out, in) with all but the n best of every m inputs zeroed, by |W_ij| ||X_j|| where
    ||X_j||^2 = G_jj (G: (in, in) input Gram)."""
    norms = torch.diag(G).to(W.dtype).clamp_min(0).sqrt()
    return W * semi_structured_mask(W.abs() * norms[None, :], n, m)


@dataclass
class WandaConfig(SemiStructuredConfig):
    """2:4 Wanda (``pattern`` N:M)."""


@register_compressor
class WandaCompressor(SemiStructuredCompressor):
    name = "wanda-2:4"
    config_class = WandaConfig

    def prune(self, W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        return wanda_prune_weight(W, G, self.n, self.m)
