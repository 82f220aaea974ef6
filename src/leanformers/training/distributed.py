"""Agreement across ranks: seeded generators, broadcasts from rank 0. Works without torch.distributed."""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

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
    "all_reduce_mean_",
    "sharded_training_backend",
    "broadcast_",
    "is_distributed",
    "is_main_process",
    "seeded_generator",
    "world_size",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return not is_distributed() or dist.get_rank() == 0


def seeded_generator(seed: int, *keys: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator whose seed depends only on (seed, *keys), e.g. (seed, iteration, layer index).

    Every rank draws the same numbers without communication, and a resumed run draws the same
    numbers as an uninterrupted one.
    """
    digest = hashlib.sha256(repr((int(seed),) + tuple(keys)).encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


@torch.no_grad()
def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank ``src``'s copy (no-op outside torch.distributed)."""
    if not is_distributed():
        return tensor
    backend = dist.get_backend()
    if backend == "nccl" and tensor.device.type != "cuda":
        tmp = tensor.cuda()
        dist.broadcast(tmp, src)
        tensor.copy_(tmp.to(tensor.device))
    else:
        dist.broadcast(tensor, src)
    return tensor


@torch.no_grad()
def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Replace ``tensor`` in place by its mean over all ranks (no-op outside torch.distributed).

    SUM then divide: gloo has no AVG. Every rank ends with the same bits.
    """
    if not is_distributed():
        return tensor
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        tmp = tensor.cuda()
        dist.all_reduce(tmp)
        tensor.copy_(tmp.to(tensor.device))
    else:
        dist.all_reduce(tensor)
    return tensor.div_(world_size())


def _qualname(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__name__}"


def _backend_of_args(args) -> str | None:
    if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None) is not None:
        return "DeepSpeed"
    if not getattr(args, "fsdp", None):
        return None
    # TrainingArguments normalises fsdp_config's "fsdp_version" to "version"; both are read.
    config = getattr(args, "fsdp_config", None) or {}
    version = config.get("version", config.get("fsdp_version", 1))
    return "FSDP2" if str(version) == "2" else "FSDP"


def _backend_of_accelerate() -> str | None:
    if AcceleratorState is None:  # accelerate is optional for plain-PyTorch loops
        return None
    shared = AcceleratorState._shared_state or {}
    kind = shared.get("distributed_type")
    if kind == DistributedType.FSDP:
        return "FSDP2" if getattr(shared.get("fsdp_plugin"), "fsdp_version", 1) == 2 else "FSDP"
    return {DistributedType.DEEPSPEED: "DeepSpeed"}.get(kind)


def _backend_of_model(model: torch.nn.Module) -> str | None:
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
    "FSDP" (FSDP1, ``FullyShardedDataParallel``: flat parameters), "FSDP2" (``fully_shard``:
    DTensor parameters, or ``fsdp_version`` 2 requested) or "DTensor" (DTensor parameters outside
    FSDP2, e.g. tensor parallelism).
    """
    return (
        (_backend_of_args(args) if args is not None else None)
        or _backend_of_accelerate()
        or (_backend_of_model(model) if model is not None else None)
        or _backend_of_optimizer(optimizer)
    )
