"""Group compression: replace one group of linears of a block (q/k/v, o, gate/up or down), fitted on
the group's shared input statistics, by PIFA or low-rank layers; then finish the block (channel
reorder of the scatter-free MLP, specs for the quantization config)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from torch import nn

from leanformers.pifa.calibration import BlockLayout, linear_weight
from leanformers.pifa.config import MPIFAConfig
from leanformers.pifa.layer import LowRankLinear, PIFALinear, emit_in_order_
from leanformers.pifa.plan import RankPlan
from leanformers.pifa.reconstruct import GramStats, cholesky_with_damping, reconstruct, shrink_stats
from leanformers.pifa.report import ModuleReport, module_path

__all__ = ["GroupCompressor", "chain_consumer", "check_weights_finite", "single_threaded_linalg"]


@contextlib.contextmanager
def single_threaded_linalg(device: torch.device):
    """Run the per-module CPU linear algebra (SVD, QR, solves of at most a few thousand rows) on one
    thread: it gains little from threads and collapses under OpenMP oversubscription (a 1536 x 576
    float64 SVD measured 0.14 s on 1 thread vs 9.5 s on 2 threads on a loaded 2-core machine)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def chain_consumer(layout: BlockLayout, config: MPIFAConfig) -> str | None:
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


def check_weights_finite(block: nn.Module, index: int, names: list[str]) -> None:
    for name in names:
        if not torch.isfinite(linear_weight(block.get_submodule(name))).all():
            raise FloatingPointError(
                f"block {index}: {name} has a non-finite weight; the checkpoint is corrupt"
            )


@dataclass
class GroupCompressor:
    """Compresses groups of linears in place with the settings of ``config`` and the ranks of ``plan``.

    prefix: path of the blocks inside the model (for report names); consumer: see ``chain_consumer``.
    """

    config: MPIFAConfig
    plan: RankPlan
    device: torch.device
    prefix: str
    consumer: str | None

    def __call__(
        self, block: nn.Module, index: int, group: list[str], stats: GramStats | None
    ) -> list[ModuleReport]:
        """Replace every linear of ``group`` in ``block`` (block number ``index``); one report each."""
        if stats is not None:
            stats = shrink_stats(stats, self.config.shrinkage)
        with single_threaded_linalg(self.device):
            L = cholesky_with_damping(stats.S) if self.config.init == "whiten" else None
        return [self._compress_linear(block, index, name, stats, L) for name in group]

    def _compress_linear(self, block, index, name, stats, L) -> ModuleReport:
        config, t0, key = self.config, time.perf_counter(), f"{index}.{name}"
        module = block.get_submodule(name)
        W = linear_weight(module).detach()
        bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
        layer_cls = PIFALinear if config.output == "pifa" else LowRankLinear
        kwargs = (
            {"form": "column" if name == self.consumer else config.form} if config.output == "pifa" else {}
        )
        with single_threaded_linalg(self.device):
            U, V = reconstruct(
                W,
                self.plan.ranks[key],
                stats,
                init=config.init,
                alpha=config.alpha,
                steps=config.steps,
                damping=config.damping,
                L=L,
            )
            new = layer_cls.from_factors(U.float(), V.float(), bias, dtype=torch.float32, **kwargs)
        if not all(torch.isfinite(p).all() for p in new.parameters()):
            raise FloatingPointError(f"block {index} {name}: non-finite factors after reconstruction")
        block.set_submodule(name, new.to(self.device))
        m, n = W.shape
        return ModuleReport(
            module_path(self.prefix, index, name),
            m,
            n,
            new.rank,
            config.output,
            m * n,
            new.num_parameters,
            self.plan.densities[key],
            time.perf_counter() - t0,
        )

    def finish_block(self, block: nn.Module, index: int, layout: BlockLayout) -> dict[str, dict]:
        """After every group of ``block``: the scatter-free reorder, then full name -> spec of each
        compressed module."""
        if self.consumer is not None:
            # Function-preserving channel reorder: gate/up emit in down's pivot-first order.
            emit_in_order_(
                [block.get_submodule(p) for p in layout.mlp_chain[0]], block.get_submodule(self.consumer)
            )
        return {
            module_path(self.prefix, index, name): block.get_submodule(name).spec() for name in layout.modules
        }
