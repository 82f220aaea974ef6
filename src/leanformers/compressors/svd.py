"""Plain truncated SVD (``svd``) and SVD-LLM's truncation-aware whitening (``svd-llm``): the low-rank
baselines of MPIFA, stored as U V layers by default (``output="pifa"`` stores the same factors as PIFA).

- svd: W ~ U_r Sigma_r V_r^T, singular values split evenly between the factors; reads no data.
- svd-llm (Wang et al. 2024, "SVD-LLM: Truncation-aware Singular Value Decomposition for Large Language
  Model Compression"): with S = X X^T = L L^T the Gram of the linear's inputs in the dense model, truncate
  the SVD of W L (optimal for ||W X - U V X||_F) and fold L^-1 into V. ``u_update=True`` then refits U
  in closed form for that V on the same inputs, U = W S V^T (V S V^T)^-1 (our documented option; the
  paper's own parameter update is a LoRA-style fine-tuning, which is not done here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from leanformers.compression.compressor import register_compressor
from leanformers.compression.streams import StreamNeeds
from leanformers.compressors.lowrank import LowRankCompressor, LowRankConfig
from leanformers.compressors.reconstruct import (
    GramStats,
    accumulate_grams,
    alternating_steps,
    cholesky_with_damping,
    drop_null_directions,
    svd_init,
    whitened_svd_init,
)

__all__ = ["SVDCompressor", "SVDConfig", "SVDLLMCompressor", "SVDLLMConfig"]


@dataclass
class SVDConfig(LowRankConfig):
    """Plain truncated SVD of every targeted linear at ``density`` (no calibration data)."""


@register_compressor
class SVDCompressor(LowRankCompressor):
    name = "svd"
    config_class = SVDConfig

    def factorize(self, W, rank, prepared) -> tuple[torch.Tensor, torch.Tensor]:
        return svd_init(W, rank)


@dataclass
class SVDLLMConfig(LowRankConfig):
    """SVD-LLM: truncation-aware whitening on the dense model's inputs.

    Attributes:
        u_update: after the whitened truncation, refit U in closed form on the same inputs.
    """

    u_update: bool = False


@register_compressor
class SVDLLMCompressor(LowRankCompressor):
    name = "svd-llm"
    config_class = SVDLLMConfig
    config: SVDLLMConfig

    def stream_needs(self) -> StreamNeeds:
        return StreamNeeds(dense=True)

    def group_statistics(self, group, inputs) -> GramStats:
        stats = accumulate_grams(
            inputs, self.device, need_gram=False, need_cross=False, need_dense=True, name=group[0]
        )
        return GramStats(stats.S, None, stats.S, stats.tokens)  # X_c = X_d: the dense model's inputs

    def prepare_group(self, stats: GramStats) -> tuple[GramStats, torch.Tensor]:
        return stats, cholesky_with_damping(stats.S)

    def factorize(self, W, rank, prepared) -> tuple[torch.Tensor, torch.Tensor]:
        stats, L = prepared
        U, V = whitened_svd_init(W, L, rank)
        if self.config.u_update:
            U, V = drop_null_directions(U, V)  # the refit solves an r x r system: no zero directions
            U, V = alternating_steps(W, U, V, stats, alpha=0.0, steps=1)
        return U, V

    def record(self) -> dict:
        return {**super().record(), "u_update": self.config.u_update}
