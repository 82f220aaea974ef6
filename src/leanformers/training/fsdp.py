"""Small helpers for methods that act on whole matrices under PyTorch FSDP2 (``fully_shard``).

Under FSDP2 every parameter is a ``DTensor``: each rank holds a shard (``to_local()``) laid out by
the parameter's ``device_mesh`` and ``placements`` (``Shard(0)`` for FSDP2: rows split across ranks,
torch.chunk sizes, the last ranks may hold fewer rows). A method that needs a whole matrix (a
topology update, a re-SVD) gathers it (:func:`gather_full`), computes the same result on every rank
from the same inputs, and writes its rank's part back (:func:`shard_like`, :func:`write_full_`).
Per-element state of the same shape (masks, optimizer moments) is kept as local shards laid out
like the parameter; :func:`local` gives the shard of any tensor, plain tensors pass through.

Every function works on plain tensors too (no-ops / identities), so callers need no branches. The
gathering functions are collectives: every rank of the mesh must call them in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

try:
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - torch builds without distributed support
    FSDPModule = FullyShardedDataParallel = DTensor = distribute_tensor = None

__all__ = [
    "gather_full",
    "gathered",
    "is_dtensor",
    "is_fsdp1_model",
    "is_fsdp2_model",
    "local",
    "queue_after_backward",
    "save_full_model",
    "shard_like",
    "write_full_",
]


def is_dtensor(tensor) -> bool:
    """True for a ``DTensor`` (FSDP2 parameters, their gradients and optimizer moments)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def is_fsdp2_model(model: nn.Module) -> bool:
    """True when ``model`` or one of its submodules was wrapped by ``fully_shard`` (FSDP2)."""
    return FSDPModule is not None and any(isinstance(m, FSDPModule) for m in model.modules())


def is_fsdp1_model(model: nn.Module) -> bool:
    """True when ``model`` holds an FSDP1 ``FullyShardedDataParallel`` wrapper (flattened parameters)."""
    return FullyShardedDataParallel is not None and any(
        isinstance(m, FullyShardedDataParallel) for m in model.modules()
    )


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the storage itself: in-place writes reach the DTensor), else ``tensor``."""
    if not is_dtensor(tensor):
        return tensor
    with torch.no_grad():  # to_local() returns the local tensor itself (no autograd view)
        return tensor.to_local()


def gather_full(tensor: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """The whole tensor, identical on every rank (collective).

    Args:
        tensor: a DTensor, or a local shard laid out like ``like`` (e.g. a mask shard), or a plain
            tensor (returned as is when ``like`` is not a DTensor).
        like: the DTensor whose mesh, placements and global shape ``tensor``'s shard follows.

    Bool tensors travel as uint8 (not every backend reduces bool).
    """
    if is_dtensor(tensor):
        like, tensor = tensor, local(tensor)
    if like is None or not is_dtensor(like):
        return tensor
    is_bool = tensor.dtype == torch.bool
    shard = tensor.view(torch.uint8) if is_bool else tensor
    full = DTensor.from_local(
        shard, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    ).full_tensor()
    return full.view(torch.bool) if is_bool else full


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of the whole tensor ``full``, laid out like the DTensor ``like`` (no communication).

    Every rank must hold the same ``full``; a plain ``like`` returns ``full`` itself.
    """
    if not is_dtensor(like):
        return full
    if tuple(full.shape) != tuple(like.shape):
        raise ValueError(f"shard_like: full shape {tuple(full.shape)} != parameter shape {tuple(like.shape)}")
    # src_data_rank=None: each rank cuts its own copy, nothing is sent (all copies are equal).
    part = distribute_tensor(full.detach(), like.device_mesh, like.placements, src_data_rank=None)
    return part.to_local()


@torch.no_grad()
def write_full_(target: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """Copy the whole tensor ``full`` into ``target`` (its local shard when ``target`` is a DTensor)."""
    local(target).copy_(shard_like(full.to(device=local(target).device), target))
    return target


def queue_after_backward(modules: Iterable[nn.Module], callback: Callable[[], None]) -> list:
    """Run ``callback`` once at the end of every backward pass that goes through ``modules``.

    Under FSDP2 a gradient hook on a sharded parameter never fires (FSDP2 computes the gradient of
    the gathered parameter and writes the reduce-scattered shard into ``.grad`` itself). This queues
    ``callback`` on the autograd engine from a hook on each module's output, after FSDP2's own
    end-of-backward callback (queued earlier, at the root output): when it runs, every sharded
    ``.grad`` holds the reduced gradient, before the training loop clips or steps.

    Returns the forward-hook handles (``handle.remove()`` detaches).
    """
    state = {"queued": False}

    def run() -> None:
        state["queued"] = False
        callback()

    def on_grad(grad: torch.Tensor) -> None:
        if not state["queued"]:
            state["queued"] = True
            torch.autograd.Variable._execution_engine.queue_callback(run)

    def forward_hook(module, args, output) -> None:
        out = output[0] if isinstance(output, tuple) else output
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(on_grad)

    return [m.register_forward_hook(forward_hook) for m in modules]


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
