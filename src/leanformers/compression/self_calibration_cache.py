"""The content-addressed cache of self-calibration windows (``self_calibration.self_calibration_windows``).

Windows are stored as safetensors under ``leanformers.hub.cache_dir() / "self-calibration"``, named by the
sha256 of a JSON of everything that determines them (``windows_key``: the model's weights through
``model_sha256``, the prompts, the settings, the shape, the seed, the torch version), written atomically and
served only when their recorded sha256 checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from itertools import chain
from pathlib import Path

import torch

__all__ = ["cache_path", "model_sha256", "read_windows", "windows_key", "write_windows"]


def windows_key(material: dict) -> str:
    """The cache key of windows determined by ``material`` (JSON-serialisable): sha256 of its sorted JSON."""
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def model_sha256(model) -> str:
    """sha256 of a model's parameters and buffers (names, dtypes, shapes, bytes), shared weights once."""
    digest = hashlib.sha256()
    named = chain(model.named_parameters(), model.named_buffers())
    for name, tensor in sorted(named, key=lambda item: item[0]):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_path(key: str) -> Path:
    """Where the windows of ``key`` are stored: ``leanformers.hub.cache_dir() / "self-calibration"``."""
    from leanformers.hub import cache_dir

    return cache_dir() / "self-calibration" / f"{key}.safetensors"


def read_windows(path: Path, nsamples: int, seqlen: int) -> torch.Tensor | None:
    """The (nsamples, seqlen) windows stored at ``path``, or None when unreadable, of another shape, or not
    matching the sha256 recorded with them."""
    from safetensors import SafetensorError, safe_open

    from leanformers.data.text import windows_sha256

    try:
        with safe_open(str(path), "pt") as f:
            windows, recorded = f.get_tensor("windows"), (f.metadata() or {}).get("windows_sha256")
    except (OSError, ValueError, RuntimeError, SafetensorError):
        return None  # unreadable (a partial copy, another format): generate again
    if tuple(windows.shape) != (nsamples, seqlen) or windows_sha256(windows) != recorded:
        return None
    return windows


def write_windows(path: Path, windows: torch.Tensor, key_material: dict) -> None:
    """Store ``windows`` at ``path`` with their sha256 and key material, atomically."""
    from safetensors.torch import save_file

    from leanformers.data.text import windows_sha256

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        metadata = {
            "windows_sha256": windows_sha256(windows),
            "key": json.dumps(key_material, sort_keys=True),
        }
        save_file({"windows": windows.contiguous()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # like the other cache files (mkstemp creates 0600)
        os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
