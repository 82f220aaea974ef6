"""The calibration token windows of a compression run, from whatever the user passes: token ids, a
text, a file, a folder, a ``datasets`` name, or a weighted mix of sources."""

from __future__ import annotations

import hashlib
import os

import torch

from leanformers.compression.config import CompressionConfig
from leanformers.data.text import (
    calibration_windows,
    load_text,
    mixed_calibration_windows,
    source_list,
    tokenize_text,
)

__all__ = ["calibration_windows_for", "check_windows_hash", "provenance", "windows_sha256"]


def calibration_windows_for(
    calibration, tokenizer, config: CompressionConfig, needed: bool = True
) -> tuple[torch.Tensor, str]:
    """(nsamples, seqlen) ids from a tensor, a list of tensors, or text / a file / a dataset name, and
    a label; an empty (0, 0) tensor when no statistics are ``needed`` (plain SVD)."""
    if not needed:
        return torch.empty(0, 0, dtype=torch.long), "none (no statistics needed)"
    if calibration is None:
        raise ValueError(
            "this compressor needs calibration data: pass token windows, a text, a file or a dataset name"
        )
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


def windows_sha256(windows: torch.Tensor) -> str:
    """Content hash of calibration windows: sha256 of their shape and int64 token ids (little endian)."""
    ids = windows.detach().to("cpu", torch.int64).contiguous()
    digest = hashlib.sha256(f"{tuple(ids.shape)}".encode())
    digest.update(ids.numpy().astype("<i8").tobytes())
    return digest.hexdigest()


def check_windows_hash(windows: torch.Tensor, expected: str | None) -> str:
    """The windows' hash; a ValueError when a pinned ``expected`` hash (``calibration_sha256``) differs."""
    actual = windows_sha256(windows)
    if expected is not None and actual != expected.lower():
        raise ValueError(
            f"the calibration windows hash to {actual}, not the pinned calibration_sha256 {expected}: the "
            "source, its version or the window settings (nsamples, seqlen, seed, tokenizer) changed"
        )
    return actual


def provenance(model, calibration, report) -> dict:
    """Where a compressed model comes from: the source and its revision (Hub commit or file sha256), the
    calibration as given and the hash of its windows, and the versions that made it."""
    import transformers

    from leanformers._version import __version__
    from leanformers.hub import source_revision

    spec = (
        calibration
        if isinstance(calibration, str)
        else (None if calibration is None else "token windows given in Python")
    )
    return {
        **source_revision(model),
        "calibration": spec,
        "calibration_sha256": report.calibration_sha256,
        "versions": {
            "leanformers": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
