"""Which adapter state ``save_pretrained`` writes (compact or full) and how a compact one is loaded back.

- *full*: every factor (U, S, Vh, active vectors, indices, counters): what a resumable Trainer checkpoint
  needs; reloads onto any base model of the same architecture (nothing is taken from its weights).
- *compact*: per layer, what differs from the SVD of the base weight, or the effective weight when that is
  smaller (:mod:`leanformers.sst.compact`); reloads onto the base model it was trained from, whose SVD it
  recomputes. At most the bytes of the targeted base weights.

``SSTConfig.save_format`` chooses: ``"auto"`` writes compact adapters in fine-tuning mode and full ones in
pretraining mode; checkpoints written while ``SSTCallback`` drives a Trainer run are always full.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from leanformers.sst.compact import (
    DIGEST_KEY,
    RELOAD_TOLERANCE,
    SPECTRAL_ONLY_KEYS,
    TOUCHED_KEYS,
    compact_entry,
    entry_bytes,
    restore_spectral,
)
from leanformers.sst.layer import SSTLayer, find_sst_layers
from leanformers.sst.linear import DENSE_WEIGHT_KEY
from leanformers.sst.spectral import thin_svd, thin_svds

logger = logging.getLogger(__name__)

__all__ = ["compact_state_dict", "expand_compact_state_dict", "set_trainer_checkpoints", "writes_compact"]

STATE_NAMES = SSTLayer.adapter_layer_names + SSTLayer.other_param_names
PEFT_PREFIX = "base_model.model."


def set_trainer_checkpoints(model: nn.Module, enabled: bool) -> None:
    """Mark the SST layers of ``model`` as inside a Trainer run: every save writes the full state."""
    for layer in find_sst_layers(model).values():
        layer.sst_watch.trainer_checkpoints = enabled


def writes_compact(model: nn.Module, config) -> bool:
    """Whether ``save_pretrained`` of ``model`` writes a compact adapter now (see the module docstring)."""
    if config.save_format == "full":
        return False
    layers = find_sst_layers(model).values()
    if any(layer.sst_watch.trainer_checkpoints for layer in layers):
        return False
    return config.save_format == "compact" or config.mode == "finetune"


def compact_state_dict(
    model: nn.Module, adapter: str, state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Replace the full per-layer SST entries of ``state`` (keys with the adapter name) by compact ones."""
    out = dict(state)
    spectral = dense = touched = 0
    for name, layer in find_sst_layers(model).items():
        name = name.removeprefix("_fsdp_wrapped_module.")
        keys = {s: f"{name}.{s}.{adapter}" for s in STATE_NAMES}
        if not all(key in out for key in keys.values()):
            continue  # another rank's part of a sharded save, or not this adapter
        full = {s: out.pop(key) for s, key in keys.items()}
        entry = compact_entry(full, layer.base_dtype, DENSE_WEIGHT_KEY)
        out.update({f"{name}.{s}.{adapter}": t for s, t in entry.items()})
        if DENSE_WEIGHT_KEY in entry:
            dense += 1
        else:
            spectral += 1
            touched += entry[TOUCHED_KEYS[0]].shape[1]
    logger.info(
        "SST adapter: compact state: %d layers as spectral deltas (S, active pairs, %d touched pairs in all), "
        "%d as effective weights; %.1f MB",
        spectral,
        touched,
        dense,
        entry_bytes({k: v for k, v in out.items() if isinstance(v, torch.Tensor)}) / 1e6,
    )
    return out


def _checkpoint_prefix(state: dict[str, torch.Tensor], name: str) -> str | None:
    for candidate in (name, PEFT_PREFIX + name):
        if any(f"{candidate}.{key}" in state for key in (*TOUCHED_KEYS, DENSE_WEIGHT_KEY)):
            return candidate
    return None


def expand_compact_state_dict(
    model: nn.Module, adapter: str, state: dict[str, torch.Tensor], trainable: bool
) -> dict[str, torch.Tensor]:
    """Turn the compact entries of a checkpoint state dict (keys without the adapter name) into full ones.

    Spectral layers: the SVDs of the base weights (several at a time) are completed with the saved pairs
    straight into the layers' own U / Vh buffers, checked against the saved digest, and the state dict then
    refers to those buffers. Dense layers: their factors restart from the SVD of the saved effective weight
    (as after a round end) and the saved weight stays pinned for the no-gradient forward, so that outputs
    are the saved model's; ``trainable`` adapters warn that training continues from that SVD.
    """
    state = dict(state)
    spectral, dense = [], []
    for name, layer in find_sst_layers(model).items():
        prefix = _checkpoint_prefix(state, name)
        if prefix is None:
            continue
        (dense if f"{prefix}.{DENSE_WEIGHT_KEY}" in state else spectral).append((prefix, layer))
    bases = [layer.dense_base_weight() for _, layer in spectral]
    errors: dict[str, float] = {}
    for (prefix, layer), (U0, _, Vh0) in zip(spectral, thin_svds(bases), strict=True):
        entry = {key: state.pop(f"{prefix}.{key}") for key in SPECTRAL_ONLY_KEYS}
        entry.update({key: state[f"{prefix}.{key}"] for key in STATE_NAMES if f"{prefix}.{key}" in state})
        U, Vh = layer.sst_U[adapter], layer.sst_Vh[adapter]
        error = restore_spectral(entry, U, Vh, U0.to(U.dtype), Vh0.to(Vh.dtype))
        if error is not None:
            errors[prefix] = error
        state[f"{prefix}.sst_U"], state[f"{prefix}.sst_Vh"] = U, Vh
    _judge_reload(errors, model, layers=[layer for _, layer in spectral])
    for prefix, layer in dense:
        weight = state[f"{prefix}.{DENSE_WEIGHT_KEY}"]
        layer.set_factors_(adapter, *thin_svd(weight))
        layer.sst_touched[adapter].fill_(1)
        for key in STATE_NAMES:
            state[f"{prefix}.{key}"] = getattr(layer, key)[adapter]
    if dense and trainable:
        warnings.warn(
            f"{len(dense)} SST layers of this compact adapter were stored as their effective weights (they "
            "passed a re-SVD): training continues from the SVD of those weights, as after a round end, not from "
            "the exact saved state. For an exact resume, resume from a Trainer checkpoint or save with "
            "SSTConfig(save_format='full').",
            UserWarning,
            stacklevel=4,
        )
    return state


def _judge_reload(errors: dict[str, float], model: nn.Module, layers: list) -> None:
    """Raise when a reloaded weight is too far from the saved one; warn once when it is close, not exact."""
    if not errors:
        return
    worst = max(errors, key=errors.get)
    if errors[worst] > RELOAD_TOLERANCE:
        base = getattr(getattr(model, "config", None), "_name_or_path", "") or "the base model given"
        raise ValueError(
            f"this compact SST adapter does not match the base model it is loaded onto: the effective weight of "
            f"{worst} differs from the saved one by {errors[worst]:.2e} (relative; {len(errors)} layers differ). "
            f"A compact adapter stores only what fine-tuning changed, so it must be loaded onto the exact base "
            f"checkpoint (and dtype) it was trained from ({base} was given; adapter_config.json names the "
            f"original in base_model_name_or_path). Load that base model, or save the adapter with "
            f"SSTConfig(save_format='full') to make it independent of the base weights."
        )
    watch = layers[0].sst_watch if layers else None
    if watch is not None and not watch.warned_inexact_reload:
        watch.warned_inexact_reload = True
        warnings.warn(
            f"compact SST adapter: the SVD of the base weights recomputed here differs in the last bits from the one "
            f"the adapter was trained with ({len(errors)} layers; another CPU, library build or device); the "
            f"effective weights match to {max(errors.values()):.1e} (relative), not bit for bit.",
            UserWarning,
            stacklevel=4,
        )


def is_compact(state: dict[str, torch.Tensor]) -> bool:
    """Whether a checkpoint state dict holds compact SST entries."""
    return any(key.endswith((f".{DIGEST_KEY}", f".{DENSE_WEIGHT_KEY}")) for key in state)
