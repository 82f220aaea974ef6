"""Which sharded backend a run uses, and the one policy SST and CHTss apply to it.

Both methods act on whole matrices (or on per-element state laid out like them) between optimizer
steps. They run on one device, under DDP and under PyTorch FSDP2 (``fully_shard``: DTensor shards
with an (out, in) layout per parameter). They refuse:

- DeepSpeed ZeRO: fp32 master weights and partitioned optimizer state the methods never reach;
- FSDP1 (``FullyShardedDataParallel``): one flat parameter per unit, no per-matrix layout;
- DTensor parameters outside FSDP2 (e.g. tensor parallelism): untested layouts.

:func:`check_sharding` raises one message per backend, naming the method, why, and FSDP2 as the fix.
"""

from __future__ import annotations

import logging

from torch import nn

from leanformers.training.fsdp import is_fsdp2_model

try:  # accelerate is optional for plain-PyTorch loops
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType
except ImportError:  # pragma: no cover - accelerate is installed with transformers' Trainer extras
    AcceleratorState = DistributedType = None
try:
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    _FSDP_TYPES: tuple[type, ...] = (FSDPModule, FullyShardedDataParallel)
except ImportError:  # pragma: no cover - torch builds without distributed support
    _FSDP_TYPES = ()
try:
    from torch.distributed.tensor import DTensor

    _DTENSOR_TYPES: tuple[type, ...] = (DTensor,)
except ImportError:  # pragma: no cover - torch builds without distributed support
    _DTENSOR_TYPES = ()

__all__ = [
    "SUPPORTED_SHARDING",
    "check_sharding",
    "requested_fsdp_version",
    "sharded_training_backend",
    "unwrap_model",
    "warn_if_fsdp2_ignored",
]

logger = logging.getLogger(__name__)

SUPPORTED_SHARDING = (None, "FSDP2")  # one device, DDP, FSDP2
_WHAT = {
    "DeepSpeed": "DeepSpeed ZeRO",
    "FSDP": "FSDP1 (FullyShardedDataParallel, flattened parameters)",
    "DTensor": "DTensor parameters outside FSDP2 (e.g. tensor parallelism)",
}
_WHY = {
    "DeepSpeed": "ZeRO keeps fp32 master weights and partitioned optimizer state that the method never "
    "reaches (stage 3 also partitions the weights)",
    "FSDP": "FSDP1 flattens each unit's parameters into one FlatParameter, so a matrix and its optimizer "
    "moments have no (out, in) layout",
    "DTensor": "the method cannot reach the gradients and layouts of such shards",
}
_FIX = {
    "DeepSpeed": "Use PyTorch FSDP2 instead: TrainingArguments(fsdp=True, fsdp_config={'fsdp_version': 2}) or "
    "accelerate launch --config_file recipes/accelerate/fsdp2.yaml (docs/scaling.md), or DDP / one device",
    "FSDP": "Use FSDP2: fsdp_config={'fsdp_version': 2} (the Trainer's default) or an accelerate config with "
    "fsdp_version: 2 (recipes/accelerate/fsdp2.yaml, docs/scaling.md)",
    "DTensor": "Use FSDP2 (fully_shard: recipes/accelerate/fsdp2.yaml), DDP or one device",
}


def _qualname(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__name__}"


def requested_fsdp_version(args) -> int | None:
    """The FSDP version asked for by the Trainer's arguments or accelerate's launch state, else None.

    ``TrainingArguments`` resolves its default in ``fsdp_plugin_args`` (what the Trainer hands to
    accelerate); a plain ``fsdp_config`` is read as transformers 5 reads it (``version``, default 2).
    """
    if args is not None and getattr(args, "fsdp", None):
        plugin = getattr(args, "fsdp_plugin_args", None)
        if isinstance(plugin, dict) and "fsdp_version" in plugin:
            return int(plugin["fsdp_version"])
        config = getattr(args, "fsdp_config", None) or {}
        return int(config.get("version", config.get("fsdp_version", 2)))
    if AcceleratorState is not None:
        plugin = (AcceleratorState._shared_state or {}).get("fsdp_plugin")
        if plugin is not None:
            return int(getattr(plugin, "fsdp_version", 1))
    return None


def _backend_of_args(args) -> str | None:
    if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None) is not None:
        return "DeepSpeed"
    if not getattr(args, "fsdp", None):
        return None
    return "FSDP2" if requested_fsdp_version(args) == 2 else "FSDP"


def _backend_of_accelerate() -> str | None:
    if AcceleratorState is None:
        return None
    shared = AcceleratorState._shared_state or {}
    if shared.get("distributed_type") == DistributedType.DEEPSPEED:
        return "DeepSpeed"
    version = requested_fsdp_version(None)
    if version is None:
        return None
    return "FSDP2" if version == 2 else "FSDP"


def _backend_of_model(model: nn.Module) -> str | None:
    for module in model.modules():
        if _qualname(module).startswith("deepspeed."):
            return "DeepSpeed"
        if _FSDP_TYPES and isinstance(module, _FSDP_TYPES[0]):  # FSDPModule: fully_shard
            return "FSDP2"
        if isinstance(module, _FSDP_TYPES):
            return "FSDP"
    for param in model.parameters():
        if hasattr(param, "ds_id"):  # ZeRO-3 partitioned parameter
            return "DeepSpeed"
        if isinstance(param, _DTENSOR_TYPES):
            return "DTensor"
    return None


def _backend_of_optimizer(optimizer) -> str | None:
    for _ in range(8):  # the wrapper chain (accelerate, DeepSpeed), bounded
        if optimizer is None:
            return None
        if "deepspeed" in _qualname(optimizer).lower():  # deepspeed.* or accelerate's DeepSpeed wrappers
            return "DeepSpeed"
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def sharded_training_backend(args=None, model=None, optimizer=None) -> str | None:
    """Name the backend when parameters or optimizer state are sharded or owned by one, else None.

    Looks at what a callback or a custom loop can see: ``TrainingArguments`` (``fsdp``,
    ``deepspeed``), accelerate's process state (``accelerate launch`` with an FSDP / DeepSpeed
    config), the model's modules and parameters (FSDP1 / FSDP2 wrappers, DTensor shards, ZeRO-3
    ``ds_id``), and the optimizer's wrapper chain (DeepSpeed ZeRO optimizers). Returns "DeepSpeed",
    "FSDP" (FSDP1: flat parameters), "FSDP2" (``fully_shard``, or ``fsdp_version`` 2 requested) or
    "DTensor" (DTensor parameters outside FSDP2).
    """
    return (
        (_backend_of_args(args) if args is not None else None)
        or _backend_of_accelerate()
        or (_backend_of_model(model) if model is not None else None)
        or _backend_of_optimizer(optimizer)
    )


def check_sharding(method: str, args=None, model: nn.Module | None = None, optimizer=None) -> None:
    """Refuse DeepSpeed ZeRO, FSDP1 and DTensor-outside-FSDP2 training of ``method`` ("SST", "CHTss").

    Args:
        method: the method's name in the message.
        args: ``transformers.TrainingArguments`` (``fsdp`` / ``deepspeed`` settings), optional.
        model, optimizer: as the training loop holds them (wrappers included), optional.

    Raises:
        ValueError: "<method> does not support <backend>: <why>. Use ... FSDP2 ...".
    """
    backend = sharded_training_backend(args, model, optimizer)
    if backend in SUPPORTED_SHARDING:
        return
    found = ""
    if backend == "FSDP":
        version = requested_fsdp_version(args)
        found = (
            f" Found: fsdp_version={version}." if version else " Found: a FullyShardedDataParallel module."
        )
    raise ValueError(f"{method} does not support {_WHAT[backend]}: {_WHY[backend]}. {_FIX[backend]}.{found}")


def warn_if_fsdp2_ignored(method: str, args, model: nn.Module | None) -> None:
    """Warn when FSDP2 was requested but the model is not sharded (accelerate runs DDP on CPU instead)."""
    if model is None or sharded_training_backend(args=args) != "FSDP2" or is_fsdp2_model(model):
        return
    logger.warning(
        "FSDP2 was requested but the model's parameters are not sharded (accelerate ignores FSDP on CPU and "
        "trains with DDP): %s runs its DDP path, every rank holds whole weights.",
        method,
    )


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP / accelerate wrappers (``.module`` chains); the model itself otherwise."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model
