"""Where the linears sit in each architecture, and calibration activations block by block.

The pipeline (compress.py) walks the blocks of a model (decoder layers, or encoder layers for BERT);
inside each block the targeted linears form groups that share one input and are compressed in order
(q/k/v -> o -> gate/up -> down). This module finds those blocks and groups, captures the inputs and
keyword arguments of the first block, replays blocks, and accumulates the input Grams of a group.
"""

from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from leanformers._compat import first_output, is_conv1d

__all__ = [
    "ARCHITECTURES",
    "BlockCall",
    "BlockLayout",
    "capture_block_inputs",
    "find_layout",
    "group_input_stats",
    "linear_weight",
    "run_block",
    "run_block_capturing",
]


@dataclass
class BlockLayout:
    """Blocks and linear groups of an architecture.

    blocks_path: attribute path of the ModuleList of blocks, relative to the model.
    groups: per block, lists of module paths (relative to the block) that share one input, in
        compression order.
    attention: module paths (relative to the block) that count as attention for ``attn_density``.
    """

    blocks_path: str
    groups: list[list[str]]
    attention: list[str] = field(default_factory=list)
    # (producers, consumer) of the MLP: producers' outputs feed the consumer element-wise, so their
    # channel order may be permuted together (used for the scatter-free PIFA layout).
    mlp_chain: tuple[list[str], str] | None = None

    @property
    def modules(self) -> list[str]:
        return [name for group in self.groups for name in group]


_LLAMA = BlockLayout(
    "model.layers",
    [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ],
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
    (["mlp.gate_proj", "mlp.up_proj"], "mlp.down_proj"),
)
_OPT = BlockLayout(
    "model.decoder.layers",
    [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"], ["fc1"], ["fc2"]],
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"],
    (["fc1"], "fc2"),
)
_GPT2 = BlockLayout(
    "transformer.h",
    [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]],
    ["attn.c_attn", "attn.c_proj"],
    (["mlp.c_fc"], "mlp.c_proj"),
)
_BERT_GROUPS = [
    ["attention.self.query", "attention.self.key", "attention.self.value"],
    ["attention.output.dense"],
    ["intermediate.dense"],
    ["output.dense"],
]
_BERT_ATTN = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"]

# model_type -> layout. LLaMA-style decoders (GQA included) share one layout.
ARCHITECTURES: dict[str, BlockLayout] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "phi3": None,  # fused qkv/gate_up: not supported yet (listed to give a precise error)
    "opt": _OPT,
    "gpt2": _GPT2,
    "bert": BlockLayout("encoder.layer", _BERT_GROUPS, _BERT_ATTN, (["intermediate.dense"], "output.dense")),
}


def _get(root: nn.Module, path: str) -> nn.Module | None:
    module = root
    for part in path.split("."):
        if not hasattr(module, part):
            return None
        module = getattr(module, part)
    return module


def find_layout(
    model: nn.Module,
    blocks_path: str | None = None,
    groups: list[list[str]] | None = None,
    attention: list[str] | None = None,
) -> tuple[BlockLayout, nn.ModuleList]:
    """Resolve the layout of ``model`` (explicit arguments override the built-in table).

    Handles task heads around a base model (e.g. ``BertForSequenceClassification.bert``, a bare
    ``BertModel``, ``LlamaModel`` without the LM head) by also trying the path without its first part
    and under ``base_model``. Raises ValueError naming what is missing.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    layout = ARCHITECTURES.get(model_type) if model_type else None
    if groups is None and layout is None:
        known = sorted(k for k, v in ARCHITECTURES.items() if v is not None)
        raise ValueError(
            f"architecture {model_type!r} ({type(model).__name__}) is not supported by MPIFA: no known "
            f"block layout (supported: {', '.join(known)}). Pass blocks_path='<ModuleList path>' and "
            "groups=[[...], ...] (module paths inside a block that share an input, in order) in MPIFAConfig."
        )
    if layout is None:
        layout = BlockLayout(blocks_path or "", groups, attention or [])
    else:
        layout = BlockLayout(
            blocks_path or layout.blocks_path,
            groups or layout.groups,
            attention if attention is not None else layout.attention,
            layout.mlp_chain if groups is None else None,
        )
    candidates = [layout.blocks_path]
    head, _, tail = layout.blocks_path.partition(".")
    if tail:
        candidates.append(tail)
    base = getattr(model, "base_model", None)
    blocks = None
    for path in candidates:
        for root in (model, base):
            found = _get(root, path) if root is not None else None
            if isinstance(found, nn.ModuleList):
                blocks = found
                break
        if blocks is not None:
            break
    if blocks is None:
        raise ValueError(
            f"could not find the blocks of {type(model).__name__}: looked for a ModuleList at "
            f"{' or '.join(candidates)}; pass MPIFAConfig(blocks_path=...)"
        )
    for name in layout.modules:
        module = _get(blocks[0], name)
        if module is None or not (isinstance(module, nn.Linear) or is_conv1d(module)):
            raise ValueError(
                f"{type(model).__name__} block 0 has no linear layer at {name!r}; the layout for "
                f"{model_type!r} does not match this model. Pass MPIFAConfig(groups=...)"
            )
    return layout, blocks


def select_modules(layout: BlockLayout, targets: list[str] | None) -> BlockLayout:
    """Keep only module paths matching one of the fnmatch patterns in ``targets`` (None keeps all)."""
    if not targets:
        return layout
    groups = [
        [n for n in g if any(fnmatch.fnmatch(n, t) or n.endswith(t) for t in targets)] for g in layout.groups
    ]
    groups = [g for g in groups if g]
    if not groups:
        raise ValueError(f"targets {targets} match no module of the block layout {layout.modules}")
    return BlockLayout(layout.blocks_path, groups, layout.attention, layout.mlp_chain)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """Weight as (out, in) for nn.Linear and GPT-2 Conv1D (which stores (in, out))."""
    return module.weight.t() if is_conv1d(module) else module.weight


@dataclass
class BlockCall:
    """Positional args after the hidden states, and keyword args, of one call of block 0."""

    args: tuple
    kwargs: dict


class _StopForward(Exception):
    pass


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
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
        calls.append(BlockCall(_to(rest, stream_device), _to(dict(kwargs), stream_device)))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(catcher, with_kwargs=True)
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    try:
        for batch in batches:
            with contextlib.suppress(_StopForward):
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        handle.remove()
    if len(hidden) != len(batches):
        raise RuntimeError("block 0 was not called for every calibration batch")
    return hidden, calls


def _call(block: nn.Module, states: torch.Tensor, call: BlockCall, device: torch.device, dtype: torch.dtype):
    args = _to(call.args, device)
    kwargs = _to(call.kwargs, device)
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
def _input_of(
    block: nn.Module, module: nn.Module, states: torch.Tensor, call: BlockCall, device, dtype
) -> torch.Tensor:
    """Input of ``module`` when ``block`` runs on ``states`` (stops the block right there)."""
    box: list[torch.Tensor] = []

    def hook(mod, args):
        box.append(args[0].detach())
        raise _StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        _call(block, states, call, device, dtype)
    except _StopForward:
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


@torch.no_grad()
def group_input_stats(
    dense_inputs: list[torch.Tensor],
    compressed_block: nn.Module,
    module_path: str,
    compressed_states: list[torch.Tensor],
    calls: list[BlockCall],
    *,
    device: torch.device,
    dtype: torch.dtype,
    need_cross: bool,
    need_dense: bool,
):
    """Accumulate G = X_c X_c^T, K = X_d X_c^T, S = X_d X_d^T for the input of ``module_path``.

    ``dense_inputs`` are the module's inputs in the dense model (one tensor per batch, from
    ``run_block_capturing`` on the dense stream); the compressed inputs come from the block being
    compressed (earlier groups already replaced) on the compressed stream, token by token on the
    same calibration batch. Products in float32 on the device, sums in float64.
    Returns GramStats(G, K or None, S or None, tokens).
    """
    from leanformers.pifa.reconstruct import GramStats

    comp_module = compressed_block.get_submodule(module_path)
    G = K = S = None
    tokens = 0
    for xd, xc_states, call in zip(dense_inputs, compressed_states, calls):
        xc = _input_of(compressed_block, comp_module, xc_states, call, device, dtype)
        xc = xc.reshape(-1, xc.shape[-1]).float()
        if not torch.isfinite(xc).all():
            raise FloatingPointError(f"non-finite activations at the input of {module_path}")
        g = (xc.T @ xc).double()
        G = g if G is None else G.add_(g)
        if need_cross or need_dense:
            xd = xd.to(device).reshape(-1, xd.shape[-1]).float()
            if need_cross:
                k = (xd.T @ xc).double()
                K = k if K is None else K.add_(k)
            if need_dense:
                s = (xd.T @ xd).double()
                S = s if S is None else S.add_(s)
        tokens += xc.shape[0]
    return GramStats(G, K, S, tokens)
