"""Issue 12 — memory per GPU under FSDP2 for dense, CHTss and SST LLaMA 1.3B / 7B (meta device).

Nothing is trained: each model is built on the meta device (shapes only, no memory), the method is
applied for real where it changes the parameter layout (SST through peft on the meta model), and the
persistent bytes per GPU are counted from the resulting tensors:

- FSDP2 (``fully_shard``) shards every parameter (dim 0) over the W ranks; gradients and AdamW's two
  moments exist for trainable parameters only and are sharded like them. fp32 parameters, gradients
  and moments (bf16 mixed precision computes in bf16 but keeps the sharded fp32 copy).
- buffers are NOT sharded by FSDP2: each rank holds them whole (SST's frozen U / Vh factors are
  buffers in ``src/leanformers/sst/layer.py``; making them sharded is SST's FSDP2 work, issue 12).
- CHTss: the dense weights stay (zeros off the links) and train densely; its state is one bool per
  sparse weight, held per shard (``SparseLayer.mask_param`` is the local shard). The density (30 %)
  does not change the bytes. A topology update additionally holds, for its duration, the whole bool
  kept / removed masks of every sparse matrix (2 bytes per sparse weight) plus about four float32
  copies of the largest matrix (gathered weight, dense gradient, scores): ``update_transient``.
Activations and FSDP2's all-gather buffers (one wrapped block's parameters at a time) are not counted.

    python bench/scaling_memory.py            # LLaMA 1.3B and 7B, W = 1 and 8, SST r = 64
    python bench/scaling_memory.py --quick    # a 2-block model, seconds
"""

from __future__ import annotations

import re

import torch
from harness import command_line, environment, llama_config, output_path, parser, print_table, write_json

import leanformers
from leanformers.chts.config import DEFAULT_TARGETS

GiB = 1024**3
# LLaMA shapes (hidden, intermediate, blocks, heads), vocabulary 32000: the SST paper's 1.3B and LLaMA-7B.
MODELS = {
    "llama-1.3b": (2048, 5461, 24, 32),
    "llama-7b": (4096, 11008, 32, 32),
}
QUICK_MODELS = {"llama-tiny": (256, 688, 2, 4)}
WORLD_SIZES = (1, 8)
SST_RANK = 64
DENSITY = 0.3
FP32, ADAM_MOMENTS = 4, 2


def build(shape: tuple[int, int, int, int], vocab: int) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    hidden, inter, blocks, heads = shape
    cfg = llama_config(
        hidden, inter, blocks, heads, vocab=vocab, max_positions=2048, tie_word_embeddings=False
    )
    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


def _shard(numel: int, world: int) -> int:
    return -(-numel // world)  # torch.chunk sizes: the largest shard


def _layout(model: torch.nn.Module) -> dict[str, int]:
    """Element counts: trainable / frozen parameters, buffers (bytes), of a (meta) model."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    return {"trainable": trainable, "frozen": frozen, "buffer_bytes": buffer_bytes}


def per_gpu(layout: dict[str, int], world: int, state_sharded: int = 0, state_replicated: int = 0) -> dict:
    """Bytes per GPU (GiB) of parameters, gradients, AdamW moments and the method's state."""
    params = _shard(layout["trainable"] + layout["frozen"], world) * FP32
    grads = _shard(layout["trainable"], world) * FP32
    moments = _shard(layout["trainable"], world) * FP32 * ADAM_MOMENTS
    state = _shard(state_sharded, world) + state_replicated + layout["buffer_bytes"]
    out = {"params": params, "grads": grads, "moments": moments, "method_state": state}
    out["total"] = sum(out.values())
    return {k: round(v / GiB, 3) for k, v in out.items()}


def measure(name: str, shape, vocab: int, worlds, rank: int) -> list[dict]:
    rows = []
    model = build(shape, vocab)
    dense = _layout(model)
    pattern = [re.compile(p) for p in DEFAULT_TARGETS]
    sparse = [
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and any(p.search(n) for p in pattern)
    ]
    n_sparse, largest = sum(sparse), max(sparse)
    for world in worlds:
        base = {
            "model": name,
            "parameters_M": round((dense["trainable"] + dense["frozen"]) / 1e6, 1),
            "world": world,
        }
        rows.append({**base, "method": "dense", **per_gpu(dense, world)})
        chtss = per_gpu(dense, world, state_sharded=n_sparse)  # 1 bool per sparse weight, per shard
        transient = 2 * n_sparse + 4 * FP32 * largest
        rows.append(
            {**base, "method": f"chtss d={DENSITY}", **chtss, "update_transient": round(transient / GiB, 3)}
        )
    # SST: applied for real to the meta model, so that parameters vs buffers come from the code.
    from peft import get_peft_model

    from leanformers import SSTConfig

    sst_model = get_peft_model(model, SSTConfig(r=rank, target_modules="all-linear", mode="pretrain"))
    sst = _layout(sst_model)
    for world in worlds:
        base = {
            "model": name,
            "parameters_M": round((dense["trainable"] + dense["frozen"]) / 1e6, 1),
            "world": world,
        }
        row = {**base, "method": f"sst r={rank}", **per_gpu(sst, world)}
        row["sst_trainable_M"] = round(sst["trainable"] / 1e6, 1)
        row["sst_frozen_buffers_GiB"] = round(sst["buffer_bytes"] / GiB, 3)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__, "a 2-block LLaMA (seconds)")
    ap.add_argument("--sst-rank", type=int, default=SST_RANK)
    args = ap.parse_args(argv)
    models = QUICK_MODELS if args.quick else MODELS
    vocab = 512 if args.quick else 32000
    rows = []
    for name, shape in models.items():
        rows.extend(measure(name, shape, vocab, WORLD_SIZES, 8 if args.quick else args.sst_rank))
    columns = [
        "model",
        "world",
        "method",
        "params",
        "grads",
        "moments",
        "method_state",
        "total",
        "update_transient",
    ]
    print_table(rows, columns)
    result = {
        "command": command_line("bench/scaling_memory.py", argv),
        "environment": environment("meta"),
        "leanformers": leanformers.__version__,
        "units": "GiB per GPU (persistent): fp32 parameters / gradients / AdamW moments, FSDP2 dim-0 shards",
        "rows": rows,
    }
    write_json(output_path(args, "scaling_memory"), result)
    return result


if __name__ == "__main__":
    main()
