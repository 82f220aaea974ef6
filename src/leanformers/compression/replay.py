"""Replaying blocks on calibration activations, without the rest of the model.

``capture_block_inputs`` runs the model on each calibration batch until its first block and keeps that
block's inputs (hidden states and the other arguments: attention mask, position ids, RoPE tables, ...);
``run_block`` replays any block on them, ``input_of`` stops a replay at one module and returns its input,
``run_block_capturing`` keeps the inputs of several modules in one pass.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from leanformers._compat import first_output

__all__ = [
    "BlockCall",
    "StopForward",
    "capture_block_inputs",
    "input_of",
    "move_to",
    "run_block",
    "run_block_capturing",
]


@dataclass
class BlockCall:
    """Positional args after the hidden states, and keyword args, of one call of block 0."""

    args: tuple
    kwargs: dict


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (caught by whoever installed the hook)."""


def move_to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(move_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [move_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor], *, stream_device: torch.device
) -> tuple[list[torch.Tensor], list[BlockCall]]:
    """Run the model on each batch until block 0 and keep its inputs.

    Returns hidden states (one (b, t, d) tensor per batch, on ``stream_device``, float32) and the
    other arguments of the call (attention mask, position ids, RoPE embeddings, cache position, ...)
    so that every block can be replayed without the rest of the model.
    """
    hidden: list[torch.Tensor] = []
    calls: list[BlockCall] = []

    def catcher(module, args, kwargs):
        if args:
            states, rest = args[0], args[1:]
        else:
            kwargs = dict(kwargs)
            states, rest = kwargs.pop("hidden_states"), ()
        hidden.append(states.detach().to(stream_device, torch.float32))
        calls.append(BlockCall(move_to(rest, stream_device), move_to(dict(kwargs), stream_device)))
        raise StopForward

    handle = blocks[0].register_forward_pre_hook(catcher, with_kwargs=True)
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    try:
        for batch in batches:
            with contextlib.suppress(StopForward):
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        handle.remove()
    if len(hidden) != len(batches):
        raise RuntimeError("block 0 was not called for every calibration batch")
    return hidden, calls


def _call(block: nn.Module, states: torch.Tensor, call: BlockCall, device: torch.device, dtype: torch.dtype):
    args = move_to(call.args, device)
    kwargs = move_to(call.kwargs, device)
    # RoPE tables etc. must match the block's compute dtype.
    kwargs = {
        k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
        for k, v in kwargs.items()
    }
    if "position_embeddings" in kwargs and isinstance(kwargs["position_embeddings"], tuple):
        kwargs["position_embeddings"] = tuple(t.to(dtype) for t in kwargs["position_embeddings"])
    return block(states.to(device, dtype), *args, **kwargs)


@torch.no_grad()
def run_block(
    block: nn.Module, states: torch.Tensor, call: BlockCall, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Replay one block on one batch; returns its output hidden states (same device as ``states``, float32)."""
    out = first_output(_call(block, states, call, device, dtype))
    if not torch.isfinite(out).all():
        raise FloatingPointError("non-finite activations")
    return out.to(states.device, torch.float32)


@torch.no_grad()
def input_of(
    block: nn.Module, module: nn.Module, states: torch.Tensor, call: BlockCall, device, dtype
) -> torch.Tensor:
    """Input of ``module`` when ``block`` runs on ``states`` (stops the block right there)."""
    box: list[torch.Tensor] = []

    def hook(mod, args):
        box.append(args[0].detach())
        raise StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        _call(block, states, call, device, dtype)
    except StopForward:
        pass
    finally:
        handle.remove()
    if not box:
        raise RuntimeError(f"{type(module).__name__} was not called by its block")
    return box[0]


@torch.no_grad()
def run_block_capturing(
    block: nn.Module,
    states: list[torch.Tensor],
    calls: list[BlockCall],
    module_paths: list[str],
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
    """Run ``block`` on every batch once, keeping its outputs and the inputs of ``module_paths``.

    Used on the dense stream, whose block never changes: one pass serves every group of the block
    (instead of re-running the dense block up to each group). Inputs stay on the compute device.
    """
    captured: dict[str, list[torch.Tensor]] = {p: [] for p in module_paths}
    handles = []
    for path in module_paths:

        def hook(mod, args, _path=path):
            captured[_path].append(args[0].detach())

        handles.append(block.get_submodule(path).register_forward_pre_hook(hook))
    try:
        outputs = [run_block(block, s, c, device, dtype) for s, c in zip(states, calls)]
    finally:
        for h in handles:
            h.remove()
    return outputs, captured
