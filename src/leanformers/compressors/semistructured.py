"""The N:M semi-structured family (2:4 Wanda, 2:4 SparseGPT): weights pruned in place, at most N
non-zeros in every M consecutive inputs of each output row.

As in the Wanda and SparseGPT code, blocks are pruned one after another: the inputs of block i come
from the already pruned blocks 0..i-1; every linear of a block gets its input statistics from one pass
of the (not yet pruned) block on those inputs (``StreamNeeds(compressed=True, sequential=False)``), then
the block is pruned and replayed to feed block i + 1. A method only says how to prune one weight given
its input statistics (``prune``; the Gram by default, only its diagonal for Wanda). The weights stay
dense tensors with exact zeros, so the checkpoint reloads without leanformers; ``config.sparsity``
records the pattern (storage/sparsity.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from leanformers.compression.compressor import Compressor
from leanformers.compression.config import CompressionConfig
from leanformers.compression.layout import linear_weight
from leanformers.compression.precision import single_threaded_linalg
from leanformers.compression.report import CompressionReport, ModuleReport, module_path
from leanformers.compression.streams import StreamNeeds
from leanformers.compressors.reconstruct import accumulate_grams
from leanformers.storage.sparsity import SPARSITY_KEY, parse_pattern, sparsity_record

__all__ = ["SemiStructuredCompressor", "SemiStructuredConfig", "semi_structured_mask"]


def semi_structured_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Boolean keep-mask with the ``n`` largest of every ``m`` consecutive entries of each row.

    scores: (rows, cols), cols divisible by ``m``. Returns a bool tensor of the same shape with exactly
    ``n`` True per group (ties broken by position).
    """
    if scores.ndim != 2 or scores.shape[1] % m:
        raise ValueError(
            f"N:M sparsity needs a 2-D score matrix whose width is a multiple of {m}, got {tuple(scores.shape)}"
        )
    if not 0 < n <= m:
        raise ValueError(f"need 0 < n <= m, got n={n}, m={m}")
    groups = scores.reshape(scores.shape[0], -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(scores.shape)


@dataclass
class SemiStructuredConfig(CompressionConfig):
    """Settings of the N:M pruners.

    Attributes:
        pattern: "N:M", at most N non-zeros in every M consecutive inputs ("2:4": the pattern sparse
            tensor cores accelerate; density N / M).
    """

    pattern: str = "2:4"

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_pattern(self.pattern)


class SemiStructuredCompressor(Compressor):
    """Prunes every targeted linear to ``config.pattern`` given its input statistics (``prune``)."""

    config_class = SemiStructuredConfig
    config: SemiStructuredConfig

    def __init__(self, config: SemiStructuredConfig) -> None:
        super().__init__(config)
        self.n, self.m = parse_pattern(config.pattern)
        self.pruned: list[str] = []

    def stream_needs(self) -> StreamNeeds:
        return StreamNeeds(compressed=True, sequential=False)

    def group_statistics(self, group, inputs) -> torch.Tensor:
        """G = sum_t x_t x_t^T of the group's input (n, n) float64."""
        return accumulate_grams(
            inputs, self.device, need_gram=True, need_cross=False, need_dense=False, name=group[0]
        ).G

    def prune(self, W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        """The pruned copy of W (out, in) float32 given the group's ``group_statistics`` (by default the
        input Gram G (in, in))."""
        raise NotImplementedError

    @torch.no_grad()
    def compress_group(self, block: nn.Module, index: int, group: list[str], stats) -> list[ModuleReport]:
        reports = []
        for name in group:
            t0 = time.perf_counter()
            W = linear_weight(
                block.get_submodule(name)
            )  # a view for GPT-2 Conv1D: written in place either way
            if W.shape[1] % self.m:
                raise ValueError(
                    f"block {index} {name}: {W.shape[1]} inputs is not a multiple of {self.m}, so the "
                    f"{self.config.pattern} pattern does not apply; leave it out with targets=[...] (--targets)"
                )
            with single_threaded_linalg(self.device):
                W.copy_(self.prune(W.detach().float(), stats.to(W.device)).to(W.dtype))
            full = module_path(self.prefix, index, name)
            self.pruned.append(full)
            out, inp = W.shape
            kept = int(torch.count_nonzero(W))
            density = self.n / self.m
            reports.append(
                ModuleReport(
                    full, out, inp, 0, self.config.pattern, out * inp, kept, density, time.perf_counter() - t0
                )
            )
        return reports

    def finalize(self, model: nn.Module, specs: dict[str, dict], report: CompressionReport) -> None:
        record = sparsity_record(self.name, self.config.pattern, self.pruned)
        record["provenance"] = report.provenance
        setattr(model.config, SPARSITY_KEY, record)
