"""Controller state (SST counters, CHTss masks, ...) inside HF Trainer checkpoint folders.

Files go to ``<checkpoint>/leanformers/<name>.safetensors`` (tensors) with a JSON string of plain
metadata in the safetensors header: no pickles.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from leanformers.training.distributed import is_main_process

__all__ = ["checkpoint_folder", "load_state", "resume_folder", "save_state"]

STATE_DIRNAME = "leanformers"


def checkpoint_folder(args, state) -> Path:
    """The folder HF Trainer just wrote for ``state.global_step`` (valid inside ``on_save``)."""
    return Path(args.output_dir) / f"checkpoint-{state.global_step}"


def resume_folder(args, state) -> Path | None:
    """In ``on_train_begin``: the checkpoint the Trainer resumed from, or None for a fresh run.

    The Trainer restores ``state.global_step`` from the checkpoint before ``on_train_begin``.
    """
    if state.global_step <= 0:
        return None
    folder = checkpoint_folder(args, state)
    return folder if folder.is_dir() else None


def save_state(
    folder: str | os.PathLike, name: str, tensors: dict[str, torch.Tensor], meta: dict
) -> Path | None:
    """Write ``tensors`` and JSON-able ``meta`` atomically (main process only; ranks hold equal state)."""
    if not is_main_process():
        return None
    out = Path(folder) / STATE_DIRNAME
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.safetensors"
    tmp = path.with_suffix(".tmp")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(tmp), metadata={"leanformers_meta": json.dumps(meta)})
    os.replace(tmp, path)
    return path


def load_state(folder: str | os.PathLike, name: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    """Read what :func:`save_state` wrote, or None when the folder holds no such state."""
    path = Path(folder) / STATE_DIRNAME / f"{name}.safetensors"
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("leanformers_meta", "{}"))
    return load_file(str(path)), meta
