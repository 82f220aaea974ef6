"""ASVD (Yuan et al. 2023, "ASVD: Activation-aware Singular Value Decomposition for Compressing Large
Language Models"): scale the input channels of W by s_j = mean_t |x_tj|^a (a = ``scaling_exponent``,
0.5 in the paper) measured on the dense model, truncate the SVD of W diag(s) to the low-rank budget and
fold diag(s)^-1 back into V:

    W diag(s) ~= U_r Sigma_r V_r^T  ->  W ~= (U_r Sigma_r^1/2) (Sigma_r^1/2 V_r^T diag(s)^-1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from leanformers.compression.compressor import register_compressor
from leanformers.compression.config import check_finite
from leanformers.compression.streams import StreamNeeds
from leanformers.compressors.lowrank import LowRankCompressor, LowRankConfig

__all__ = ["ASVDCompressor", "ASVDConfig", "asvd_factors"]


def asvd_factors(
    W: torch.Tensor, mean_abs: torch.Tensor, rank: int, exponent: float = 0.5, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """ASVD factors of ``W`` (m, n) at ``rank`` from the mean |x| per input feature ``mean_abs`` (n,).

    Returns U (m, rank) and V (rank, n) in float64 with U V ~= W (exact when rank = min(m, n)).
    """
    if W.ndim != 2 or mean_abs.shape != (W.shape[1],):
        raise ValueError(
            f"expected W (m, n) and mean_abs (n,), got {tuple(W.shape)} and {tuple(mean_abs.shape)}"
        )
    if not 1 <= rank <= min(W.shape):
        raise ValueError(f"rank must lie in [1, {min(W.shape)}] for W {tuple(W.shape)}, got {rank}")
    # Dead input channels (mean |x| = 0) would make diag(s) singular: floor the scale.
    scale = mean_abs.double().to(W.device).clamp_min(eps).pow(exponent)
    U, S, Vh = torch.linalg.svd(W.double() * scale, full_matrices=False)
    root = S[:rank].sqrt()
    return U[:, :rank] * root, (root[:, None] * Vh[:rank]) / scale


@dataclass
class ASVDConfig(LowRankConfig):
    """ASVD at ``density``.

    Attributes:
        scaling_exponent: the exponent a of the channel scale mean |x|^a, > 0 (0.5 in the paper).
    """

    scaling_exponent: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        self.scaling_exponent = check_finite("scaling_exponent", self.scaling_exponent)
        if self.scaling_exponent <= 0:
            raise ValueError(f"scaling_exponent must be > 0, got {self.scaling_exponent}")


@register_compressor
class ASVDCompressor(LowRankCompressor):
    name = "asvd"
    config_class = ASVDConfig
    config: ASVDConfig

    def stream_needs(self) -> StreamNeeds:
        return StreamNeeds(dense=True)

    def group_statistics(self, group, inputs) -> torch.Tensor:
        """mean |x_j| over the calibration tokens of the dense model, (n,) float64."""
        total, tokens = None, 0
        for xd, _ in inputs:
            x = xd.to(self.device).reshape(-1, xd.shape[-1]).float()
            part = x.abs().sum(0).double()
            total = part if total is None else total + part
            tokens += x.shape[0]
        if not torch.isfinite(total).all():
            raise FloatingPointError(f"non-finite activations at the input of {group[0]}")
        return total / max(1, tokens)

    def factorize(self, W, rank, prepared) -> tuple[torch.Tensor, torch.Tensor]:
        return asvd_factors(W, prepared, rank, self.config.scaling_exponent)

    def record(self) -> dict:
        return {**super().record(), "scaling_exponent": self.config.scaling_exponent}
