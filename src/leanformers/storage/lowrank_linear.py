"""``LowRankLinear``: y = (x V^T) U^T + b, the plain low-rank layer (the baseline PIFA is compared with)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leanformers.storage.base import CompressedLinear
from leanformers.storage.rank import lowrank_num_params

__all__ = ["LowRankLinear"]


class LowRankLinear(CompressedLinear):
    """y = (x V^T) U^T + b: ``weight_in`` = V (rank, in), ``weight`` = U (out, rank), ``bias`` (out,).

    The low-rank baseline of PIFA (same surface). U is named ``weight`` for the same load guard as
    PIFALinear: its shape differs from the dense (out, in) unless rank == in_features.
    """

    def _create_factors(self, kw: dict) -> None:
        self.weight_in = nn.Parameter(torch.empty(self._rank, self.in_features, **kw))
        self.weight = nn.Parameter(torch.empty(self.out_features, self._rank, **kw))

    def reset_parameters(self) -> None:
        self._uniform_init_(self.weight_in, self.weight)

    @classmethod
    def _from_uv(cls, U, V, bias, *, form: str, dtype) -> LowRankLinear:
        """``form`` is accepted and ignored (one layout)."""
        if U.ndim != 2 or V.ndim != 2 or U.shape[1] != V.shape[0]:
            raise ValueError(
                f"expected U (m, r) and V (r, n) with the same r, got U {tuple(U.shape)} and V {tuple(V.shape)}"
            )
        dtype = dtype or U.dtype
        layer = cls(V.shape[1], U.shape[0], U.shape[1], bias=bias is not None, dtype=dtype, device=U.device)
        with torch.no_grad():
            layer.weight.copy_(U)
            layer.weight_in.copy_(V)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    kind = "lowrank"

    @property
    def form(self) -> str:
        return "lowrank"

    @property
    def num_parameters(self) -> int:
        """Stored weight count r (m + n) (bias not counted)."""
        return lowrank_num_params(self.out_features, self.in_features, self._rank)

    def dense_weight(self) -> torch.Tensor:
        acc = torch.promote_types(self.weight.dtype, torch.float32)
        return (self.weight.detach().to(acc) @ self.weight_in.detach().to(acc)).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.weight_in), self.weight, self.bias)
