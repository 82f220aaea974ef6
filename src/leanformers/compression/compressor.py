"""The ``Compressor`` protocol and the registry of compressors.

A compressor is one compression method over the shared block pipeline (``compression.pipeline``). It
declares what it needs and does the method's work; the pipeline walks the blocks, keeps the activation
streams and moves weights (in memory or streamed from checkpoint shards). Per compression:

1. ``stream_needs()``: which activations the statistics are computed from (``StreamNeeds``);
2. ``setup(layout, prefix, device)`` then ``plan(blocks, streams, scan)``: the budget, before any block
   changes (e.g. the rank of every linear);
3. per block, per group of linears sharing an input: ``group_statistics(inputs)`` turns the group's
   inputs into the statistics the method needs, ``compress_group(...)`` replaces or rewrites the linears;
   ``finish_block`` returns the specs of the compressed modules;
4. ``finalize(model, specs, report)``: what the model carries so that it saves and reloads (a
   ``quantization_config`` for compressed layers, a plain config key for pruned weights).

``register_compressor`` adds a class under its ``name`` (a compressor can be registered from any
module: nothing in the package needs to change). The config's type selects the compressor:
``compressor_for(WandaConfig())`` is a ``WandaCompressor``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from leanformers.compression.config import CompressionConfig
from leanformers.compression.layout import BlockLayout
from leanformers.compression.report import CompressionReport, ModuleReport
from leanformers.compression.streams import StreamNeeds

__all__ = [
    "COMPRESSORS",
    "Compressor",
    "StreamNeeds",
    "available_compressors",
    "compressor_for",
    "get_compressor",
    "register_compressor",
]


class Compressor(ABC):
    """One compression method. Subclasses set ``name`` and ``config_class`` and implement
    ``compress_group`` and ``finalize``; the other steps have no-op defaults."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[CompressionConfig]] = CompressionConfig

    def __init__(self, config: CompressionConfig) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}"
            )
        self.config = config
        self.layout: BlockLayout | None = None
        self.prefix = ""
        self.device = torch.device("cpu")

    # -- what it needs ------------------------------------------------------------------------------
    def stream_needs(self) -> StreamNeeds:
        return StreamNeeds()

    def setup(self, layout: BlockLayout, prefix: str, device: torch.device) -> None:
        """The layout (targets applied), the blocks' path in the model (for names) and the compute device."""
        self.layout, self.prefix, self.device = layout, prefix, device

    def plan(
        self, blocks: nn.ModuleList, streams, scan: Iterable[nn.Module], *, progress: bool = True
    ) -> None:
        """Decide the budget before any block changes. ``streams.dense`` / ``streams.calls`` hold the
        first block's dense inputs; ``scan`` yields every block with its weights loaded (for a dense scan);
        ``blocks`` gives the shapes (may be on the meta device); ``progress``: whether a scan may show a
        progress bar. Default: nothing to plan."""
        return None

    # -- per group -------------------------------------------------------------------------------
    def group_statistics(
        self, group: list[str], inputs: Iterator[tuple[torch.Tensor | None, torch.Tensor | None]]
    ) -> Any:
        """The statistics of the linears ``group`` (which share one input) from that input: one
        (x_dense, x_compressed) pair per calibration batch, each (batch, seq, in) or None when not in
        ``stream_needs``. Called only when some stream is needed. Default: none."""
        return None

    @abstractmethod
    def compress_group(
        self, block: nn.Module, index: int, group: list[str], stats: Any
    ) -> list[ModuleReport]:
        """Compress the linears ``group`` (paths inside ``block``, block number ``index``) in place; one
        report per linear."""

    def finish_block(self, block: nn.Module, index: int) -> dict[str, dict]:
        """After every group of ``block``: full module name -> spec of each compressed module."""
        return {}

    # -- what it writes ----------------------------------------------------------------------------
    @abstractmethod
    def finalize(self, model: nn.Module, specs: dict[str, dict], report: CompressionReport) -> None:
        """Attach to ``model.config`` what a saved checkpoint needs to reload (and to say how it was made)."""

    def describe(self) -> dict[str, Any]:
        """The settings worth recording (model card, report): the config without layout overrides."""
        return {
            k: v
            for k, v in self.config.to_dict().items()
            if v is not None and k not in ("groups", "attention", "offload_streams")
        }


COMPRESSORS: dict[str, type[Compressor]] = {}


def register_compressor(cls: type[Compressor]) -> type[Compressor]:
    """Class decorator: make ``cls`` available under ``cls.name`` (CLI ``--method``, ``get_compressor``)."""
    if not (isinstance(cls, type) and issubclass(cls, Compressor)):
        raise TypeError(f"register_compressor takes a Compressor subclass, got {cls!r}")
    if not cls.name or not isinstance(cls.name, str):
        raise ValueError(f"{cls.__name__} needs a non-empty string `name` to be registered")
    if not (isinstance(cls.config_class, type) and issubclass(cls.config_class, CompressionConfig)):
        raise TypeError(f"{cls.__name__}.config_class must be a CompressionConfig subclass")
    current = COMPRESSORS.get(cls.name)
    if current is not None and current.__qualname__ != cls.__qualname__:
        raise ValueError(
            f"compressor name {cls.name!r} is already taken by {current.__module__}.{current.__name__}"
        )
    COMPRESSORS[cls.name] = cls
    cls.config_class.method = cls.name
    return cls


def available_compressors() -> list[str]:
    return sorted(COMPRESSORS)


def get_compressor(name: str) -> type[Compressor]:
    """The compressor class registered as ``name``; a ValueError listing the names otherwise."""
    if name not in COMPRESSORS:
        raise ValueError(
            f"unknown compression method {name!r}: choose one of {', '.join(available_compressors())}"
        )
    return COMPRESSORS[name]


def compressor_for(config: CompressionConfig) -> Compressor:
    """The compressor whose ``config_class`` is exactly the type of ``config``."""
    for cls in COMPRESSORS.values():
        if type(config) is cls.config_class:
            return cls(config)
    raise TypeError(
        f"no registered compressor takes a {type(config).__name__}; pass the config of a method "
        f"({', '.join(c.config_class.__name__ for c in COMPRESSORS.values())})"
    )
