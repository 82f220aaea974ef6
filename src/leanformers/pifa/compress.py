"""One call: ``mpifa_compress(model, tokenizer, MPIFAConfig(density=0.5), calibration=...)``.

The sequential pipeline walks the blocks once. For each block it keeps an untouched copy (the dense
stream's block) and compresses the block itself group by group (q/k/v -> o -> gate/up -> down), each
group fitted on inputs produced by the already compressed earlier groups; then both activation
streams advance to the next block. The maths lives in reconstruct.py (M), factorize.py/layer.py
(PIFA) and allocation.py (densities); this file only orchestrates.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from leanformers.pifa.allocation import (
    default_rank_multiple,
    module_ranks,
    outlier_ratio,
    owl_densities,
    solve_mlp_density,
)
from leanformers.pifa.calibration import (
    _input_of,
    capture_block_inputs,
    find_layout,
    group_input_stats,
    linear_weight,
    run_block,
    run_block_capturing,
    select_modules,
)
from leanformers.pifa.layer import LowRankLinear, PIFALinear, emit_in_order_
from leanformers.pifa.reconstruct import cholesky_with_damping, reconstruct

__all__ = [
    "CompressionReport",
    "MPIFAConfig",
    "ModuleReport",
    "full_precision_matmul",
    "mpifa_compress",
    "resolve_layout",
]

logger = logging.getLogger(__name__)


@dataclass
class MPIFAConfig:
    """How to compress. Defaults follow the paper (M with alpha 0.25 and 2 steps, PIFA output).

    Attributes:
        density: kept fraction of the parameters of the targeted linears, in (0, 1].
        attn_density: density of the attention linears; the MLP density is solved to keep the budget.
        owl: follow the OWL outlier share layer by layer (computed on the calibration data).
        owl_lambda: largest deviation of a layer's density from ``density`` under OWL.
        owl_threshold: OWL outlier threshold M (|W_ij| ||X_j|| > M x mean).
        alpha: weight of the dense-model target in Y = (1 - alpha) W X_c + alpha W X_d, in [0, 1].
        steps: closed-form alternating steps after the init (0: init only, 1: U-step, 2: U then V).
        init: "whiten" (SVD-LLM truncation-aware whitening) or "svd" (plain truncated SVD).
        output: "pifa" (PIFA layers) or "lowrank" (U V layers; the low-rank baseline at equal density).
        form: PIFA layout ("auto", "row", "column"); see PIFALinear.
        scatter_free_mlp: with PIFA output and form "auto", store the MLP's second linear (down_proj,
            fc2, ...) in column form and let the first ones emit channels in its pivot-first order, so
            that it reads contiguous slices without any gather (function-preserving reordering).
        damping: relative damping of the V-step normal equations.
        rank_multiple: round ranks DOWN to a multiple of this (kernel-friendly; never over budget).
            None: 8 when compressing on a GPU (tensor-core aligned operands), 1 on the CPU.
        targets: fnmatch patterns of module paths inside a block (None: every linear of the layout).
        nsamples, seqlen: calibration windows drawn from text calibration sources.
        batch_size: calibration windows per forward pass.
        device: "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
        offload_streams: keep the two activation streams on the CPU (saves GPU memory).
        seed: seed of the calibration window sampling.
        blocks_path, groups, attention: layout overrides (default: the built-in table for LLaMA, Qwen2,
            OPT, GPT-2, BERT, inferred for any other model by ``calibration.infer_layout``).
    """

    density: float = 0.5
    attn_density: float | None = None
    owl: bool = False
    owl_lambda: float = 0.08
    owl_threshold: float = 5.0
    alpha: float = 0.25
    steps: int = 2
    init: str = "whiten"
    output: str = "pifa"
    form: str = "auto"
    scatter_free_mlp: bool = True
    damping: float = 1e-2
    rank_multiple: int | None = None
    targets: list[str] | None = None
    nsamples: int = 128
    seqlen: int = 2048
    batch_size: int = 8
    device: str = "auto"
    offload_streams: bool = False
    seed: int = 0
    blocks_path: str | None = None
    groups: list[list[str]] | None = None
    attention: list[str] | None = None

    def __post_init__(self):
        def unit(name, value, low_open=True):
            ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
            if not ok:
                rng = "(0, 1]" if low_open else "[0, 1]"
                raise ValueError(f"{name} must lie in {rng}, got {value}")

        unit("density", self.density)
        if self.attn_density is not None:
            unit("attn_density", self.attn_density)
            if self.owl:
                raise ValueError("choose either owl or attn_density, not both")
        unit("alpha", self.alpha, low_open=False)
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.init not in ("whiten", "svd"):
            raise ValueError(f"init must be 'whiten' or 'svd', got {self.init!r}")
        if self.output not in ("pifa", "lowrank"):
            raise ValueError(f"output must be 'pifa' or 'lowrank', got {self.output!r}")
        if self.form not in ("auto", "row", "col", "column"):
            raise ValueError(f"form must be 'auto', 'row' or 'column', got {self.form!r}")
        if (
            (self.rank_multiple is not None and self.rank_multiple < 1)
            or self.nsamples < 1
            or self.seqlen < 2
            or self.batch_size < 1
        ):
            raise ValueError("rank_multiple, nsamples, batch_size must be >= 1 and seqlen >= 2")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModuleReport:
    name: str
    out_features: int
    in_features: int
    rank: int
    kind: str
    dense_params: int
    stored_params: int
    target_density: float
    seconds: float

    @property
    def density(self) -> float:
        return self.stored_params / self.dense_params


@dataclass
class CompressionReport:
    """What was compressed, how much was kept, how long it took."""

    modules: list[ModuleReport] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0
    seconds: float = 0.0
    calibration: str = ""
    calibration_tokens: int = 0

    @property
    def targeted_params_before(self) -> int:
        return sum(m.dense_params for m in self.modules)

    @property
    def targeted_params_after(self) -> int:
        return sum(m.stored_params for m in self.modules)

    @property
    def achieved_density(self) -> float:
        """Stored / dense parameters of the targeted linears."""
        return self.targeted_params_after / max(1, self.targeted_params_before)

    @property
    def model_density(self) -> float:
        """Whole-model parameters after / before (embeddings, norms, head untouched)."""
        return self.model_params_after / max(1, self.model_params_before)

    def table(self) -> str:
        rows = [
            ("targeted linears", f"{len(self.modules)}"),
            ("targeted params", f"{self.targeted_params_before:,} -> {self.targeted_params_after:,}"),
            ("achieved density (targeted)", f"{self.achieved_density:.4f}"),
            ("model params", f"{self.model_params_before:,} -> {self.model_params_after:,}"),
            ("model density (whole model)", f"{self.model_density:.4f}"),
            ("calibration", f"{self.calibration} ({self.calibration_tokens:,} tokens)"),
            ("compression time", f"{self.seconds:.1f} s"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

    def to_dict(self) -> dict:
        return {
            "modules": [asdict(m) for m in self.modules],
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
            "targeted_params_before": self.targeted_params_before,
            "targeted_params_after": self.targeted_params_after,
            "achieved_density": self.achieved_density,
            "model_density": self.model_density,
            "seconds": self.seconds,
            "calibration": self.calibration,
            "calibration_tokens": self.calibration_tokens,
        }


@contextlib.contextmanager
def _single_threaded_linalg(device: torch.device):
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


def _calibration_windows(calibration, tokenizer, config: MPIFAConfig) -> tuple[torch.Tensor, str]:
    """(nsamples, seqlen) ids from a tensor, a list of tensors, or text / a file / a dataset name."""
    from leanformers.data.text import calibration_windows, load_text, tokenize_text

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
    import os

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


def _owl_block_densities(blocks, layout, hidden, calls, config, device) -> list[float]:
    """Per-block densities from the outlier share of each block (dense model, calibration inputs)."""
    ratios, sizes = [], []
    states = hidden
    for block in tqdm(blocks, desc="OWL outlier scan", leave=False):
        orig = next(block.parameters())
        block.to(device, torch.float32)
        outliers = total = 0
        for group in layout.groups:
            sq = None
            first = block.get_submodule(group[0])
            for s, c in zip(states, calls):
                x = _input_of(block, first, s, c, device, torch.float32)
                x = x.reshape(-1, x.shape[-1]).float()
                part = (x * x).sum(0)
                sq = part if sq is None else sq + part
            norm = sq.sqrt()
            for name in group:
                o, t = outlier_ratio(
                    linear_weight(block.get_submodule(name)).detach(), norm, config.owl_threshold
                )
                outliers += o
                total += t
        ratios.append(outliers / total)
        sizes.append(total)
        states = [run_block(block, s, c, device, torch.float32) for s, c in zip(states, calls)]
        block.to(orig.device, orig.dtype)
    return owl_densities(ratios, sizes, config.density, config.owl_lambda)


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
        A CompressionReport. The model carries ``config.quantization_config`` (quant_method "mpifa")
        listing every module's spec, so ``save_compressed`` / ``save_pretrained`` write a checkpoint that
        ``from_pretrained`` reloads after ``import leanformers``.
    """
    # Forwards, Gram products and reconstruction all in full fp32/fp64 precision (no TF32 / bf16 matmul).
    with full_precision_matmul():
        return _mpifa_compress(model, tokenizer, config, calibration, progress=progress)


def _mpifa_compress(model, tokenizer, config, calibration, *, progress):
    from leanformers.pifa.quantizer import MPIFAQuantizationConfig

    config = config or MPIFAConfig()
    start = time.perf_counter()
    device = _resolve_device(config.device)
    stream_device = torch.device("cpu") if config.offload_streams else device
    layout, blocks = resolve_layout(model, config)
    # Plain SVD without M needs no data: skip every forward pass.
    need_stats = config.init == "whiten" or config.steps > 0 or config.owl
    if need_stats:
        windows, calib_label = _calibration_windows(calibration, tokenizer, config)
    else:
        windows, calib_label = torch.empty(0, 0, dtype=torch.long), "none (plain SVD)"
    batches = list(windows.split(config.batch_size))
    prefix = _block_prefix(model, blocks)
    report = CompressionReport(calibration=calib_label, calibration_tokens=windows.numel())
    report.model_params_before = sum(p.numel() for p in model.parameters())

    was_training = model.training
    model.eval()
    # Everything but the blocks goes to the compute device; blocks move one at a time.
    block_homes = [(next(b.parameters()).device, next(b.parameters()).dtype) for b in blocks]
    _move_except(model, blocks, device)
    hidden, calls = (
        capture_block_inputs(model, blocks, batches, stream_device=stream_device) if need_stats else ([], [])
    )
    if not all(torch.isfinite(h).all() for h in hidden):
        raise FloatingPointError(
            "block 0: non-finite activations at the input of the first block (embeddings); load the model "
            "in float32 (--dtype float32) or check the checkpoint"
        )

    # Densities and ranks of every targeted module, decided before any block is touched.
    shapes, block_density = {}, {}
    for i, block in enumerate(blocks):
        for name in layout.modules:
            shapes[f"{i}.{name}"] = tuple(linear_weight(block.get_submodule(name)).shape)
    densities = {k: config.density for k in shapes}
    if config.attn_density is not None:
        attn = {k for k in shapes if k.split(".", 1)[1] in layout.attention}
        d_mlp = solve_mlp_density(
            [shapes[k] for k in attn],
            [shapes[k] for k in shapes if k not in attn],
            config.density,
            config.attn_density,
        )
        densities = {k: (config.attn_density if k in attn else d_mlp) for k in shapes}
    if config.owl:
        per_block = _owl_block_densities(blocks, layout, hidden, calls, config, device)
        densities = {k: per_block[int(k.split(".", 1)[0])] for k in shapes}
        block_density = dict(enumerate(per_block))
    ranks = module_ranks(
        shapes, densities, kind=config.output, rank_multiple=config.rank_multiple, device=device
    )
    layer_cls = PIFALinear if config.output == "pifa" else LowRankLinear

    dense_states, comp_states = hidden, list(hidden)
    need_dense = config.init == "whiten"
    need_cross = config.alpha > 0 and config.steps > 0
    specs: dict[str, dict] = {}
    chain_consumer = None
    if (
        config.output == "pifa"
        and config.form == "auto"
        and config.scatter_free_mlp
        and layout.mlp_chain
        and all(p in layout.modules for p in layout.mlp_chain[0])
        and layout.mlp_chain[1] in layout.modules
    ):
        chain_consumer = layout.mlp_chain[1]
    bar = tqdm(list(enumerate(blocks)), desc="MPIFA blocks", disable=not progress)
    for i, block in bar:
        block.to(device, torch.float32)
        for name in layout.modules:
            if not torch.isfinite(linear_weight(block.get_submodule(name))).all():
                raise FloatingPointError(
                    f"block {i}: {name} has a non-finite weight; the checkpoint is corrupt"
                )
        # One pass of the untouched block serves the dense stream: its outputs (the next block's dense
        # inputs) and the dense inputs of every group.
        try:
            next_dense, dense_inputs = (
                run_block_capturing(
                    block, dense_states, calls, [g[0] for g in layout.groups], device, torch.float32
                )
                if need_stats
                else ([], {})
            )
        except FloatingPointError as exc:
            raise FloatingPointError(
                f"block {i}: non-finite activations in the dense model ({exc}); load the model in float32 "
                "(--dtype float32) or check the calibration text"
            ) from exc
        for group in layout.groups:
            try:
                stats = (
                    group_input_stats(
                        dense_inputs.pop(group[0]),
                        block,
                        group[0],
                        comp_states,
                        calls,
                        device=device,
                        dtype=torch.float32,
                        need_cross=need_cross,
                        need_dense=need_dense,
                    )
                    if need_stats
                    else None
                )
            except FloatingPointError as exc:
                raise FloatingPointError(
                    f"block {i}: {exc}. The model produces inf/NaN on the calibration data; load it in "
                    "float32 (--dtype float32) or check the calibration text"
                ) from exc
            with _single_threaded_linalg(device):
                L = cholesky_with_damping(stats.S) if need_dense else None
            for name in group:
                t0 = time.perf_counter()
                key = f"{i}.{name}"
                module = block.get_submodule(name)
                W = linear_weight(module).detach()
                bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
                kwargs = (
                    {"form": "column" if name == chain_consumer else config.form}
                    if config.output == "pifa"
                    else {}
                )
                with _single_threaded_linalg(device):
                    U, V = reconstruct(
                        W,
                        ranks[key],
                        stats,
                        init=config.init,
                        alpha=config.alpha,
                        steps=config.steps,
                        damping=config.damping,
                        L=L,
                    )
                    new = layer_cls.from_factors(U.float(), V.float(), bias, dtype=torch.float32, **kwargs)
                if not all(torch.isfinite(p).all() for p in new.parameters()):
                    raise FloatingPointError(f"block {i} {name}: non-finite factors after reconstruction")
                block.set_submodule(name, new.to(device))
                full = f"{prefix}.{i}.{name}" if prefix else f"{i}.{name}"
                m, n = W.shape
                report.modules.append(
                    ModuleReport(
                        full,
                        m,
                        n,
                        new.rank,
                        config.output,
                        m * n,
                        new.num_parameters,
                        densities[key],
                        time.perf_counter() - t0,
                    )
                )
            del stats
        if chain_consumer is not None:
            # Function-preserving channel reorder: gate/up emit in down's pivot-first order.
            emit_in_order_(
                [block.get_submodule(p) for p in layout.mlp_chain[0]], block.get_submodule(chain_consumer)
            )
        for name in layout.modules:
            full = f"{prefix}.{i}.{name}" if prefix else f"{i}.{name}"
            specs[full] = block.get_submodule(name).spec()
        dense_states = next_dense
        try:
            comp_states = (
                [run_block(block, s, c, device, torch.float32) for s, c in zip(comp_states, calls)]
                if need_stats
                else []
            )
        except FloatingPointError as exc:
            raise FloatingPointError(
                f"block {i}: non-finite activations after the block ({exc}); load the model in float32 "
                "(--dtype float32) or check the calibration text"
            ) from exc
        home_device, home_dtype = block_homes[i]
        block.to(home_device, home_dtype)
        bar.set_postfix(
            density=f"{sum(m.stored_params for m in report.modules) / max(1, sum(m.dense_params for m in report.modules)):.3f}"
        )
    model.train(was_training)

    report.model_params_after = sum(p.numel() for p in model.parameters())
    report.seconds = time.perf_counter() - start
    from leanformers import __version__

    model.config.quantization_config = MPIFAQuantizationConfig(
        modules=specs,
        density=config.density,
        alpha=config.alpha,
        steps=config.steps,
        calibration=calib_label,
        leanformers_version=__version__,
        extra={
            "init": config.init,
            "output": config.output,
            "attn_density": config.attn_density,
            "owl": config.owl,
            "block_densities": block_density or None,
            "rank_multiple": config.rank_multiple or default_rank_multiple(device),
            "achieved_density": report.achieved_density,
        },
    )
    return report


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
