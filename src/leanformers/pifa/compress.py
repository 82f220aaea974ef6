"""One call: ``mpifa_compress(model, tokenizer, MPIFAConfig(density=0.5), calibration=...)``.

The sequential pipeline walks the blocks once. For each block it keeps an untouched copy (the dense
stream's block) and compresses the block itself group by group (q/k/v -> o -> gate/up -> down), each
group fitted on inputs produced by the already compressed earlier groups; then both activation
streams advance to the next block. ``mpifa_compress`` only orchestrates the named stages:

* plan.py: rank planning (uniform / attention split / OWL -> densities -> ranks);
* streams.py: ``BlockStreams``, the dense and compressed activations, and ``block_errors``;
* offload.py: where those activations wait between passes (``config.offload``: device, CPU or disk);
* group.py: ``GroupCompressor``, one group of linears (reconstruct.py: M; factorize.py/layer.py: PIFA);
* config.py / report.py: ``MPIFAConfig`` in, ``CompressionReport`` out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from leanformers._version import __version__
from leanformers.pifa.allocation import default_rank_multiple
from leanformers.pifa.calibration import find_layout, select_modules
from leanformers.pifa.config import MPIFAConfig
from leanformers.pifa.group import GroupCompressor, chain_consumer, check_weights_finite
from leanformers.pifa.offload import make_streams
from leanformers.pifa.plan import RankPlan, plan_ranks
from leanformers.pifa.quantization_config import MPIFAQuantizationConfig
from leanformers.pifa.report import CompressionReport, ModuleReport

__all__ = [
    "CompressionReport",
    "MPIFAConfig",
    "ModuleReport",
    "full_precision_matmul",
    "mpifa_compress",
    "resolve_layout",
]

logger = logging.getLogger(__name__)


def _matmul_precision_state() -> tuple[str | None, str | None, str | None]:
    """(legacy global precision or None when unreadable, CUDA matmul fp32 precision, oneDNN matmul fp32
    precision); the last two are None on torch versions without the per-backend API."""
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # torch refuses to read it after a mix of the legacy and per-backend APIs
        legacy = None
    cuda = getattr(getattr(torch.backends.cuda, "matmul", None), "fp32_precision", None)
    mkldnn = getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", None)
    return legacy, cuda, mkldnn


@contextlib.contextmanager
def full_precision_matmul():
    """Run float32 matmuls in full IEEE precision inside, whatever the user enabled outside.

    ``torch.backends.cuda.matmul.allow_tf32 = True`` or ``set_float32_matmul_precision("high")``
    (TF32, ~10-bit mantissa) or ``"medium"`` (bf16 on oneDNN) would otherwise reach the activations and
    the Gram products G, K, S: a 1e-3 relative error in S = X X^T breaks the whitening of small
    singular directions. The user's settings (legacy and per-backend) are restored on exit.
    """
    legacy, cuda, mkldnn = _matmul_precision_state()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        # Per-backend values last: restores states that mixed both APIs (where legacy is unreadable).
        if cuda is not None:
            torch.backends.cuda.matmul.fp32_precision = cuda
        if mkldnn is not None:
            torch.backends.mkldnn.matmul.fp32_precision = mkldnn


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_layout(model: nn.Module, config: MPIFAConfig):
    """The block layout ``mpifa_compress`` will use (overrides, table or inference) with ``targets``
    applied. Cheap (at most one 8-token forward): call it before any expensive step to fail early on an
    unsupported or already compressed model. Returns (BlockLayout, blocks ModuleList)."""
    layout, blocks = find_layout(model, config.blocks_path, config.groups, config.attention)
    return select_modules(layout, config.targets), blocks


def _calibration_windows(
    calibration, tokenizer, config: MPIFAConfig, needed: bool = True
) -> tuple[torch.Tensor, str]:
    """(nsamples, seqlen) ids from a tensor, a list of tensors, or text / a file / a dataset name, and
    a label; an empty (0, 0) tensor when no statistics are ``needed`` (plain SVD)."""
    from leanformers.data.text import (
        calibration_windows,
        load_text,
        mixed_calibration_windows,
        source_list,
        tokenize_text,
    )

    if not needed:
        return torch.empty(0, 0, dtype=torch.long), "none (plain SVD)"
    if calibration is None:
        raise ValueError("MPIFA needs calibration data: pass token windows, a text, a file or a dataset name")
    if isinstance(calibration, torch.Tensor):
        windows = calibration if calibration.dim() == 2 else calibration[None]
        return windows.long(), f"{windows.shape[0]} x {windows.shape[1]} given token windows"
    if isinstance(calibration, (list, tuple)) and calibration and isinstance(calibration[0], torch.Tensor):
        windows = torch.stack([c.reshape(-1) for c in calibration])
        return windows.long(), f"{windows.shape[0]} x {windows.shape[1]} given token windows"
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to calibrate on text")
    mix = source_list(calibration)
    if mix is not None:
        parts = [(tokenize_text(load_text(src), tokenizer), w) for src, w in mix]
        windows = mixed_calibration_windows(parts, config.nsamples, config.seqlen, config.seed)
        shares = ", ".join(f"{os.path.basename(src.rstrip('/')) or src} x{w:g}" for src, w in mix)
        return windows, f"mix of {shares}: {config.nsamples} x {config.seqlen} tokens, seed {config.seed}"
    source = str(calibration)
    is_file = "\n" not in source and len(source) < 4096 and os.path.exists(source)
    text = (
        load_text(source)
        if is_file or ("\n" not in source and len(source) < 256 and " " not in source)
        else source
    )
    ids = tokenize_text(text, tokenizer)
    windows = calibration_windows(ids, config.nsamples, config.seqlen, config.seed)
    label = os.path.basename(source) if (is_file or len(source) < 256) else "given text"
    return windows, f"{label}: {config.nsamples} x {config.seqlen} tokens, seed {config.seed}"


def _block_prefix(model: nn.Module, blocks: nn.ModuleList) -> str:
    for name, module in model.named_modules():
        if module is blocks:
            return name
    raise RuntimeError("blocks are not part of the model")


def mpifa_compress(
    model: nn.Module,
    tokenizer=None,
    config: MPIFAConfig | None = None,
    calibration=None,
    *,
    progress: bool = True,
) -> CompressionReport:
    """Compress every targeted linear of ``model`` in place with M + PIFA (or an ablation of it).

    Args:
        model: a supported Hugging Face model (LLaMA/Mistral/Qwen2 with GQA, OPT, GPT-2, BERT, ...), on
            CPU or GPU, in any dtype. Blocks are moved to ``config.device`` and upcast to float32 one at a
            time, then returned to their device and dtype.
        tokenizer: needed when ``calibration`` is text.
        config: an MPIFAConfig (default: density 0.5).
        calibration: (nsamples, seqlen) token ids, or a text / local file / ``datasets`` name that is
            tokenised and windowed with ``config.nsamples`` x ``config.seqlen``.
    Returns:
        A CompressionReport. The model carries ``config.quantization_config`` ("mpifa", every module's
        spec): ``save_compressed`` writes a checkpoint ``from_pretrained`` reloads after ``import leanformers``.
    """
    config = config or MPIFAConfig()
    # Forwards, Gram products and reconstruction all in full fp32/fp64 precision (no TF32 / bf16 matmul).
    with full_precision_matmul():
        start, device = time.perf_counter(), _resolve_device(config.device)
        layout, blocks = resolve_layout(model, config)
        need_stats = config.needs_statistics
        windows, calib_label = _calibration_windows(calibration, tokenizer, config, need_stats)
        prefix = _block_prefix(model, blocks)
        report = CompressionReport(calibration=calib_label, calibration_tokens=windows.numel())
        report.model_params_before = sum(p.numel() for p in model.parameters())
        was_training = model.training
        model.eval()
        # Everything but the blocks goes to the compute device; blocks move one at a time.
        block_homes = [(next(b.parameters()).device, next(b.parameters()).dtype) for b in blocks]
        _move_except(model, blocks, device)
        streams = make_streams(model, blocks, windows.split(config.batch_size), device, config, need_stats)
        plan = plan_ranks(blocks, layout, config, device, streams.dense, streams.calls)
        compress_group = GroupCompressor(config, plan, device, prefix, chain_consumer(layout, config))
        specs: dict[str, dict] = {}
        bar = tqdm(list(enumerate(blocks)), desc="MPIFA blocks", disable=not progress)
        for i, block in bar:
            block.to(device, torch.float32)
            check_weights_finite(block, i, layout.modules)
            streams.run_dense(block, i, [g[0] for g in layout.groups])
            for group in layout.groups:
                report.modules += compress_group(block, i, group, streams.group_stats(block, i, group[0]))
            specs.update(compress_group.finish_block(block, i, layout))
            streams.advance(block, i)
            block.to(*block_homes[i])
            bar.set_postfix(density=f"{report.achieved_density:.3f}")
        model.train(was_training)
        report.model_params_after = sum(p.numel() for p in model.parameters())
        report.seconds = time.perf_counter() - start
        model.config.quantization_config = _quantization_config(config, specs, plan, report, device)
        return report


def _quantization_config(
    config: MPIFAConfig,
    specs: dict[str, dict],
    plan: RankPlan,
    report: CompressionReport,
    device: torch.device,
) -> MPIFAQuantizationConfig:
    """The ``quantization_config`` a compressed model carries: every module's spec and how it was made."""
    return MPIFAQuantizationConfig(
        modules=specs,
        density=config.density,
        alpha=config.alpha,
        steps=config.steps,
        calibration=report.calibration,
        leanformers_version=__version__,
        extra={
            "init": config.init,
            "output": config.output,
            "attn_density": config.attn_density,
            "owl": config.owl,
            "allocation": config.allocation,
            "shrinkage": config.shrinkage,
            "block_densities": plan.block_densities or None,
            "rank_multiple": config.rank_multiple or default_rank_multiple(device),
            "achieved_density": report.achieved_density,
        },
    )


def _move_except(module: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move ``module`` to ``device`` but leave the blocks where they are."""
    if module is blocks:
        return
    if not _contains(module, blocks):
        module.to(device)
        return
    for child in module.children():
        _move_except(child, blocks, device)
    for p in module.parameters(recurse=False):
        p.data = p.data.to(device)
    for name, b in list(module.named_buffers(recurse=False)):
        setattr(module, name, b.to(device))


def _contains(module: nn.Module, target: nn.Module) -> bool:
    return any(m is target for m in module.modules())
