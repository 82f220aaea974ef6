"""The low-rank family: what MPIFA, SVD-LLM, ASVD and plain SVD share.

Each linear W (m x n) of a group is replaced by factors U (m x r) V (r x n) at the rank the budget gives
it (``budget.plan_ranks``), stored as a ``LowRankLinear`` (U V) or a ``PIFALinear`` (the same matrix in
pivoting form, fewer numbers). A method only says how to get U and V: ``prepare_group`` turns the group's
statistics into what every linear of the group reuses (e.g. the whitening factor), ``factorize`` gives
U, V for one linear. The checkpoint carries a ``quantization_config`` with every module's spec, which the
registered ``mpifa`` quantizer reloads (the storage format is shared by all low-rank methods).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from leanformers._version import __version__
from leanformers.compression.compressor import Compressor
from leanformers.compression.config import CompressionConfig, check_fraction
from leanformers.compression.layout import BlockLayout, linear_weight
from leanformers.compression.precision import map_single_threaded, single_threaded_linalg
from leanformers.compression.report import CompressionReport, ModuleReport, module_path
from leanformers.compressors.allocation import default_rank_multiple
from leanformers.compressors.budget import BudgetOptions, RankPlan, plan_ranks
from leanformers.compressors.reconstruct import numerical_rank_factors
from leanformers.storage.factorize import FORMS, normalize_form
from leanformers.storage.layers import LowRankLinear, PIFALinear
from leanformers.storage.pifa_linear import auto_form, emit_in_order_
from leanformers.storage.quantization_config import MPIFAQuantizationConfig

__all__ = ["OUTPUTS", "LowRankCompressor", "LowRankConfig", "chain_consumer"]

OUTPUTS = ("pifa", "lowrank")


@dataclass
class LowRankConfig(CompressionConfig):
    """Settings of every low-rank compressor.

    Attributes:
        density: kept fraction of the parameters of the targeted linears, in (0, 1].
        output: "lowrank" (U V layers) or "pifa" (PIFA layers: the same matrices in fewer numbers, so a
            higher rank at the same density).
        form: PIFA layout ("auto", "row", "column"); see PIFALinear.
        scatter_free_mlp: with PIFA output and form "auto", store the MLP's second linear (down_proj,
            fc2, ...) in column form and let the first ones emit channels in its pivot-first order, so
            that it reads contiguous slices without any gather (function-preserving reordering).
        rank_multiple: round ranks DOWN to a multiple of this (kernel-friendly; never over budget).
            None: 8 when compressing on a GPU (tensor-core aligned operands), 1 on the CPU.
    """

    density: float = 0.5
    output: str = "lowrank"
    form: str = "auto"
    scatter_free_mlp: bool = True
    rank_multiple: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.density = check_fraction("density", self.density)
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be 'pifa' or 'lowrank', got {self.output!r}")
        if self.form not in ("auto", *FORMS, "col"):
            raise ValueError(f"form must be 'auto', 'row' or 'column', got {self.form!r}")
        self._check_int("rank_multiple", low=1, optional=True)

    def budget(self) -> BudgetOptions:
        """How the budget is spread (uniform by default; MPIFA adds its allocation options)."""
        return BudgetOptions(self.density, kind=self.output, rank_multiple=self.rank_multiple)


def chain_consumer(layout: BlockLayout, config: LowRankConfig) -> str | None:
    """The MLP's second linear when it should be stored in column form and read its input in the
    first linears' emitted order (scatter-free MLP), else None."""
    if (
        config.output == "pifa"
        and config.form == "auto"
        and config.scatter_free_mlp
        and layout.mlp_chain
        and all(p in layout.modules for p in layout.mlp_chain[0])
        and layout.mlp_chain[1] in layout.modules
    ):
        return layout.mlp_chain[1]
    return None


class LowRankCompressor(Compressor):
    """Replaces each targeted linear by factors at its planned rank. Subclasses implement ``factorize``
    (and ``stream_needs`` / ``group_statistics`` / ``prepare_group`` when they read activations)."""

    config_class = LowRankConfig
    config: LowRankConfig

    def plan(self, blocks, streams, scan, *, progress: bool = True) -> None:
        self.rank_plan: RankPlan = plan_ranks(
            blocks,
            self.layout,
            self.config.budget(),
            self.device,
            streams.dense,
            streams.calls,
            scan,
            progress=progress,
        )
        self.consumer = chain_consumer(self.layout, self.config)

    def prepare_group(self, stats: Any) -> Any:
        """What every linear of a group reuses, from the group's statistics (default: the statistics)."""
        return stats

    def factorize(self, W: torch.Tensor, rank: int, prepared: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """U (m, rank), V (rank, n) approximating W (m, n) (any float dtype; stored as float32)."""
        raise NotImplementedError

    def compress_group(
        self, block: nn.Module, index: int, group: list[str], stats: Any
    ) -> list[ModuleReport]:
        with single_threaded_linalg(self.device):
            prepared = self._linalg(index, group[0], self.prepare_group, stats)
        # The linears of a group are independent given its statistics: fitted side by side on the CPU.
        fits = map_single_threaded(
            lambda name: self._fit_linear(block, index, name, prepared), group, self.device
        )
        return [self._install(block, index, name, fit) for name, fit in zip(group, fits)]

    def _linalg(self, index: int, name: str, fn, *args):
        """``fn(*args)`` with its linear-algebra failures named: block, module and the setting to change."""
        try:
            return fn(*args)
        except (torch.linalg.LinAlgError, RuntimeError) as exc:
            raise ValueError(
                f"block {index} {name}: the {self.name} linear algebra failed ({exc}); the calibration "
                "statistics of this linear are degenerate: raise damping (--damping) or shrinkage "
                "(--shrinkage), or calibrate on more / other text"
            ) from exc

    def _layer(self, U, V, bias, kwargs: dict):
        """The stored layer of U V; a product below the rank of its factors (e.g. a zero weight) is stored
        at its numerical rank instead of failing the PIFA pivot solve. Returns (layer, whether it was)."""
        layer_cls = PIFALinear if self.config.output == "pifa" else LowRankLinear
        try:
            return layer_cls.from_factors(U.float(), V.float(), bias, dtype=torch.float32, **kwargs), False
        except ValueError as exc:
            if "rank deficient" not in str(exc):
                raise
        m, n = U.shape[0], V.shape[1]
        form = kwargs.get("form", "auto")
        form = auto_form(m, n) if form == "auto" else normalize_form(form)
        U, V, _ = numerical_rank_factors(U, V, keep="left" if form == "row" else "right")
        return layer_cls.from_factors(U.float(), V.float(), bias, dtype=torch.float32, **kwargs), True

    def _fit_linear(self, block: nn.Module, index: int, name: str, prepared: Any) -> tuple[nn.Module, float]:
        """The compressed layer of one linear and the seconds it took; reads ``block``, changes nothing
        (it may run beside the group's other linears, see ``map_single_threaded``)."""
        t0, key = time.perf_counter(), f"{index}.{name}"
        module = block.get_submodule(name)
        W = linear_weight(module).detach()
        bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
        kwargs = (
            {"form": "column" if name == self.consumer else self.config.form}
            if self.config.output == "pifa"
            else {}
        )
        U, V = self._linalg(index, name, self.factorize, W, self.rank_plan.ranks[key], prepared)
        new, _ = self._layer(U, V, bias, kwargs)
        if not all(torch.isfinite(p).all() for p in new.parameters()):
            raise FloatingPointError(f"block {index} {name}: non-finite factors after reconstruction")
        return new, time.perf_counter() - t0

    def _install(self, block: nn.Module, index: int, name: str, fit: tuple[nn.Module, float]) -> ModuleReport:
        """Put the fitted layer in place of the linear ``name`` of ``block``; its report."""
        (new, seconds), key = fit, f"{index}.{name}"
        m, n = linear_weight(block.get_submodule(name)).shape
        planned = self.rank_plan.ranks[key]
        note = None
        if new.rank < planned:
            note = f"stored at rank {new.rank} (planned {planned}): the fitted factors have no higher numerical rank (the weight or its calibration inputs span fewer directions)"
        block.set_submodule(name, new.to(self.device))
        return ModuleReport(
            module_path(self.prefix, index, name),
            m,
            n,
            new.rank,
            self.config.output,
            m * n,
            new.num_parameters,
            self.rank_plan.densities[key],
            seconds,
            note,
        )

    def finish_block(self, block: nn.Module, index: int) -> dict[str, dict]:
        """The scatter-free reorder, then full name -> spec of each compressed module."""
        layout = self.layout
        if self.consumer is not None:
            # Function-preserving channel reorder: gate/up emit in down's pivot-first order.
            emit_in_order_(
                [block.get_submodule(p) for p in layout.mlp_chain[0]], block.get_submodule(self.consumer)
            )
        return {
            module_path(self.prefix, index, name): block.get_submodule(name).spec() for name in layout.modules
        }

    def record(self) -> dict[str, Any]:
        """The method's settings stored in ``quantization_config.extra``."""
        return {"method": self.name, "output": self.config.output}

    def quantization_fields(self) -> dict[str, Any]:
        """Top-level ``quantization_config`` fields the method fills (MPIFA: alpha, steps)."""
        return {}

    def finalize(self, model: nn.Module, specs: dict[str, dict], report: CompressionReport) -> None:
        """The ``quantization_config`` the compressed model carries: every module's spec and how it was made."""
        extra = {
            **self.record(),
            "rank_multiple": self.config.rank_multiple or default_rank_multiple(self.device),
            "achieved_density": report.achieved_density,
            "calibration_sha256": report.calibration_sha256,
            "provenance": report.provenance,
        }
        model.config.quantization_config = MPIFAQuantizationConfig(
            modules=specs,
            density=self.config.density,
            calibration=report.calibration,
            leanformers_version=__version__,
            extra=extra,
            **self.quantization_fields(),
        )
