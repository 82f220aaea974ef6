"""Small FSDP2 (``torch.distributed.fsdp.fully_shard``) helpers shared by the training-time methods.

Under FSDP2 every parameter of a sharded module is a ``DTensor`` outside forward/backward (its
placements are read from the tensor, never assumed); buffers stay plain, replicated tensors. A method
that needs a whole matrix (SST's re-SVD and re-sampling) gathers it with :func:`gather_full`, computes
the same result on every rank, and writes it back into each rank's shard with :func:`write_full_`.
Both are no-ops on plain tensors, so the same code runs in one process, under DDP and under FSDP2.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

try:
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - torch builds without distributed support
    FSDPModule = FullyShardedDataParallel = DTensor = None
    distribute_tensor = None

__all__ = [
    "gather_full",
    "gathered",
    "is_dtensor",
    "is_fsdp1_model",
    "is_fsdp2_model",
    "save_full_model",
    "write_full_",
]


def is_dtensor(tensor: torch.Tensor) -> bool:
    """True for a ``DTensor`` (an FSDP2-sharded parameter outside forward/backward)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def is_fsdp2_model(model: nn.Module) -> bool:
    """True when ``fully_shard`` (FSDP2) was applied to ``model`` or one of its submodules."""
    return FSDPModule is not None and any(isinstance(m, FSDPModule) for m in model.modules())


def is_fsdp1_model(model: nn.Module) -> bool:
    """True when ``model`` holds an FSDP1 ``FullyShardedDataParallel`` wrapper (flattened parameters)."""
    return FullyShardedDataParallel is not None and any(
        isinstance(m, FullyShardedDataParallel) for m in model.modules()
    )


@torch.no_grad()
def gather_full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a gathered plain copy of a ``DTensor``, else ``tensor`` itself (no copy).

    Gathering is a collective: every rank of the tensor's mesh must call it, in the same order.
    """
    if is_dtensor(tensor):
        return tensor.full_tensor()
    return tensor


@torch.no_grad()
def write_full_(tensor: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """Write ``full`` (the whole value, identical on every rank) into ``tensor`` in place.

    For a ``DTensor`` only this rank's shard is written (cut from ``full`` locally with the tensor's own
    mesh and placements: no communication); for a plain tensor the whole value is copied (nothing
    happens when ``full`` is ``tensor``). The tensor object stays the same, so an optimizer holding it
    keeps its state.
    """
    if is_dtensor(tensor):
        local = distribute_tensor(
            full.detach().to(tensor.dtype), tensor.device_mesh, tensor.placements, src_data_rank=None
        ).to_local()
        tensor.to_local().copy_(local)
    elif full is not tensor:
        tensor.copy_(full)
    return tensor


@contextmanager
def gathered(*tensors: torch.Tensor) -> Iterator[list[torch.Tensor]]:
    """Full copies of ``tensors`` to modify in place; on exit they are written back (:func:`write_full_`).

    Plain tensors are yielded as they are (changes land directly). Collective for DTensors: every rank
    enters with the same tensors in the same order.
    """
    full = [gather_full(t) for t in tensors]
    yield full
    for t, f in zip(tensors, full):
        if f is not t:
            write_full_(t, f)


def save_full_model(trainer, output_dir) -> None:
    """``trainer.save_model(output_dir)`` that writes the whole model under FSDP2 whatever the checkpoint type.

    transformers 5.x ``Trainer.save_model`` writes nothing for FSDP unless ``state_dict_type`` is
    ``FULL_STATE_DICT``, so a run with sharded checkpoints would end without a loadable model. Under FSDP2
    the full state dict is gathered here (``get_model_state_dict(full_state_dict=True)``: a collective, whole
    tensors on every rank, offloaded to CPU) and the main process saves it with ``save_pretrained`` (a PEFT
    model writes its adapter). Call it on every rank.
    """
    model = trainer.model
    if not is_fsdp2_model(model):
        trainer.save_model(str(output_dir))
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainer.args.should_save:
        unwrapped = trainer.accelerator.unwrap_model(model)
        unwrapped.save_pretrained(str(output_dir), state_dict=state_dict, safe_serialization=True)
