"""Where the linears sit in each architecture: the blocks, and the groups of linears inside a block.

Every compressor walks the blocks of a model (decoder layers, or encoder layers for BERT); inside each
block the targeted linears form groups that share one input and are compressed in order
(q/k/v -> o -> gate/up -> down). ``find_layout`` resolves them from a built-in table, explicit overrides,
or ``infer_layout`` (the model's structure plus one 8-token forward).
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from leanformers._compat import first_output, is_conv1d
from leanformers.compression.replay import StopForward

logger = logging.getLogger(__name__)

__all__ = [
    "ARCHITECTURES",
    "BlockLayout",
    "blocks_at",
    "find_blocks",
    "find_layout",
    "infer_layout",
    "is_attention_path",
    "linear_weight",
    "refuse_compressed",
    "resolve_blocks",
    "select_modules",
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

# Fast path: model_type -> layout, for the families whose layout the inference (``infer_layout``) is
# tested to reproduce exactly (tests/pifa/test_layout.py). Every other model is inferred.
ARCHITECTURES: dict[str, BlockLayout] = {
    "llama": _LLAMA,
    "qwen2": _LLAMA,
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


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _out_in(module: nn.Module) -> tuple[int, int]:
    return tuple(linear_weight(module).shape)


def is_attention_path(path: str) -> bool:
    """Attention or MLP, for ``attn_density``: a module path with an "attn"/"attention" part."""
    return any("attn" in part.lower() or "attention" in part.lower() for part in path.split("."))


def refuse_compressed(model: nn.Module) -> None:
    """Raise if ``model`` is already MPIFA-compressed (PIFA / low-rank layers or an mpifa config)."""
    from leanformers.storage.layers import LowRankLinear, PIFALinear

    count = sum(isinstance(m, (PIFALinear, LowRankLinear)) for m in model.modules())
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if count or str(method) == "mpifa":
        raise ValueError(
            f"this {type(model).__name__} is already MPIFA-compressed ({count} PIFALinear/LowRankLinear "
            f"modules, quantization_config quant_method {method!r}): compress the original dense model "
            "instead, or dequantize it first (model.dequantize() or leanformers.pifa.dequantize_model) to "
            "compress it again"
        )


def resolve_blocks(model: nn.Module, blocks_path: str) -> tuple[nn.ModuleList | None, list[str]]:
    """ModuleList at ``blocks_path`` (also tried without its first part and under ``base_model``, so a
    table path written for the model with a head resolves on the bare base model and vice versa)."""
    candidates = [blocks_path]
    _, _, tail = blocks_path.partition(".")
    if tail:
        candidates.append(tail)
    base = getattr(model, "base_model", None)
    for path in candidates:
        for root in (model, base):
            found = _get(root, path) if root is not None else None
            if isinstance(found, nn.ModuleList) and len(found) > 0:
                return found, candidates
    return None, candidates


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated blocks of any model: the non-empty ModuleList of same-type children holding the most
    linear-layer parameters. Returns (path relative to ``model``, the ModuleList)."""
    best = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        weight = sum(linear_weight(m).numel() for child in module for m in child.modules() if _is_linear(m))
        if weight and (best is None or weight > best[0]):
            best = (weight, name, module)
    if best is None:
        raise ValueError(
            f"could not find the repeated blocks of {type(model).__name__}: no ModuleList of identical "
            "modules holding linear layers. Pass blocks_path='<ModuleList path>' (--blocks-path)"
        )
    return best[1], best[2]


def blocks_at(model: nn.Module, blocks_path: str | None) -> tuple[str, nn.ModuleList]:
    """(path, blocks): the ModuleList at ``blocks_path`` when given (an error naming the paths tried
    when there is none), else the repeated blocks ``find_blocks`` finds."""
    if not blocks_path:
        return find_blocks(model)
    blocks, candidates = resolve_blocks(model, blocks_path)
    if blocks is None:
        raise ValueError(
            f"could not find the blocks of {type(model).__name__}: no non-empty ModuleList at "
            f"{' or '.join(candidates)}; check blocks_path (--blocks-path)"
        )
    return blocks_path, blocks


def _probe_input(model: nn.Module) -> torch.Tensor:
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab is None and hasattr(config, "get_text_config"):
        vocab = getattr(config.get_text_config(), "vocab_size", None)
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), None)
    if device is None:
        raise ValueError("the model's weights are on the meta device; load them before compressing")
    return (torch.arange(8, device=device) * 7 + 3).remainder(int(vocab or 8))[None]


@torch.no_grad()
def _probe_block(model: nn.Module, block: nn.Module) -> tuple[list[tuple[str, torch.Tensor]], tuple, dict]:
    """One short forward (8 tokens) stopped after ``block``: the inputs of its linears in call order,
    and the block's own arguments (for replays)."""
    calls: list[tuple[str, torch.Tensor]] = []
    box: dict = {}
    handles = []
    for name, module in block.named_modules():
        if _is_linear(module):

            def hook(mod, args, _name=name):
                calls.append((_name, args[0]))  # kept alive: data pointers stay unique

            handles.append(module.register_forward_pre_hook(hook))

    def block_in(module, args, kwargs):
        box["args"], box["kwargs"] = args, dict(kwargs)

    def block_out(module, args, output):
        raise StopForward

    handles.append(block.register_forward_pre_hook(block_in, with_kwargs=True))
    handles.append(block.register_forward_hook(block_out))
    try:
        model(input_ids=_probe_input(model), use_cache=False)
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    if "args" not in box:
        raise ValueError(
            f"a forward of {type(model).__name__} on input_ids never called its block 0; pass "
            "blocks_path (--blocks-path) pointing at the ModuleList the forward runs"
        )
    return calls, box["args"], box["kwargs"]


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


def _groups_from_calls(calls: list[tuple[str, torch.Tensor]]) -> list[list[str]]:
    """Linears grouped by the input tensor they share, groups ordered by first call. Linears called more
    than once per forward (shared weights) are left dense."""
    counts: dict[str, int] = {}
    for name, _ in calls:
        counts[name] = counts.get(name, 0) + 1
    repeated = sorted(n for n, c in counts.items() if c > 1)
    if repeated:
        logger.warning("MPIFA leaves dense the linears called more than once per block forward: %s", repeated)
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for name, x in calls:
        if counts[name] > 1:
            continue
        for key, members in groups:
            if _same_tensor(key, x):
                members.append(name)
                break
        else:
            groups.append((x, [name]))
    return [members for _, members in groups]


@torch.no_grad()
def _permutation_preserves(block: nn.Module, producers: list[str], consumer: str, args, kwargs) -> bool:
    """True when permuting the producers' output channels and the consumer's input channels together
    leaves the block's output unchanged (so the scatter-free MLP reorder is function-preserving).
    Checked on block 0 with the probe's inputs; weights are permuted in place and restored exactly."""
    mods = [block.get_submodule(p) for p in producers]
    cons = block.get_submodule(consumer)
    n = _out_in(cons)[1]
    if any(_out_in(m)[0] != n for m in mods):
        return False
    ref = first_output(block(*args, **kwargs)).float()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    inv = torch.argsort(perm)

    def apply(order):
        for m in mods:  # producers: output channels
            if is_conv1d(m):
                m.weight.copy_(m.weight[:, order.to(m.weight.device)])
            else:
                m.weight.copy_(m.weight[order.to(m.weight.device)])
            if m.bias is not None:
                m.bias.copy_(m.bias[order.to(m.bias.device)])
        if is_conv1d(cons):  # consumer: input channels
            cons.weight.copy_(cons.weight[order.to(cons.weight.device)])
        else:
            cons.weight.copy_(cons.weight[:, order.to(cons.weight.device)])

    apply(perm)
    try:
        out = first_output(block(*args, **kwargs)).float()
    finally:
        apply(inv)
    tol = 1e-4 if linear_weight(cons).dtype == torch.float32 else 2e-2
    err = (out - ref).norm() / ref.norm().clamp_min(1e-12)
    return bool(torch.isfinite(err)) and float(err) < tol


def infer_layout(model: nn.Module, blocks_path: str | None = None) -> tuple[BlockLayout, nn.ModuleList]:
    """Block layout of any model, from its structure and one short forward.

    Blocks: ``blocks_path`` or the repeated-block ModuleList (``find_blocks``). Groups: the linears of
    block 0 that receive the same input tensor, in execution order (hooks on one 8-token forward).
    Attention: modules with an "attn"/"attention" path part. MLP chain (for the scatter-free layout):
    the last group's single linear and the group before it, when permuting their shared channels is
    verified to leave block 0's output unchanged.
    """
    path, blocks = blocks_at(model, blocks_path)
    was_training = model.training
    model.eval()  # no dropout: the probe and the permutation check must be deterministic
    try:
        calls, args, kwargs = _probe_block(model, blocks[0])
        groups = _groups_from_calls(calls)
        if not groups:
            raise ValueError(
                f"block 0 of {type(model).__name__} ({path}) runs no nn.Linear / Conv1D: nothing for MPIFA "
                "to compress. Pass blocks_path (--blocks-path) if the blocks are elsewhere"
            )
        attention = [n for g in groups for n in g if is_attention_path(n)]
        chain = None
        if len(groups) >= 2 and len(groups[-1]) == 1:
            producers, consumer = groups[-2], groups[-1][0]
            if not any(is_attention_path(n) for n in [*producers, consumer]) and _permutation_preserves(
                blocks[0], producers, consumer, args, kwargs
            ):
                chain = (list(producers), consumer)
    finally:
        model.train(was_training)
    return BlockLayout(path, groups, attention, chain), blocks


def find_layout(
    model: nn.Module,
    blocks_path: str | None = None,
    groups: list[list[str]] | None = None,
    attention: list[str] | None = None,
) -> tuple[BlockLayout, nn.ModuleList]:
    """Resolve the layout of ``model``: explicit ``groups`` (with ``blocks_path`` or the found blocks),
    else the built-in table for its model_type when it matches the model, else ``infer_layout``.

    Refuses a model that is already MPIFA-compressed. Handles task heads around a base model (e.g.
    ``BertForSequenceClassification.bert``, a bare ``LlamaModel``). Raises ValueError naming what is
    missing. Cheap: at most one 8-token forward that stops after block 0.
    """
    refuse_compressed(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    table = ARCHITECTURES.get(model_type) if model_type else None
    layout = blocks = None
    if groups is not None:
        blocks_path, blocks = blocks_at(model, blocks_path)
        attn = attention if attention is not None else [n for g in groups for n in g if is_attention_path(n)]
        layout = BlockLayout(blocks_path, [list(g) for g in groups], attn, None)
    elif table is not None and blocks_path in (None, table.blocks_path):
        blocks, _ = resolve_blocks(model, table.blocks_path)
        if blocks is not None and all(
            (m := _get(blocks[0], name)) is not None and _is_linear(m) for name in table.modules
        ):
            layout = table
    if layout is None:
        layout, blocks = infer_layout(model, blocks_path)
    if attention is not None:
        layout = BlockLayout(layout.blocks_path, layout.groups, list(attention), layout.mlp_chain)
    for name in layout.modules:
        module = _get(blocks[0], name)
        if module is None or not _is_linear(module):
            raise ValueError(
                f"{type(model).__name__} block 0 has no linear layer at {name!r}; check groups (--groups): "
                f"the linears of block 0 are {[n for n, m in blocks[0].named_modules() if _is_linear(m)]}"
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
