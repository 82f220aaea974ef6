"""CHTss state outside the training loop: checkpoint state, and masks that travel with the model.

- Trainer checkpoints hold ``leanformers/chtss.safetensors``: bit-packed masks, step, schedule, re-warm-up
  state (:func:`checkpoint_tensors`, :func:`masks_from_checkpoint`, :func:`check_weights_inside`).
- ``model.save_pretrained(dir)`` / ``trainer.save_model(dir)`` of a model under a CHTss controller also
  writes ``dir/leanformers/chtss_masks.safetensors`` (:class:`SaveMasksWithModel`, installed on the
  model instance), so that ``load_masks(dir)`` finds them and a run started on a model loaded from
  ``dir`` continues from them (:func:`masks_saved_with`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanformers.chts.initial import target_counts
from leanformers.chts.masks import (
    MASKS_STATE_NAME,
    SparseLayer,
    load_masks,
    pack_mask,
    save_masks,
    unpack_mask,
)
from leanformers.training import load_state
from leanformers.training.fsdp import local

__all__ = [
    "STATE_NAME",
    "SaveMasksWithModel",
    "adopt_saved_masks",
    "check_weights_inside",
    "checkpoint_tensors",
    "masks_from_checkpoint",
    "masks_saved_with",
]

logger = logging.getLogger(__name__)
STATE_NAME = "chtss"  # <checkpoint>/leanformers/chtss.safetensors


def checkpoint_tensors(layers: list[SparseLayer]) -> tuple[dict[str, torch.Tensor], dict]:
    """Bit-packed masks of ``layers`` and their shapes (the tensors and ``shapes`` meta of a checkpoint)."""
    tensors = {layer.name: pack_mask(layer.mask) for layer in layers}
    return tensors, {"shapes": {layer.name: list(layer.shape) for layer in layers}}


def masks_from_checkpoint(layers: list[SparseLayer], tensors: dict, meta: dict) -> list[torch.Tensor]:
    """The (out, in) masks of ``layers`` in a checkpoint's tensors; raise naming the layers it lacks."""
    missing = [layer.name for layer in layers if layer.name not in tensors]
    if missing:
        raise ValueError(
            f"checkpoint has no CHTss mask for {missing[:5]}: was it written with other targets?"
        )
    return [unpack_mask(tensors[layer.name], tuple(meta["shapes"][layer.name])) for layer in layers]


def check_weights_inside(layers: list[SparseLayer], masks: list[torch.Tensor], source: str) -> None:
    """Raise when a weight is non-zero outside its mask: the masks belong to other weights.

    Whole weights are compared (gathered one at a time under FSDP2), so every rank decides alike.
    """
    outside = {
        layer.name: int(((layer.full_weight() != 0) & ~mask.to(local(layer.weight).device)).sum())
        for layer, mask in zip(layers, masks)
    }
    bad = {name: n for name, n in outside.items() if n}
    if bad:
        raise ValueError(
            f"the weights have non-zero entries outside {source} ({sum(bad.values())} in "
            f"{len(bad)} matrices, e.g. {dict(list(bad.items())[:3])}): the masks were written by another run "
            "or step than the weights. Resume from one complete folder (weights and leanformers/ together)."
        )


def _model_folder(model: nn.Module) -> Path | None:
    """The local folder ``from_pretrained`` read ``model`` from, or None (config-built, Hub id, ...)."""
    name = getattr(model, "name_or_path", None) or getattr(
        getattr(model, "config", None), "_name_or_path", None
    )
    if not name or not isinstance(name, (str, os.PathLike)):
        return None
    folder = Path(name)
    return folder if folder.is_dir() else None


def masks_saved_with(model: nn.Module) -> tuple[Path, dict[str, torch.Tensor]] | None:
    """``(folder, {module name: (out, in) mask})`` saved next to the weights ``model`` was loaded from, or None.

    The folder is ``model.name_or_path`` (``from_pretrained`` sets it); its masks are
    ``leanformers/chtss_masks.safetensors`` (``save_pretrained`` under a controller) or a checkpoint's
    ``leanformers/chtss.safetensors``.
    """
    folder = _model_folder(model)
    if folder is None:
        return None
    if load_state(folder, MASKS_STATE_NAME) is None and load_state(folder, STATE_NAME) is None:
        return None
    return folder, load_masks(folder)


class SaveMasksWithModel:
    """``model.save_pretrained`` that also writes the controller's masks into the folder.

    Installed as an instance attribute (the class method stays untouched): it calls the model class's
    ``save_pretrained`` and then :func:`leanformers.chts.save_masks` on the main process. It reads the
    masks through ``masks_for_saving`` (no collective: under FSDP2 only the main process saves). A deep
    copy or an unpickled model keeps a plain ``save_pretrained`` (the masks stay with the controller of
    the original model; a warning says so).

    Args:
        model: the model whose ``save_pretrained`` it replaces.
        masks_for_saving: returns ``({module name: (out, in) bool mask on CPU}, meta)``; None for a copy.
    """

    def __init__(self, model: nn.Module, masks_for_saving: Callable[[], tuple[dict, dict]] | None):
        self._model = model  # a reference cycle through the model's __dict__, which the GC collects
        self._masks = weakref.WeakMethod(masks_for_saving) if masks_for_saving is not None else None

    @classmethod
    def install(cls, model: nn.Module, masks_for_saving: Callable[[], tuple[dict, dict]]) -> None:
        if callable(getattr(type(model), "save_pretrained", None)):
            model.__dict__["save_pretrained"] = cls(model, masks_for_saving)

    @staticmethod
    def uninstall(model: nn.Module) -> None:
        if isinstance(model.__dict__.get("save_pretrained"), SaveMasksWithModel):
            del model.__dict__["save_pretrained"]

    def __call__(self, save_directory, *args, **kwargs):
        model = self._model
        result = type(model).save_pretrained(model, save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):
            return result
        source = self._masks() if self._masks is not None else None
        if source is None:
            what = (
                "a copy of a CHTss-trained model"
                if self._masks is None
                else "a model whose CHTss controller is gone"
            )
            logger.warning(
                "save_pretrained(%s) of %s writes no CHTss masks; write them with controller.save_masks(folder).",
                save_directory,
                what,
            )
            return result
        masks, meta = source()
        save_masks(save_directory, masks, meta)
        return result

    def __deepcopy__(self, memo):
        copied = memo.get(id(self._model))  # the model's copy, made before its __dict__ is copied
        return SaveMasksWithModel(copied, None) if copied is not None else self

    def __reduce__(self):
        return (SaveMasksWithModel, (self._model, None))


def adopt_saved_masks(
    config: Any, layers: list[SparseLayer], folder: Path, saved: dict[str, torch.Tensor]
) -> tuple[list[torch.Tensor], Any]:
    """The masks saved with the model as the initial topology: ``(masks per layer, config to run with)``.

    They must cover every targeted layer, hold the weights (zero outside), and have a density between
    ``final_density`` and ``initial_density``: the run then starts at their density (``initial_density``
    is replaced by it, with a warning when it differs). Anything else raises, naming
    ``CHTssConfig(masks_from_model=False)`` (draw a new topology) as the way out.
    """
    fix = "pass CHTssConfig(masks_from_model=False) to draw a new topology instead"
    missing = [layer.name for layer in layers if layer.name not in saved]
    if missing:
        raise ValueError(
            f"the CHTss masks saved with the model in {folder} have none for {missing[:5]}: {fix}."
        )
    masks = [saved[layer.name] for layer in layers]
    for layer, mask in zip(layers, masks):
        if tuple(mask.shape) != tuple(layer.shape):
            raise ValueError(
                f"{folder}: mask of {layer.name} is {tuple(mask.shape)}, the weight {layer.shape}: {fix}."
            )
    check_weights_inside(layers, masks, f"the CHTss masks saved with the model in {folder}")
    links = sum(int(m.sum()) for m in masks)
    at_initial = sum(target_counts(config, layers, config.initial_density))
    at_final = sum(target_counts(config, layers, config.final_density))
    if links == at_initial:
        return masks, config
    if not (at_final <= links < at_initial) or config.density_schedule == "em_s":
        raise ValueError(
            f"the CHTss masks saved with the model in {folder} hold {links} links, but the config starts at "
            f"{at_initial} (initial_density={config.initial_density}) and ends at {at_final} (final_density="
            f"{config.final_density}): set initial_density to their density to continue from them, or {fix}."
        )
    density = config.final_density if links == at_final else links / sum(m.numel() for m in masks)
    logger.warning(
        "CHTss continues from the masks saved with the model in %s (density %.4f), not from initial_density=%s: "
        "the density goes from there to final_density=%s. To draw a new topology instead: "
        "CHTssConfig(masks_from_model=False).",
        folder,
        density,
        config.initial_density,
        config.final_density,
    )
    return masks, dataclasses.replace(config, initial_density=density)
