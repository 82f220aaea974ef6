"""The calibration token windows of a compression run, from whatever the user passes: token ids, a
text, a file, a folder, a ``datasets`` name, ``"self"`` (text the model generates,
self_calibration.py), or a weighted mix of those."""

from __future__ import annotations

import os

import torch

from leanformers.compression.config import CompressionConfig
from leanformers.compression.self_calibration import self_calibration_windows
from leanformers.data.text import (
    SELF_SOURCE,
    calibration_windows,
    load_text,
    source_list,
    tokenize_text,
    window_counts,
    windows_sha256,
)

__all__ = ["calibration_windows_for", "check_windows_hash", "provenance", "windows_sha256"]


def _given_windows(calibration) -> tuple[torch.Tensor, str] | None:
    """Token windows passed as a tensor or a list of tensors, or None when ``calibration`` is not that."""
    if isinstance(calibration, torch.Tensor):
        windows = calibration if calibration.dim() == 2 else calibration[None]
    elif isinstance(calibration, (list, tuple)) and calibration and isinstance(calibration[0], torch.Tensor):
        windows = torch.stack([c.reshape(-1) for c in calibration])
    else:
        return None
    return windows.long(), f"{windows.shape[0]} x {windows.shape[1]} given token windows"


def _self_windows(model, tokenizer, nsamples: int, seqlen: int, seed: int, progress: bool):
    if model is None:
        raise ValueError(
            "calibration 'self' generates its text with the whole model being compressed, and streaming "
            "(compress_pretrained, --stream) holds one block at a time: calibrate on a text source instead "
            "(--calib FILE, a folder or a mix), or drop --stream and compress in memory"
        )
    return self_calibration_windows(model, tokenizer, nsamples, seqlen, seed, progress=progress)


def _mixed_windows(
    mix, tokenizer, config: CompressionConfig, model, progress: bool
) -> tuple[torch.Tensor, str]:
    """Source i of the mix gets its share of the windows (``window_counts``), drawn with seed + i."""
    counts = window_counts([w for _, w in mix], config.nsamples)
    parts = []
    for i, ((src, _), count) in enumerate(zip(mix, counts)):
        if src == SELF_SOURCE:
            parts.append(_self_windows(model, tokenizer, count, config.seqlen, config.seed + i, progress)[0])
            continue
        if tokenizer is None:
            raise ValueError(f"a tokenizer is needed to calibrate on text ({src!r} in the mix)")
        ids = tokenize_text(load_text(src), tokenizer)
        parts.append(calibration_windows(ids, count, config.seqlen, config.seed + i))
    shares = ", ".join(f"{os.path.basename(src.rstrip('/')) or src} x{w:g}" for src, w in mix)
    label = f"mix of {shares}: {config.nsamples} x {config.seqlen} tokens, seed {config.seed}"
    return torch.cat(parts), label


def calibration_windows_for(
    calibration,
    tokenizer,
    config: CompressionConfig,
    needed: bool = True,
    model=None,
    progress: bool = True,
) -> tuple[torch.Tensor, str]:
    """(nsamples, seqlen) ids from a tensor, a list of tensors, or text / a file / a dataset name /
    ``"self"`` / a mix, and a label; an empty (0, 0) tensor when no statistics are ``needed`` (plain SVD).

    ``"self"`` (alone or in a mix) has ``model`` generate its windows (self_calibration.py); without a
    model (streaming) it is refused with the alternatives."""
    if not needed:
        return torch.empty(0, 0, dtype=torch.long), "none (no statistics needed)"
    if calibration is None:
        raise ValueError(
            "this compressor needs calibration data: pass token windows, a text, a file, a dataset name "
            "or 'self' (the model writes its own)"
        )
    given = _given_windows(calibration)
    if given is not None:
        return given
    if isinstance(calibration, str) and calibration.strip() == SELF_SOURCE:
        c = config
        return _self_windows(model, tokenizer, c.nsamples, c.seqlen, c.seed, progress)
    mix = source_list(calibration)
    if mix is not None:
        return _mixed_windows(mix, tokenizer, config, model, progress)
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to calibrate on text")
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
