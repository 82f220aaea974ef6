"""Streaming compression: compress a checkpoint folder block by block, never holding the whole model.

``compress_pretrained(source_folder, output_folder, MPIFAConfig(...), calibration=...)`` (any
compressor's config) runs the same pipeline as ``compress`` + ``save_compressed`` (the same block loop,
the same arithmetic, bit-identical output) on a model whose weights stay on disk:

1. the model is built on the meta device from its config (parameters take no memory);
2. the weights outside the blocks (embeddings, final norm; not an untied output head, which that pass
   never reaches) are read from the safetensors shards for the one pass that captures the first
   block's inputs, then freed;
3. each block is read, compressed group by group on the two activation streams, written to its own
   shard of a staging folder beside the output, and freed (its parameters go back to meta);
4. the non-block tensors are copied from the source shards (cast as ``from_pretrained`` would; in
   shards no larger than a block), the
   config (with the ``mpifa`` quantization_config), generation config, tokenizer and model card are
   written, and the staging folder is renamed into place.

Host memory then holds about one dense block, its compressed version, the solver's Gram matrices (on
the compute device), the calibration activations (see ``MPIFAConfig.offload``) and, during step 2 only,
the input embeddings. Guide and memory model: docs/scaling.md (MPIFA streaming).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from leanformers.compression.calibration import calibration_windows_for, check_windows_hash, provenance
from leanformers.compression.checkpoint_io import (
    CheckpointReader,
    PeakHostMemory,
    ShardWriter,
    materialize,
    release,
    release_host_memory,
)
from leanformers.compression.compressor import compressor_for
from leanformers.compression.config import CompressionConfig
from leanformers.compression.layout import ARCHITECTURES, blocks_at, refuse_compressed, resolve_blocks
from leanformers.compression.offload import make_streams
from leanformers.compression.pipeline import (
    block_prefix,
    compress_blocks,
    move_except,
    resolve_layout,
)
from leanformers.compression.precision import full_precision_matmul, resolve_device
from leanformers.compression.report import CompressionReport
from leanformers.folders import check_output, fault_point, replace_folder, staging_folder
from leanformers.storage.integration import dense_skeleton
from leanformers.storage.layers import CompressedLinear
from leanformers.storage.saving import check_guard, write_extras

__all__ = ["CheckpointBlocks", "compress_pretrained", "resolve_dtype"]

_META = torch.device("meta")


def resolve_dtype(config, dtype: torch.dtype | str | None) -> torch.dtype:
    """The dtype the in-memory path would load the model in: ``dtype`` when given, else ("auto"/None)
    the checkpoint's ``dtype`` (``torch_dtype`` in older configs), else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        raise ValueError(f"dtype must be a torch.dtype or 'auto', got {dtype!r}")
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else torch.float32


def _skeleton(folder: Path, dtype: torch.dtype | str | None) -> nn.Module:
    """The causal LM of ``folder``'s config with every parameter on the meta device (buffers such as
    RoPE tables are computed for real: they are not in the checkpoint)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder")
    cfg = AutoConfig.from_pretrained(folder)
    torch_dtype = resolve_dtype(cfg, dtype)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype)
    # init_empty_weights re-registers every parameter on meta, which unties the ones post_init tied
    # (lm_head / embed_tokens): tie them again, as from_pretrained does.
    model.tie_weights()
    return model.eval()


def _streamed_blocks(model: nn.Module, config: CompressionConfig) -> nn.ModuleList:
    """The blocks, found on the meta skeleton (no forward): ``blocks_path``, the architecture table, or
    the repeated-block search (``find_blocks`` reads only shapes)."""
    table = ARCHITECTURES.get(getattr(model.config, "model_type", None))
    if not config.blocks_path and table is not None:
        blocks, _ = resolve_blocks(model, table.blocks_path)
        if blocks is not None:
            return blocks
    return blocks_at(model, config.blocks_path)[1]


def _head_prefix(model: nn.Module) -> tuple[str, ...]:
    """("lm_head.",) when the output embeddings are a module of their own (not tied to the input
    embeddings): the forward that captures the first block's inputs never reaches them."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None or getattr(head, "weight", None) is getattr(embed, "weight", None):
        return ()
    names = [n for n, m in model.named_modules() if m is head]
    return (names[0] + ".",) if names else ()


def _move_loaded(model: nn.Module, skip: str, device: torch.device) -> None:
    """Move the loaded (non-meta) parameters and buffers outside ``skip`` to ``device``, in place (the
    Parameter objects stay, so tied weights stay tied)."""
    for name, module in model.named_modules():
        if name.startswith(skip):
            continue
        for p in module._parameters.values():
            if p is not None and p.device.type != "meta":
                p.data = p.data.to(device)
        for key, b in module._buffers.items():
            if b is not None and b.device.type != "meta":
                module._buffers[key] = b.to(device)


class CheckpointBlocks:
    """The blocks of a checkpoint on disk (``pipeline.BlockSource``): block ``i`` is read from the shards
    onto the compute device in float32, and once compressed written to its own shard and freed."""

    def __init__(
        self, model, blocks: nn.ModuleList, prefix: str, reader: CheckpointReader, device: torch.device
    ):
        self.model, self.blocks, self.prefix, self.reader, self.device = model, blocks, prefix, reader, device
        self.home_dtype = next(blocks[0].parameters()).dtype
        self.writer: ShardWriter | None = None
        self.dense = None  # the dense architecture on meta, for the load guard (built once)

    def __len__(self) -> int:
        return len(self.blocks)

    def _read(self, i: int) -> nn.Module:
        block = self.blocks[i]
        materialize(block, f"{self.prefix}.{i}.", self.reader)
        return block

    def load(self, index: int) -> nn.Module:
        return self._read(index).to(self.device, torch.float32)

    def store(self, block: nn.Module, index: int) -> None:
        block.to("cpu", self.home_dtype)
        names = {
            f"{self.prefix}.{index}.{n}": m
            for n, m in block.named_modules()
            if isinstance(m, CompressedLinear)
        }
        check_guard(self.model, names, self.dense)  # the same refusal save_compressed applies
        self.writer.add(block.state_dict(prefix=f"{self.prefix}.{index}."))
        release(block)
        fault_point(f"after-block-{index}")

    def scan(self):
        """Every block in turn, loaded while the caller holds it (the OWL / spectrum scans)."""
        for i in range(len(self.blocks)):
            yield self._read(i)
            release(self.blocks[i])


def _non_block_keys(model: nn.Module, prefix: str) -> tuple[list[str], list[str]]:
    """(keys outside the blocks, keys inside) that ``save_pretrained`` writes for ``model``: its
    state_dict without tied duplicates (computed on meta tensors)."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    keys = list(remove_tied_weights_from_state_dict(model.state_dict(), model))
    inside = [k for k in keys if k.startswith(prefix + ".")]
    return [k for k in keys if not k.startswith(prefix + ".")], inside


def _write_non_block(
    writer: ShardWriter, reader: CheckpointReader, model: nn.Module, keys: list[str], max_bytes: int
) -> None:
    """Copy the non-block tensors from the source shards, cast to the model's dtypes, in shards of at
    most ``max_bytes`` (one tensor larger than that gets a shard of its own)."""
    meta = model.state_dict()
    alias = {}  # a tied key the source stores under another of its names
    for key in keys:
        if key not in reader:
            tensor = model.get_parameter_or_buffer(key)
            others = [
                n for n, t in model.named_parameters(remove_duplicate=False) if t is tensor and n in reader
            ]
            if not others:
                raise ValueError(f"the checkpoint has no tensor {key!r} (nor a tied alias of it)")
            alias[key] = others[0]
    batch, size = [], 0
    for key in [*keys, None]:
        nbytes = 0 if key is None else meta[key].numel() * meta[key].element_size()
        if batch and (key is None or size + nbytes > max_bytes):
            values = reader.read([alias.get(k, k) for k in batch])
            tensors = {}
            for k in batch:
                v = values[alias.get(k, k)]
                tensors[k] = v.to(meta[k].dtype) if v.is_floating_point() else v
            writer.add(tensors)
            del values, tensors
            release_host_memory()
            batch, size = [], 0
        if key is not None:
            batch.append(key)
            size += nbytes


def _max_bytes(max_shard_size: int | str) -> int:
    from huggingface_hub.serialization._base import parse_size_to_int

    return max_shard_size if isinstance(max_shard_size, int) else parse_size_to_int(max_shard_size)


def compress_pretrained(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    config: CompressionConfig,
    calibration=None,
    tokenizer=None,
    *,
    dtype: torch.dtype | str | None = "auto",
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    model_card: str | Callable[[CompressionReport], str] | None = None,
    progress: bool = True,
) -> CompressionReport:
    """Compress the causal LM saved in ``source`` (a local folder with safetensors weights) into
    ``output_dir`` with the method ``config`` selects, streaming one block at a time through host memory.

    The result is what ``compress(AutoModelForCausalLM.from_pretrained(source, dtype=dtype), ...)``
    followed by ``save_compressed(model, tokenizer, output_dir)`` writes: the same tensors bit for bit and
    the same config, without ever holding the whole model (see the module docstring for the memory).

    Args:
        source: local model folder (config.json + ``model.safetensors`` or a sharded safetensors folder).
        output_dir: folder to create; an existing non-empty one is refused unless ``overwrite``.
        config, calibration, tokenizer: as for ``compress``; the tokenizer (if given) is saved too.
        dtype: dtype to load the weights in ("auto": the checkpoint's), as ``from_pretrained(dtype=)``.
        max_shard_size: largest shard of the non-block tensors; every block gets a shard of its own.
        model_card: text of a README.md to write into the folder, or a function of the report returning it.
    Returns:
        The CompressionReport, with ``peak_host_rss_bytes`` (peak resident memory during the call).
    """
    compressor = compressor_for(config)
    source, output = Path(source).expanduser(), Path(output_dir).expanduser().absolute()
    check_output(output, overwrite=overwrite, protected=[source])  # cheap: an occupied output costs no work
    reader = CheckpointReader(source)
    max_bytes = _max_bytes(max_shard_size)
    with PeakHostMemory() as memory, full_precision_matmul():
        start, device = time.perf_counter(), resolve_device(config.device)
        model = _skeleton(source, dtype)
        refuse_compressed(model)
        blocks = _streamed_blocks(model, config)
        prefix = block_prefix(model, blocks)
        loader = CheckpointBlocks(model, blocks, prefix, reader, device)
        # Non-block weights but the output head (the capture stops at block 0), and block 0: enough for
        # the layout probe and the input capture.
        materialize(model, "", reader, skip=(prefix + ".", *_head_prefix(model)))
        materialize(blocks[0], f"{prefix}.0.", reader)
        layout, found = resolve_layout(model, config)
        if found is not blocks:
            raise ValueError(
                f"the layout's blocks ({layout.blocks_path}) are not the ModuleList at {prefix}; pass "
                "blocks_path (--blocks-path)"
            )
        needs = compressor.stream_needs()
        windows, calib_label = calibration_windows_for(calibration, tokenizer, config, needs.any)
        compressor.setup(layout, prefix, device)
        report = CompressionReport(
            method=compressor.name, calibration=calib_label, calibration_tokens=windows.numel()
        )
        if needs.any:  # what the statistics were computed from, checked against a pinned hash
            report.calibration_sha256 = check_windows_hash(windows, config.calibration_sha256)
        report.provenance = provenance(model, calibration, report)
        report.model_params_before = sum(p.numel() for p in model.parameters())
        block_bytes = max(sum(t.numel() * t.element_size() for t in b.state_dict().values()) for b in blocks)
        _move_loaded(model, prefix + ".", device)
        batches = windows.split(config.batch_size)
        streams = make_streams(model, blocks, batches, device, config.offload, needs, config.offload_folder)
        move_except(model, blocks, _META)  # embeddings and head are not needed again: free them
        model.tie_weights()  # a move to meta makes new Parameters: tie them again (the saved keys follow)
        release(blocks[0])
        compressor.plan(blocks, streams, loader.scan(), progress=progress)
        loader.dense = dense_skeleton(model)  # once: rebuilding it for every block would cost O(blocks^2)

        staging = staging_folder(output)
        try:
            loader.writer = ShardWriter(staging)
            desc = f"{compressor.name} blocks (streaming)"
            specs = compress_blocks(compressor, streams, loader, report, progress=progress, desc=desc)
            report.model_params_after = sum(p.numel() for p in model.parameters())
            report.seconds = time.perf_counter() - start
            report.peak_host_rss_bytes = memory.so_far()
            compressor.finalize(model, specs, report)
            if callable(model_card):
                model_card = model_card(report)
            # Non-block shards no larger than a block: the copy at the end stays within the block budget.
            _finish_folder(
                model,
                tokenizer,
                reader,
                loader.writer,
                staging,
                prefix,
                min(max_bytes, block_bytes),
                model_card,
            )
            replace_folder(staging, output, overwrite=overwrite, protected=[source])
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    report.peak_host_rss_bytes = memory.peak
    return report


def _finish_folder(model, tokenizer, reader, writer, staging, prefix, max_bytes, model_card) -> None:
    """Non-block shards, index, config (as ``save_pretrained`` writes it), tokenizer, model card."""
    outside, inside = _non_block_keys(model, prefix)
    if set(inside) != writer.keys:
        differ = sorted(set(inside) ^ writer.keys)[:5]
        raise RuntimeError(f"the written block tensors differ from the model's state_dict: {differ}")
    _write_non_block(writer, reader, model, outside, max_bytes)
    writer.finish(model.num_parameters())
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(staging)
    if model.can_generate():
        model.generation_config.save_pretrained(staging)
    write_extras(staging, tokenizer, model_card)
