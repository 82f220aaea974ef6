"""Issue 12 — memory per GPU under FSDP2 for dense, CHTss and SST LLaMA 1.3B / 7B (meta device).

Nothing is trained: each model is built on the meta device (shapes only, no memory), the method is
applied for real where it changes the parameter layout, and the bytes per GPU are counted from the
resulting tensors:

- FSDP2 (``fully_shard``) shards every parameter on dim 0 over the W ranks (padded to a multiple of W:
  a rank holds ceil(rows / W) rows of each tensor). Gradients and AdamW's two moments exist for trainable
  parameters only and are sharded like them; all fp32 (bf16 mixed precision computes in bf16 but keeps
  the sharded fp32 copy). Buffers are not sharded: every rank holds them whole.
- SST: applied through peft on the meta model, then ``frozen_factors_as_parameters`` turns the frozen U / Vh
  into ``requires_grad=False`` parameters, which is what ``SSTCallback`` does when the Trainer is set up for
  FSDP2. FSDP2 therefore shards them (no gradient, no moments), at their storage dtype
  (``frozen_factor_dtype``: float32 or bfloat16 rows). The indices and counters stay replicated buffers.
  Ranks: 64 and hidden / 4, hidden / 8.
- CHTss: the dense weights stay (zeros off the links) and train densely; its state is one bool per sparse
  weight, held per shard (``SparseLayer.mask_param`` is the local shard). The density (30 %) does not change
  the bytes. A topology update additionally holds, for its duration, the whole bool kept / removed masks of
  every sparse matrix (2 bytes per sparse weight) plus about four float32 copies of the largest matrix
  (gathered weight, dense gradient, scores): ``update_transient``, which does not shrink with W.
- ``peak_unit``: what the running FSDP unit adds while it runs: the whole parameters of the largest decoder
  block at their storage dtype (with the recipe's bf16 mixed precision FSDP2 gathers them in bf16: about
  half) and, for SST, one layer's dense effective weight U_eff diag(S) Vh_eff in fp32 (built one at a time).
Activations are not counted (they depend on batch, sequence and checkpointing, as for any model).

    python bench/scaling_memory.py            # LLaMA 1.3B and 7B, W = 1 and 8
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
FROZEN_DTYPES = ("float32", "bfloat16")
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


def shard_numel(t: torch.Tensor, world: int) -> int:
    """Elements of the largest dim-0 shard of ``t`` over ``world`` ranks (FSDP2 pads dim 0)."""
    if t.numel() == 0:
        return 0
    rows = t.shape[0] if t.dim() else 1
    return -(-rows // world) * (t.numel() // rows)


def per_gpu(model: torch.nn.Module, world: int, mask_numel: int = 0) -> dict:
    """Bytes per GPU (GiB) of parameters, gradients, AdamW moments and the method's state under FSDP2.

    ``mask_numel``: CHTss bool mask elements (1 byte each), sharded like the weights they mask.
    """
    params = grads = 0
    for p in model.parameters():
        local = shard_numel(p, world)
        params += local * p.element_size()
        if p.requires_grad:
            grads += local * FP32
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # replicated
    out = {
        "params": params,
        "grads": grads,
        "moments": grads * ADAM_MOMENTS,
        "method_state": -(-mask_numel // world) + buffers,
    }
    out["total"] = sum(out.values())
    return {k: round(v / GiB, 6) for k, v in out.items()}


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]


def peak_unit(model: torch.nn.Module) -> float:
    """GiB the running FSDP unit adds: the largest block's whole parameters (+ SST's dense weight)."""
    from leanformers.sst import find_sst_layers

    worst = 0
    for block in _blocks(model):
        nbytes = sum(p.numel() * p.element_size() for p in block.parameters())
        sst = find_sst_layers(block)
        if sst:
            nbytes += max(m.out_features * m.in_features for m in sst.values()) * FP32
        worst = max(worst, nbytes)
    return round(worst / GiB, 6)


def measure(name: str, shape, vocab: int, worlds, ranks) -> list[dict]:
    from peft import get_peft_model

    from leanformers import SSTConfig
    from leanformers.sst import frozen_factors_as_parameters

    rows = []
    dense_model = build(shape, vocab)
    n_dense = sum(p.numel() for p in dense_model.parameters())
    pattern = [re.compile(p) for p in DEFAULT_TARGETS]
    sparse = [
        m.weight.numel()
        for n, m in dense_model.named_modules()
        if isinstance(m, torch.nn.Linear) and any(p.search(n) for p in pattern)
    ]
    n_sparse, largest = sum(sparse), max(sparse)
    dense_unit = peak_unit(dense_model)
    models = []
    for r in ranks:
        for dtype in FROZEN_DTYPES:
            # SST on the meta model: no SVD, shapes only; the layout (parameters vs buffers) comes from the code
            sst_model = get_peft_model(
                build(shape, vocab),
                SSTConfig(r=r, target_modules="all-linear", mode="pretrain", frozen_factor_dtype=dtype),
            )
            frozen_factors_as_parameters(sst_model)  # what SSTCallback does for FSDP2
            models.append((r, dtype, sst_model))
    for world in worlds:
        base = {"model": name, "parameters_M": round(n_dense / 1e6, 1), "world": world}
        rows.append({**base, "method": "dense", **per_gpu(dense_model, world), "peak_unit": dense_unit})
        transient = 2 * n_sparse + 4 * FP32 * largest
        rows.append(
            {
                **base,
                "method": f"chtss d={DENSITY}",
                **per_gpu(dense_model, world, mask_numel=n_sparse),  # 1 bool per sparse weight, per shard
                "peak_unit": dense_unit,
                "update_transient": round(transient / GiB, 6),
            }
        )
        for r, dtype, sst_model in models:
            frozen = [p for p in sst_model.parameters() if not p.requires_grad]
            row = {**base, "method": f"sst r={r} {dtype}", "r": r, "frozen_dtype": dtype}
            row.update(per_gpu(sst_model, world))
            row["peak_unit"] = peak_unit(sst_model)
            row["sst_trainable_M"] = round(
                sum(p.numel() for p in sst_model.parameters() if p.requires_grad) / 1e6, 1
            )
            row["frozen_U_Vh_GiB"] = round(sum(p.numel() * p.element_size() for p in frozen) / GiB, 6)
            row["frozen_U_Vh_per_gpu_GiB"] = round(
                sum(shard_numel(p, world) * p.element_size() for p in frozen) / GiB, 6
            )
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__, "a 2-block LLaMA (seconds)")
    ap.add_argument(
        "--sst-rank", type=int, default=SST_RANK, help="the fixed SST rank (also hidden/4, hidden/8)"
    )
    args = ap.parse_args(argv)
    models = QUICK_MODELS if args.quick else MODELS
    vocab = 512 if args.quick else 32000
    rows = []
    for name, shape in models.items():
        hidden = shape[0]
        ranks = (8, hidden // 4) if args.quick else (args.sst_rank, hidden // 4, hidden // 8)
        rows.extend(measure(name, shape, vocab, WORLD_SIZES, ranks))
    columns = [
        "model",
        "world",
        "method",
        "params",
        "grads",
        "moments",
        "method_state",
        "total",
        "peak_unit",
        "update_transient",
    ]
    print_table(
        [{k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()} for row in rows], columns
    )
    result = {
        "command": command_line("scaling_memory", argv),
        "environment": {**environment(), "device": "meta (shapes only: computed, not measured)"},
        "leanformers": leanformers.__version__,
        "units": (
            "GiB per GPU under FSDP2 (dim-0 shards): fp32 parameters (SST's frozen U/Vh at frozen_dtype, "
            "sharded) / gradients / AdamW moments of trainable parameters, method state (CHTss masks sharded, "
            "buffers replicated); peak_unit and update_transient are transient, not in total"
        ),
        "rows": rows,
    }
    write_json(output_path(args, "scaling_memory"), result)
    return result


if __name__ == "__main__":
    main()
