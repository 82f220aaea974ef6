"""Gradient capture of the sparse layers: masked gradients every step, dense ones for an update.

Every backward pass the gradient of each sparse weight is multiplied by its mask (before clipping
and the optimizer step). On the step that ends with a topology update, rules that score gradients
(RigL regrowth, MEST removal) need the *dense* gradient: it is kept here, summed over the
micro-batches of that step.

One device / DDP: a tensor hook on each weight (it fires before DDP's reduction, so the dense
gradients are each rank's own and are averaged by :meth:`GradientCapture.reduce_over_ranks`).
FSDP2: a hook on a sharded parameter never fires; the reduced gradient shards are masked at the
end of every backward instead (``queue_after_backward``) and kept as shards.
"""

from __future__ import annotations

import torch

from leanformers.chts.masks import SparseLayer
from leanformers.training.distributed import all_reduce_mean_, is_distributed
from leanformers.training.fsdp import gather_full, local, queue_after_backward

__all__ = ["GradientCapture"]


class GradientCapture:
    """Masks the gradients of ``layers`` and collects their dense gradients while armed.

    Args:
        layers: the sparse layers (their masks must be set before the first backward).
        sharded: FSDP2 (DTensor weights): mask the reduced shards after backward.
    """

    def __init__(self, layers: list[SparseLayer], sharded: bool):
        self.layers = layers
        self.sharded = sharded
        self.armed = False
        # whole (out, in) float32 matrices of this rank's data, or under FSDP2 local shards (param layout)
        self._dense: dict[int, torch.Tensor] = {}
        if sharded:
            self._hooks = queue_after_backward([layer.module for layer in layers], self._mask_sharded_grads)
        else:
            self._hooks = [layer.weight.register_hook(self._hook(idx)) for idx, layer in enumerate(layers)]

    def arm(self, collect: bool) -> None:
        """Collect dense gradients during the next step's backward passes (``collect``) or not; drops old ones."""
        self.armed = collect
        self._dense = {}

    def _hook(self, idx: int):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            layer = self.layers[idx]
            if self.armed:
                dense = layer.logical(grad).detach().to(torch.float32)
                if idx in self._dense:
                    self._dense[idx] += dense
                else:
                    self._dense[idx] = dense.clone()
            return grad * layer.multiplier  # 0/1 uint8 view of the bool mask: no float copy kept

        return hook

    @torch.no_grad()
    def _mask_sharded_grads(self) -> None:
        """FSDP2, end of every backward: mask the reduced gradient shards (before clipping and the step).

        Masking after FSDP2's reduce-scatter equals masking before it (the mask is the same on every
        rank and the reduction is a sum). While armed, ``.grad`` holds the masked sum of the earlier
        micro-batches plus this one's dense gradient, so ``D <- D * ~mask + grad`` keeps the masked-out
        entries' running sum and the links' sum (no second buffer).
        """
        for idx, layer in enumerate(self.layers):
            grad = layer.weight.grad
            if grad is None:
                continue
            shard = local(grad)
            if self.armed:
                dense = self._dense.get(idx)
                if dense is None:
                    self._dense[idx] = shard.to(torch.float32, copy=True)
                else:
                    dense.mul_(~layer.mask_param).add_(shard)
            shard.mul_(layer.multiplier)

    def dense(self, idx: int) -> torch.Tensor | None:
        """The dense gradient (out, in) of layer ``idx`` for this update (whole matrix, float32), or None.

        Under FSDP2 it is gathered from the local shards, one matrix at a time (a collective: every
        rank asks for the same layers in the same order).
        """
        if not self.sharded:
            return self._dense.get(idx)
        if not self.armed:
            return None
        layer = self.layers[idx]
        shard = self._dense.get(idx)
        if shard is None:  # no gradient reached this layer: zeros, so that every rank gathers alike
            shard = torch.zeros(layer.mask_param.shape, dtype=torch.float32, device=layer.mask_param.device)
        return layer.logical(gather_full(shard, layer.weight))

    def reduce_over_ranks(self) -> None:
        """Average the collected dense gradients over DDP ranks (FSDP2 reduced them already).

        The hook sees each rank's local gradient, before DDP's reduction (and DDP reduces only the
        masked one): without this every rank would score with its own data. The mean of the signed
        gradients is the gradient of the global batch, the quantity gradient accumulation gives on
        one rank (the official code averages |grad| per rank; both make the ranks agree). Every
        layer is reduced, zeros where a rank saw no gradient, so that all ranks issue the same calls.
        """
        if self.sharded or not self.armed or not is_distributed():
            return
        for idx, layer in enumerate(self.layers):
            grad = self._dense.get(idx)
            if grad is None:
                grad = torch.zeros(layer.shape, dtype=torch.float32, device=layer.weight.device)
                self._dense[idx] = grad
            all_reduce_mean_(grad)

    def remove(self) -> None:
        """Detach every hook."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
