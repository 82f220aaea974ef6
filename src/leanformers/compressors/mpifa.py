"""MPIFA: the M reconstruction (error-accumulation-minimising low-rank factors, reconstruct.py) stored
as Pivoting Factorization layers (storage/pifa_linear.py).

``MPIFAConfig`` selects it; ``mpifa_compress`` / ``mpifa_compress_pretrained`` (below) are its entries. Per group of
linears it reads the Grams of the group's input in the dense model (S = X_d X_d^T, for the whitening
init) and in the model compressed so far (G = X_c X_c^T, K = X_d X_c^T, for the alternating steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from leanformers.compression.compressor import register_compressor
from leanformers.compression.config import check_finite, check_fraction
from leanformers.compression.pipeline import compress
from leanformers.compression.pretrained import compress_pretrained
from leanformers.compression.streams import StreamNeeds
from leanformers.compressors.budget import ALLOCATIONS, BudgetOptions
from leanformers.compressors.lowrank import LowRankCompressor, LowRankConfig
from leanformers.compressors.reconstruct import (
    GramStats,
    accumulate_grams,
    cholesky_with_damping,
    reconstruct,
    shrink_stats,
)

__all__ = ["INITS", "MPIFACompressor", "MPIFAConfig", "mpifa_compress", "mpifa_compress_pretrained"]

INITS = ("whiten", "svd")
# Default owl_lambda as a share of the room a block has below 0 and above 1: validation at density 0.5 fell
# from lambda 0.25 (a share of 0.5) to 0.40 (0.8) on every seed and levelled off beyond (docs/benchmarks.md §20).
OWL_SPREAD = 0.8


@dataclass
class MPIFAConfig(LowRankConfig):
    """How MPIFA compresses. Defaults follow the paper (M with alpha 0.25 and 2 steps, PIFA output,
    128 x 2048 calibration tokens) except ``shrinkage`` 0.1 (docs/benchmarks.md §14) and OWL block
    densities (``owl``, §20).

    Fields of ``LowRankConfig`` and ``CompressionConfig`` are documented there.

    Attributes:
        output: "pifa" (PIFA layers, the default) or "lowrank" (U V layers; the low-rank ablation).
        attn_density: density of the attention linears; the MLP density is solved to keep the budget.
        allocation: how the parameter budget is spread over the targeted linears: "uniform" (every
            linear at ``density``) or "spectrum" (data-driven: a dense pass measures each linear's
            whitened singular values, then ranks go greedily where they remove the largest share of
            that linear's output energy per stored parameter, under the global budget; each linear's
            density stays within [density / 2, min(1, 1.5 density)]).
        owl: block densities follow the OWL outlier share (computed on the calibration data). None
            (default) turns it on wherever it applies: uniform allocation, no ``attn_density``,
            ``owl_lambda`` < ``density``, and a run that reads calibration data anyway (whitening init or
            M steps); chosen on the validation texts (docs/benchmarks.md §20). True with ``attn_density``
            or spectrum allocation is an error.
        owl_lambda: largest deviation of a block's density from ``density`` under OWL, in [0, density).
            None (default): ``OWL_SPREAD`` (0.8) of the distance from ``density`` to the nearer of 0 and
            1, so every block stays within [0.2 density, 0.8 + 0.2 density] (0.4 at density 0.5, 0.16 at
            0.8; chosen on the validation texts, docs/benchmarks.md §20).
        owl_threshold: OWL outlier threshold M (|W_ij| ||X_j|| > M x mean), > 0.
        alpha: weight of the dense-model target in Y = (1 - alpha) W X_c + alpha W X_d, in [0, 1].
        steps: closed-form alternating steps after the init (0: init only, 1: U-step, 2: U then V).
        init: "whiten" (SVD-LLM truncation-aware whitening) or "svd" (plain truncated SVD).
        damping: relative damping of the V-step normal equations, >= 0.
        shrinkage: shrink the calibration second moments (G, K, S) toward their diagonals by this
            share, in [0, 1]: a prior against correlations that only the calibration text has. 0.1 was
            chosen among 0, 0.1 and 0.3 on validation texts (docs/benchmarks.md §14); 0 is the paper.
    """

    output: str = "pifa"
    attn_density: float | None = None
    allocation: str = "uniform"
    owl: bool | None = None
    owl_lambda: float | None = None
    owl_threshold: float = 5.0
    alpha: float = 0.25
    steps: int = 2
    init: str = "whiten"
    damping: float = 1e-2
    shrinkage: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.attn_density is not None:
            self.attn_density = check_fraction("attn_density", self.attn_density)
            if self.owl:
                raise ValueError("choose either owl or attn_density, not both")
        self.alpha = check_fraction("alpha", self.alpha, open_low=False)
        self.shrinkage = check_fraction("shrinkage", self.shrinkage, open_low=False)
        self.damping = check_finite("damping", self.damping)
        if self.damping < 0:
            raise ValueError(f"damping must be >= 0 (a relative ridge, e.g. 1e-2), got {self.damping}")
        if self.owl_lambda is None:
            # rounded so that reports and quantization_config read 0.16, not 0.15999999999999998
            self.owl_lambda = round(OWL_SPREAD * min(self.density, 1.0 - self.density), 12)
        self.owl_lambda = check_finite("owl_lambda", self.owl_lambda)
        if not 0.0 <= self.owl_lambda < 1.0:
            raise ValueError(f"owl_lambda must lie in [0, 1), got {self.owl_lambda}")
        self.owl_threshold = check_finite("owl_threshold", self.owl_threshold)
        if self.owl_threshold <= 0:
            raise ValueError(f"owl_threshold must be > 0, got {self.owl_threshold}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {sorted(ALLOCATIONS)}, got {self.allocation!r}")
        if self.allocation == "spectrum" and (self.owl or self.attn_density is not None):
            raise ValueError(
                "allocation='spectrum' sets every linear's density itself; drop owl / attn_density, or use "
                "allocation='uniform' with them"
            )
        self._check_int("steps", low=0)
        if self.init not in INITS:
            raise ValueError(f"init must be 'whiten' or 'svd', got {self.init!r}")
        if self.owl is None:  # auto: on wherever it applies (see the docstring)
            self.owl = (
                self.attn_density is None
                and self.allocation == "uniform"
                and (self.init == "whiten" or self.steps > 0)
                and self.owl_lambda < self.density < 1.0
            )
        if self.owl and not self.owl_lambda < self.density:
            raise ValueError(
                f"owl_lambda must lie in [0, density={self.density}) with owl, got {self.owl_lambda}; lower "
                "owl_lambda or turn owl off"
            )

    @property
    def needs_statistics(self) -> bool:
        """Whether compression reads calibration data (all but plain SVD with uniform ranks and no M)."""
        return self.init == "whiten" or self.steps > 0 or self.owl or self.allocation == "spectrum"

    def budget(self) -> BudgetOptions:
        return BudgetOptions(
            self.density,
            kind=self.output,
            rank_multiple=self.rank_multiple,
            allocation=self.allocation,
            attn_density=self.attn_density,
            owl=self.owl,
            owl_lambda=self.owl_lambda,
            owl_threshold=self.owl_threshold,
            shrinkage=self.shrinkage,
        )


@register_compressor
class MPIFACompressor(LowRankCompressor):
    """M (whitening init + closed-form alternating steps on the dense and compressed streams) + PIFA."""

    name = "mpifa"
    config_class = MPIFAConfig
    config: MPIFAConfig

    def stream_needs(self) -> StreamNeeds:
        c = self.config
        if not c.needs_statistics:
            return StreamNeeds()
        # S = X_d X_d^T feeds the whitening init and K = X_d X_c^T the U/V steps; G = X_c X_c^T only the
        # steps. A run that reads data only for its OWL / spectrum scan (which see the first block's
        # inputs) keeps the cheaper dense stream.
        dense = c.init == "whiten" or (c.alpha > 0 and c.steps > 0)
        compressed = c.steps > 0
        return StreamNeeds(dense=dense or not compressed, compressed=compressed, sequential=True)

    def group_statistics(self, group, inputs) -> GramStats:
        c = self.config
        return accumulate_grams(
            inputs,
            self.device,
            need_gram=c.steps > 0,
            need_cross=c.alpha > 0 and c.steps > 0,
            need_dense=c.init == "whiten",
            name=group[0],
        )

    def prepare_group(self, stats: GramStats | None) -> tuple[GramStats | None, torch.Tensor | None]:
        if stats is not None:
            stats = shrink_stats(stats, self.config.shrinkage)
        L = cholesky_with_damping(stats.S) if self.config.init == "whiten" else None
        return stats, L

    def factorize(self, W, rank, prepared) -> tuple[torch.Tensor, torch.Tensor]:
        stats, L = prepared
        c = self.config
        return reconstruct(W, rank, stats, init=c.init, alpha=c.alpha, steps=c.steps, damping=c.damping, L=L)

    def record(self) -> dict[str, Any]:
        c = self.config
        return {
            "method": self.name,
            "init": c.init,
            "output": c.output,
            "attn_density": c.attn_density,
            "owl": c.owl,
            "allocation": c.allocation,
            "shrinkage": c.shrinkage,
            "block_densities": self.rank_plan.block_densities or None,
        }

    def quantization_fields(self) -> dict[str, Any]:
        return {"alpha": self.config.alpha, "steps": self.config.steps}


def mpifa_compress(
    model, tokenizer=None, config: MPIFAConfig | None = None, calibration=None, *, progress: bool = True
):
    """Compress every targeted linear of ``model`` in place with M + PIFA (or an ablation of it): the
    ``compress`` of ``config`` (default ``MPIFAConfig()``, density 0.5). Returns a CompressionReport."""
    return compress(model, tokenizer, config or MPIFAConfig(), calibration, progress=progress)


def mpifa_compress_pretrained(
    source, output_dir, config: MPIFAConfig | None = None, calibration=None, tokenizer=None, **kwargs
):
    """Streaming MPIFA of a local checkpoint folder: ``compress_pretrained`` with ``config`` (default
    ``MPIFAConfig()``); keywords as there (dtype, overwrite, max_shard_size, model_card, progress)."""
    return compress_pretrained(source, output_dir, config or MPIFAConfig(), calibration, tokenizer, **kwargs)
