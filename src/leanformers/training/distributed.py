"""Agreement across ranks: seeded generators, broadcasts from rank 0. Works without torch.distributed."""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

__all__ = [
    "agree_with_rank0",
    "all_reduce_mean_",
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


@torch.no_grad()
def agree_with_rank0(tensor: torch.Tensor) -> int:
    """Overwrite ``tensor`` in place with rank 0's copy; the number of entries that differed (0 in one process).

    A guard for state every rank computes from the same inputs (seeded draws, reduced gradients): a
    non-zero count means the inputs differed across ranks.
    """
    if not is_distributed():
        return 0
    before = tensor.clone()
    broadcast_(tensor)
    return int((before != tensor).sum())
