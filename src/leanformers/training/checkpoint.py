"""Controller state (SST counters, CHTss masks, ...) inside HF Trainer checkpoint folders.

Files go to ``<checkpoint>/leanformers/<name>.safetensors`` (tensors) with a JSON string of plain
metadata in the safetensors header: no pickles.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from leanformers.training.distributed import is_main_process

__all__ = ["checkpoint_folder", "load_state", "resume_folder", "save_state", "trainer_resume_argument"]

STATE_DIRNAME = "leanformers"


def checkpoint_folder(args, state) -> Path:
    """The folder HF Trainer just wrote for ``state.global_step`` (valid inside ``on_save``)."""
    return Path(args.output_dir) / f"checkpoint-{state.global_step}"


def trainer_resume_argument() -> tuple[bool, str | None]:
    """``(found, resume_from_checkpoint)`` of the ``transformers.Trainer`` whose loop is running.

    Callbacks are not told which folder ``Trainer.train(resume_from_checkpoint=...)`` loaded (the
    path may be anywhere: a copied or moved checkpoint, another run's folder). The Trainer passes it,
    already resolved (``True`` becomes the last checkpoint of ``output_dir``, ``False`` becomes
    None), to ``Trainer._inner_training_loop``, which calls ``on_train_begin``; it is read from that
    frame's arguments. ``found`` is False when no Trainer loop is on the call stack.
    """
    from transformers import Trainer

    frame = sys._getframe(1)
    try:
        while frame is not None:
            if frame.f_code.co_name == "_inner_training_loop" and isinstance(
                frame.f_locals.get("self"), Trainer
            ):
                local = frame.f_locals
                if "resume_from_checkpoint" in local:
                    value = local["resume_from_checkpoint"]
                    return True, (None if value is None or value is False else os.fspath(value))
            frame = frame.f_back
        return False, None
    finally:
        del frame


def resume_folder(args, state) -> Path | None:
    """In ``on_train_begin``: the checkpoint folder the Trainer resumed from, or None for a fresh run.

    It is the folder given to ``Trainer.train(resume_from_checkpoint=...)`` wherever it lies, never a
    guess from ``output_dir``. Raises when training resumes (``state.global_step > 0``) but the folder
    cannot be known (the callback was not called from a ``transformers.Trainer`` loop).
    """
    found, path = trainer_resume_argument()
    if found:
        return Path(path) if path is not None else None
    if state.global_step <= 0:
        return None
    raise RuntimeError(
        f"training resumes at step {state.global_step} but the checkpoint folder it resumed from is unknown: "
        "on_train_begin was not called from transformers.Trainer._inner_training_loop. Call the controller's "
        "load/load_state_dict with that folder yourself."
    )


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
