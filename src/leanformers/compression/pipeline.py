"""The block pipeline every compressor runs on, and ``compress`` (in memory).

The pipeline walks the blocks once. For each block it runs the passes the compressor's statistics need
(``StreamNeeds``), then lets the compressor rewrite the block group by group (q/k/v -> o -> gate/up ->
down, each group fitted on inputs produced as the compressor asks), then moves the activation streams to
the next block. ``compress_blocks`` is that loop, the same for a model in memory (``InMemoryBlocks``:
blocks move to the compute device one at a time and back) and for a checkpoint streamed from its shards
(``pretrained.CheckpointBlocks``: each block is read, compressed, written and freed).

Stages and where they live: layout.py (blocks and groups), calibration.py (token windows), streams.py /
offload.py (activations), compressor.py (the method: budget, statistics, compression, record),
report.py (what comes back).
"""

from __future__ import annotations

import time
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from leanformers.compression.calibration import calibration_windows_for, check_windows_hash, provenance
from leanformers.compression.compressor import Compressor, compressor_for
from leanformers.compression.config import CompressionConfig
from leanformers.compression.layout import BlockLayout, find_layout, linear_weight, select_modules
from leanformers.compression.offload import make_streams
from leanformers.compression.precision import full_precision_matmul, resolve_device
from leanformers.compression.report import CompressionReport
from leanformers.compression.streams import BlockStreams

__all__ = [
    "BlockSource",
    "InMemoryBlocks",
    "block_prefix",
    "check_weights_finite",
    "compress",
    "compress_blocks",
    "move_except",
    "resolve_layout",
]


def resolve_layout(model: nn.Module, config: CompressionConfig) -> tuple[BlockLayout, nn.ModuleList]:
    """The block layout a compression will use (overrides, table or inference) with ``targets`` applied.
    Cheap (at most one 8-token forward): call it before any expensive step to fail early on an
    unsupported or already compressed model. Returns (BlockLayout, blocks ModuleList)."""
    layout, blocks = find_layout(model, config.blocks_path, config.groups, config.attention)
    return select_modules(layout, config.targets), blocks


def block_prefix(model: nn.Module, blocks: nn.ModuleList) -> str:
    """The path of ``blocks`` inside ``model``."""
    for name, module in model.named_modules():
        if module is blocks:
            return name
    raise RuntimeError("blocks are not part of the model")


def check_weights_finite(block: nn.Module, index: int, names: list[str]) -> None:
    for name in names:
        if not torch.isfinite(linear_weight(block.get_submodule(name))).all():
            raise FloatingPointError(
                f"block {index}: {name} has a non-finite weight; the checkpoint is corrupt"
            )


def move_except(module: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move ``module`` to ``device`` but leave the blocks where they are."""
    if module is blocks:
        return
    if not any(m is blocks for m in module.modules()):
        module.to(device)
        return
    for child in module.children():
        move_except(child, blocks, device)
    for p in module.parameters(recurse=False):
        p.data = p.data.to(device)
    for name, b in list(module.named_buffers(recurse=False)):
        setattr(module, name, b.to(device))


class BlockSource(Protocol):
    """Where the pipeline takes each block from and where it puts it back."""

    def __len__(self) -> int: ...

    def load(self, index: int) -> nn.Module:
        """Block ``index`` on the compute device, in float32."""

    def store(self, block: nn.Module, index: int) -> None:
        """The compressed block ``index`` back where it belongs (its device and dtype, or a shard)."""

    def scan(self):
        """Every block in turn with its weights present (for a dense scan before compression)."""


class InMemoryBlocks:
    """The blocks of a model in memory: each goes to the compute device in float32 while it is compressed,
    then back to its own device and dtype."""

    def __init__(self, blocks: nn.ModuleList, device: torch.device):
        self.blocks, self.device = blocks, device
        self.homes = [(next(b.parameters()).device, next(b.parameters()).dtype) for b in blocks]

    def __len__(self) -> int:
        return len(self.blocks)

    def load(self, index: int) -> nn.Module:
        return self.blocks[index].to(self.device, torch.float32)

    def store(self, block: nn.Module, index: int) -> None:
        block.to(*self.homes[index])

    def scan(self):
        return iter(self.blocks)


def compress_blocks(
    compressor: Compressor,
    streams: BlockStreams,
    source: BlockSource,
    report: CompressionReport,
    *,
    progress: bool = True,
    desc: str = "blocks",
) -> dict[str, dict]:
    """The one block loop: load, dense / block-wise passes, compress group by group on their statistics,
    finish, advance the streams, store. Appends one report per linear to ``report``; returns the specs of
    the compressed modules (full name -> spec)."""
    layout = compressor.layout
    firsts = [g[0] for g in layout.groups]
    specs: dict[str, dict] = {}
    bar = tqdm(range(len(source)), desc=desc, disable=not progress)
    for i in bar:
        block = source.load(i)
        check_weights_finite(block, i, layout.modules)
        streams.start_block(block, i, firsts)
        for group in layout.groups:
            stats = streams.statistics(
                block, i, group[0], lambda pairs, g=group: compressor.group_statistics(g, pairs)
            )
            report.modules += compressor.compress_group(block, i, group, stats)
        # Advance before finish_block: its reorder (scatter-free MLP) is function-preserving, but it
        # changes gate/up, so the replay memo would run them again on every batch.
        streams.advance(block, i)
        specs.update(compressor.finish_block(block, i))
        source.store(block, i)
        bar.set_postfix(density=f"{report.achieved_density:.3f}")
    return specs


def compress(
    model: nn.Module,
    tokenizer=None,
    config: CompressionConfig | None = None,
    calibration=None,
    *,
    progress: bool = True,
) -> CompressionReport:
    """Compress every targeted linear of ``model`` in place with the method ``config`` selects.

    Args:
        model: a supported Hugging Face model (LLaMA/Mistral/Qwen2 with GQA, OPT, GPT-2, BERT, ...), on
            CPU or GPU, in any dtype. Blocks are moved to ``config.device`` and upcast to float32 one at a
            time, then returned to their device and dtype.
        tokenizer: needed when ``calibration`` is text.
        config: the method's config: ``MPIFAConfig``, ``SVDLLMConfig``, ``ASVDConfig``, ``SVDConfig``,
            ``WandaConfig`` or ``SparseGPTConfig`` (or that of a registered compressor).
        calibration: (nsamples, seqlen) token ids, or a text / local file / ``datasets`` name / mix that is
            tokenised and windowed with ``config.nsamples`` x ``config.seqlen``.
    Returns:
        A CompressionReport. The model carries what ``save_compressed`` needs to write a checkpoint that
        ``from_pretrained`` reloads (see each compressor's ``finalize``).
    """
    if config is None:
        raise TypeError(
            "compress() needs the method's config, e.g. MPIFAConfig(density=0.5) or WandaConfig()"
        )
    compressor = compressor_for(config)
    # Forwards, Gram products and solves all in full fp32/fp64 precision (no TF32 / bf16 matmul).
    with full_precision_matmul():
        start, device = time.perf_counter(), resolve_device(config.device)
        layout, blocks = resolve_layout(model, config)
        needs = compressor.stream_needs()
        windows, label = calibration_windows_for(calibration, tokenizer, config, needs.any, model, progress)
        compressor.setup(layout, block_prefix(model, blocks), device)
        report = CompressionReport(
            method=compressor.name, calibration=label, calibration_tokens=windows.numel()
        )
        if needs.any:  # what the statistics were computed from, checked against a pinned hash
            report.calibration_sha256 = check_windows_hash(windows, config.calibration_sha256)
        report.provenance = provenance(model, calibration, report)
        report.model_params_before = sum(p.numel() for p in model.parameters())
        was_training = model.training
        model.eval()
        # Everything but the blocks goes to the compute device; blocks move one at a time.
        source = InMemoryBlocks(blocks, device)
        move_except(model, blocks, device)
        batches = windows.split(config.batch_size)
        streams = make_streams(model, blocks, batches, device, config.offload, needs, config.offload_folder)
        compressor.plan(blocks, streams, source.scan(), progress=progress)
        specs = compress_blocks(
            compressor, streams, source, report, progress=progress, desc=f"{compressor.name} blocks"
        )
        model.train(was_training)
        report.model_params_after = sum(p.numel() for p in model.parameters())
        report.seconds = time.perf_counter() - start
        compressor.finalize(model, specs, report)
        return report
