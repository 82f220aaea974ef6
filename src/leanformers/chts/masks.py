"""Sparse layers of a model, their masks and the bookkeeping around them.

- which modules are sparse (``nn.Linear`` and GPT-2 ``Conv1D`` by name pattern),
- gradient masking hooks, re-masking of weights and optimizer moments,
- chain removal (dead-neuron percolation) over MLP chains and SwiGLU triples, active-neuron counts,
- per-head grouping of attention projections (GQA aware), bit-packed mask I/O.

Masks are always kept in the logical (out, in) orientation; ``Conv1D`` stores its weight (in, out).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from leanformers._compat import is_conv1d
from leanformers.training import load_state, save_state
from leanformers.training.fsdp import gather_full, is_dtensor, local, shard_like

__all__ = [
    "MASKS_STATE_NAME",
    "SparseLayer",
    "active_neurons",
    "apply_masks",
    "chain_removal",
    "find_sparse_layers",
    "load_masks",
    "pack_mask",
    "save_masks",
    "split_count",
    "unpack_mask",
]

MASKS_STATE_NAME = "chtss_masks"
_ROLES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up"}
_ROLES["down_proj"] = "down"


@dataclass
class SparseLayer:
    """One sparse matrix: its module, the weight parameter and the (out, in) boolean mask."""

    name: str
    module: nn.Module
    transposed: bool  # Conv1D: weight is (in, out)
    role: str | None = None  # q/k/v/o/gate/up/down for decoder projections
    groups: int = 1  # head groups for per-head balance
    group_dim: int = 0  # 0: groups of rows (q/k/v), 1: groups of columns (o)
    # The one mask of this matrix: bool, in the parameter's own layout (1 byte per weight). No copy in
    # the weight dtype is kept: weights, gradients and moments are multiplied by the bool mask directly.
    # Under FSDP2 (DTensor weight) it is this rank's shard only, laid out like the weight's shard.
    _mask: torch.Tensor | None = field(default=None, repr=False)

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    @property
    def shape(self) -> tuple[int, int]:
        """The whole matrix's (out, in) shape (the global shape under FSDP2)."""
        w = self.module.weight
        return (w.shape[1], w.shape[0]) if self.transposed else (w.shape[0], w.shape[1])

    @property
    def sharded(self) -> bool:
        """The weight is a DTensor (FSDP2): mask, weight and moments are held as local shards."""
        return is_dtensor(self.module.weight)

    def full_weight(self) -> torch.Tensor:
        """The whole weight (out, in), identical on every rank (gathered under FSDP2: a collective)."""
        return self.logical(gather_full(self.module.weight.data))

    @property
    def parent(self) -> str:
        return self.name.rsplit(".", 1)[0] if "." in self.name else ""

    def logical(self, tensor: torch.Tensor) -> torch.Tensor:
        """A parameter-shaped tensor in (out, in) orientation (a view)."""
        return tensor.T if self.transposed else tensor

    @property
    def mask(self) -> torch.Tensor | None:
        """The whole (out, in) bool mask (a view of :attr:`mask_param` for ``Conv1D``).

        Under FSDP2 it is gathered from the ranks' shards: a collective, every rank must ask.
        """
        if self._mask is None:
            return None
        return self.logical(gather_full(self._mask, self.module.weight) if self.sharded else self._mask)

    def set_mask(self, mask: torch.Tensor) -> None:
        """Install a new whole (out, in) bool mask, stored once in the parameter's layout (local shard under FSDP2)."""
        w = self.module.weight
        mask = mask.to(device=local(w).device, dtype=torch.bool)
        mask = (mask.T if self.transposed else mask).contiguous()
        self._mask = shard_like(mask, w).contiguous() if self.sharded else mask

    @property
    def mask_param(self) -> torch.Tensor:
        """The bool mask in the parameter's shape (this rank's shard of it under FSDP2)."""
        return self._mask

    @property
    def multiplier(self) -> torch.Tensor:
        """The mask as 0/1 ``uint8`` in the (local) parameter's shape: a zero-copy view of the bool mask.

        Multiplying a float tensor by it promotes on the fly (no copy in the weight dtype); on CPU it
        is about 2x faster than multiplying by the bool tensor itself.
        """
        return self._mask.view(torch.uint8)

    def to_groups(self, tensor: torch.Tensor) -> torch.Tensor:
        """(out, in) -> (groups, n): one row per attention head (or a single row)."""
        if self.groups == 1:
            return tensor.reshape(1, -1)
        n_out, n_in = tensor.shape
        if self.group_dim == 0:
            return tensor.reshape(self.groups, -1)
        return (
            tensor.reshape(n_out, self.groups, n_in // self.groups).transpose(0, 1).reshape(self.groups, -1)
        )

    def from_groups(self, grouped: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_groups`."""
        n_out, n_in = self.shape
        if self.groups == 1 or self.group_dim == 0:
            return grouped.reshape(n_out, n_in)
        hd = n_in // self.groups
        return grouped.reshape(self.groups, n_out, hd).transpose(0, 1).reshape(n_out, n_in)


def _is_sparse_candidate(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def find_sparse_layers(
    model: nn.Module, targets: tuple[str, ...], exclude: tuple[str, ...] = (), balance_heads: bool = False
) -> list[SparseLayer]:
    """The ``nn.Linear`` / ``Conv1D`` modules whose names match a target pattern and no exclude pattern.

    Raises ``ValueError`` naming some module names when nothing matches.
    """
    compiled = [re.compile(p) for p in targets]
    excluded = [re.compile(p) for p in exclude]
    cfg = getattr(model, "config", None)
    n_heads = getattr(cfg, "num_attention_heads", None)
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    layers: list[SparseLayer] = []
    linear_names = []
    for name, module in model.named_modules():
        if not _is_sparse_candidate(module):
            continue
        linear_names.append(name)
        if not any(p.search(name) for p in compiled) or any(p.search(name) for p in excluded):
            continue
        role = _ROLES.get(name.rsplit(".", 1)[-1])
        layer = SparseLayer(name=name, module=module, transposed=is_conv1d(module), role=role)
        if balance_heads and role in ("q", "k", "v", "o") and n_heads:
            groups = n_heads if role in ("q", "o") else n_kv
            n_out, n_in = layer.shape
            size = n_out if role != "o" else n_in
            if size % groups == 0:
                layer.groups, layer.group_dim = groups, (1 if role == "o" else 0)
        layers.append(layer)
    if not layers:
        shown = ", ".join(linear_names[:8]) or "(none: the model has no nn.Linear / Conv1D)"
        raise ValueError(
            f"targets {list(targets)} match no nn.Linear / Conv1D module of {type(model).__name__} "
            f"(excluding {list(exclude)}). Its linear modules are named like: {shown}. "
            "Pass CHTssConfig(targets=[...]) with regular expressions matching those names."
        )
    return layers


def split_count(total: int, groups: int) -> torch.Tensor:
    """``total`` split into ``groups`` near-equal integer parts (the first ones get the remainder)."""
    base, extra = divmod(int(total), int(groups))
    counts = torch.full((groups,), base, dtype=torch.long)
    counts[:extra] += 1
    return counts


def _chains(layers: list[SparseLayer]) -> tuple[list[list[int]], list[tuple[int, int, int]]]:
    """Sequential chains (same parent, matching sizes, no attention role) and SwiGLU (gate, up, down)."""
    by_parent: dict[str, dict[str, int]] = {}
    for idx, layer in enumerate(layers):
        if layer.role in ("gate", "up", "down"):
            by_parent.setdefault(layer.parent, {})[layer.role] = idx
    swiglu = [(d["gate"], d["up"], d["down"]) for d in by_parent.values() if len(d) == 3]
    chains: list[list[int]] = []
    current: list[int] = []
    for idx, layer in enumerate(layers):
        if layer.role is not None:
            if len(current) > 1:
                chains.append(current)
            current = []
            continue
        if current:
            prev = layers[current[-1]]
            if prev.parent == layer.parent and prev.shape[0] == layer.shape[1]:
                current.append(idx)
                continue
            if len(current) > 1:
                chains.append(current)
        current = [idx]
    if len(current) > 1:
        chains.append(current)
    return chains, swiglu


def chain_removal(masks: list[torch.Tensor], layers: list[SparseLayer]) -> list[torch.Tensor]:
    """Drop links of dead neurons until none is left (node percolation), returning new masks.

    A hidden neuron between layers l and l+1 of an MLP chain is dead when it has no incoming link
    (row of mask_l empty) or no outgoing link (column of mask_{l+1} empty). In a SwiGLU block a
    neuron j dies when gate row j, up row j or down column j is empty (the product gate * up is 0).
    """
    masks = [m.clone() for m in masks]
    chains, swiglu = _chains(layers)
    changed = True
    while changed:
        changed = False
        for chain in chains:
            for a, b in zip(chain[:-1], chain[1:]):
                alive = masks[a].any(1) & masks[b].any(0)
                if not bool(alive.all()):
                    before = int(masks[a].sum() + masks[b].sum())
                    masks[a] &= alive[:, None]
                    masks[b] &= alive[None, :]
                    changed |= int(masks[a].sum() + masks[b].sum()) != before
        for g, u, d in swiglu:
            alive = masks[g].any(1) & masks[u].any(1) & masks[d].any(0)
            if not bool(alive.all()):
                before = int(masks[g].sum() + masks[u].sum() + masks[d].sum())
                masks[g] &= alive[:, None]
                masks[u] &= alive[:, None]
                masks[d] &= alive[None, :]
                changed |= int(masks[g].sum() + masks[u].sum() + masks[d].sum()) != before
    return masks


def active_neurons(mask: torch.Tensor) -> tuple[float, float]:
    """(fraction of output nodes with a link, fraction of input nodes with a link) of a (out, in) mask."""
    n_out, n_in = mask.shape
    return int(mask.any(1).sum()) / n_out, int(mask.any(0).sum()) / n_in


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 tensor with 8 entries per byte (most significant bit first)."""
    flat = mask.reshape(-1).to(torch.uint8).cpu()
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, torch.zeros(pad, dtype=torch.uint8)])
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return (flat.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_mask`."""
    numel = 1
    for s in shape:
        numel *= int(s)
    shifts = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)
    bits = (packed.to(torch.uint8).view(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:numel].bool().reshape(shape)


def save_masks(folder: str | os.PathLike, masks: dict[str, torch.Tensor], extra_meta: dict | None = None):
    """Write ``{module name: (out, in) bool mask}`` bit-packed to ``folder/leanformers/chtss_masks.safetensors``."""
    tensors = {name: pack_mask(m) for name, m in masks.items()}
    meta = {"shapes": {name: list(m.shape) for name, m in masks.items()}, **(extra_meta or {})}
    return save_state(folder, MASKS_STATE_NAME, tensors, meta)


def load_masks(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read masks written by :func:`save_masks` (or a CHTss checkpoint); raise if the folder has none."""
    loaded = load_state(folder, MASKS_STATE_NAME)
    if loaded is None:
        loaded = load_state(folder, "chtss")
    if loaded is None:
        raise FileNotFoundError(
            f"no CHTss masks in {folder}: expected {folder}/leanformers/{MASKS_STATE_NAME}.safetensors, written "
            "by model.save_pretrained / trainer.save_model of a model under CHTss (CHTssCallback or "
            "CHTssController), by CHTssController.save_masks, or in output_dir at the end of training."
        )
    tensors, meta = loaded
    shapes = meta["shapes"]
    return {
        name: unpack_mask(tensors[name], tuple(shape)) for name, shape in shapes.items() if name in tensors
    }


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Zero the weights outside ``masks`` ({module name: (out, in) bool}); for inference or fine-tuning."""
    modules = dict(model.named_modules())
    missing = [name for name in masks if name not in modules]
    if missing:
        raise ValueError(
            f"masks name modules the model does not have: {missing[:5]}; was it saved from this model?"
        )
    for name, mask in masks.items():
        module = modules[name]
        m = mask.T if is_conv1d(module) else mask
        if tuple(m.shape) != tuple(module.weight.shape):
            raise ValueError(
                f"mask of {name} has shape {tuple(mask.shape)}, weight {tuple(module.weight.shape)}"
            )
        module.weight.mul_(m.to(device=module.weight.device, dtype=module.weight.dtype))
    return model
