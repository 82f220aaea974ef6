"""Issue 12 — SST under FSDP2: model-state memory per GPU of LLaMA 1.3B / 7B, computed on the meta device.

The SST model is built on the meta device (no SVD, shapes only), its frozen U / Vh become frozen parameters
(``frozen_factors_as_parameters``, what ``SSTCallback`` does for FSDP2) and every tensor is counted:

- ``sharded``: what each of N ranks holds between steps: (trainable parameters + AdamW's 2 moments +
  frozen U / Vh) / N, fp32 (bf16 U / Vh with ``--frozen bfloat16``); gradients are sharded too (+ trainable / N);
- ``peak_unit``: what one FSDP unit (the largest decoder layer) adds while it runs: its gathered factors and,
  per SST layer in turn, the dense effective weight U_eff diag(S) Vh_eff (one at a time);
- ``ddp``: the same model without sharding (every rank holds everything), for comparison.

Activations are not counted (they depend on batch, sequence and checkpointing, as for any model).

    python bench/sst_fsdp_memory.py            # 1.3B and 7B, r = hidden / 4 and hidden / 8, N = 8
"""

from __future__ import annotations

import torch
from harness import command_line, environment, output_path, parser, print_table, write_json
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from leanformers import SSTConfig
from leanformers.sst import find_sst_layers, frozen_factors_as_parameters

SHAPES = {  # hidden, intermediate, layers, heads, vocab (SST / GaLore LLaMA configs; 7B: LLaMA-2-7B)
    "llama_1.3b": (2048, 5461, 24, 32, 32000),
    "llama_7b": (4096, 11008, 32, 32, 32000),
}
GIB = 2**30


def measure(name: str, r: int, world: int, frozen: str) -> dict:
    hidden, inter, layers, heads, vocab = SHAPES[name]
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        vocab_size=vocab,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = get_peft_model(LlamaForCausalLM(cfg), SSTConfig(r=r, frozen_factor_dtype=frozen))
    frozen_factors_as_parameters(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    dense = sum(m.out_features * m.in_features for m in find_sst_layers(model).values())
    dense += sum(p.numel() for n, p in model.named_parameters() if ".sst_" not in n and p.numel())
    state = trainable * 4 * 4 + frozen_bytes  # fp32 parameter, gradient, 2 AdamW moments; U / Vh
    block = model.base_model.model.model.layers[0]
    unit = sum(p.numel() * p.element_size() for p in block.parameters())
    unit += max(m.out_features * m.in_features for m in find_sst_layers(block).values()) * 4
    return {
        "model": name,
        "dense_params_B": round(dense / 1e9, 3),
        "r": r,
        "frozen_dtype": frozen,
        "world": world,
        "trainable_M": round(trainable / 1e6, 1),
        "frozen_U_Vh_GiB": round(frozen_bytes / GIB, 2),
        "ddp_GiB": round(state / GIB, 2),
        "sharded_GiB": round(state / world / GIB, 2),
        "peak_unit_GiB": round(unit / GIB, 3),
    }


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__, quick_help="1.3B only")
    ap.add_argument("--world", type=int, default=8)
    args = ap.parse_args(argv)
    rows = []
    for name in ["llama_1.3b"] if args.quick else list(SHAPES):
        hidden = SHAPES[name][0]
        for r in (hidden // 4, hidden // 8):
            for frozen in ("float32", "bfloat16"):
                rows.append(measure(name, r, args.world, frozen))
    print_table(rows, list(rows[0]))
    write_json(
        output_path(args, "sst_fsdp_memory"),
        {"command": command_line("sst_fsdp_memory", argv), "environment": environment(), "rows": rows},
    )


if __name__ == "__main__":
    main()
