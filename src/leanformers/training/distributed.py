"""Agreement across ranks: seeded generators, broadcasts from rank 0. Works without torch.distributed."""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

__all__ = [
    "all_reduce_mean_",
    "sharded_training_backend",
    "broadcast_",
    "broadcast_object",
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


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s picklable ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def _qualname(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__name__}"


def sharded_training_backend(args=None, model=None, optimizer=None) -> str | None:
    """Name the backend when parameters or optimizer state are sharded or owned by one, else None.

    Looks at what a callback or a custom loop can see: ``TrainingArguments`` (``fsdp``,
    ``deepspeed``), accelerate's process state (``accelerate launch`` with an FSDP / DeepSpeed
    config), the model's modules and parameters (FSDP1 / FSDP2 wrappers, DTensor shards, ZeRO-3
    ``ds_id``), and the optimizer's wrapper chain (DeepSpeed ZeRO optimizers). Returns "DeepSpeed",
    "FSDP" or "DTensor" (sharded parameters, e.g. tensor parallelism).
    """
    if args is not None:
        if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None) is not None:
            return "DeepSpeed"
        if getattr(args, "fsdp", None):
            return "FSDP"
    try:
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType

        kind = (AcceleratorState._shared_state or {}).get("distributed_type")
        if kind == DistributedType.DEEPSPEED:
            return "DeepSpeed"
        if kind == DistributedType.FSDP:
            return "FSDP"
    except ImportError:  # accelerate is optional for plain-PyTorch loops
        pass
    if model is not None:
        fsdp_types: tuple[type, ...] = ()
        try:
            from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

            fsdp_types = (FSDPModule, FullyShardedDataParallel)
        except ImportError:
            pass
        for module in model.modules():
            if _qualname(module).startswith("deepspeed."):
                return "DeepSpeed"
            if fsdp_types and isinstance(module, fsdp_types):
                return "FSDP"
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:
            DTensor = ()  # noqa: N806
        for param in model.parameters():
            if hasattr(param, "ds_id"):  # ZeRO-3 partitioned parameter
                return "DeepSpeed"
            if DTensor and isinstance(param, DTensor):
                return "DTensor"
    seen = 0
    while optimizer is not None and seen < 8:
        if "deepspeed" in _qualname(optimizer).lower():  # deepspeed.* or accelerate's DeepSpeed wrappers
            return "DeepSpeed"
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return None
