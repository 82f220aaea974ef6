"""BENCHMARKS.md section 4: SST pretraining cost (memory, speed) and small-scale quality.

(a) ``--part cost``: LLaMA shapes with random init, one training step loop per method (full-rank,
    LoRA + trainable embeddings/head/norms, GaLore (galore-torch's GaLoreAdamW, the optimizer behind
    transformers' ``optim="galore_adamw"``), SST), AdamW, bf16 autocast on CUDA (fp32 on CPU).
    Reports model-state memory (weights + buffers + grads + optimizer state, counted tensor by
    tensor), peak GPU memory (CUDA only) and tokens/s, with ratios to full-rank.
(b) ``--part quality``: pretrain a small LLaMA from scratch with the SmolLM2 tokenizer on Python
    standard-library source (held-out files for validation), same steps/tokens/LR schedule for
    full-rank, LoRA and SST; reports validation perplexity and the share of the LoRA -> full-rank
    gap that SST closes.

Examples::

    python bench/sst_pretrain.py --quick                          # CPU smoke test, seconds
    python bench/sst_pretrain.py --part cost --sizes 130m 1.3b    # H100
    python bench/sst_pretrain.py --part quality --preset gpu      # H100
    python bench/sst_pretrain.py --part quality --preset cpu      # 2-core CPU, ~15 min

Prints a table last and writes JSON under bench/results/.
"""

from __future__ import annotations

import gc
import sys
import time

import torch
from harness import environment, output_path, parser, sync, write_json
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from leanformers.sst import SSTConfig, SSTController

SIZES = {
    # the paper's LLaMA-130M and LLaMA-1.3B (vocab 32000, as with the T5 tokenizer they use)
    "130m": {
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
    },
    "1.3b": {
        "hidden_size": 2048,
        "intermediate_size": 5461,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
    },
    "small": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4},
    "tiny": {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2, "num_attention_heads": 4},
}
METHODS = ("full", "lora", "galore", "sst", "sst-bf16")
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama(size: str | dict, vocab: int, seq: int, seed: int = 0) -> LlamaForCausalLM:
    spec = dict(SIZES[size]) if isinstance(size, str) else dict(size)
    spec.setdefault("num_key_value_heads", spec["num_attention_heads"])
    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=seq, tie_word_embeddings=False, **spec)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def wrap(model: torch.nn.Module, method: str, rank: int, steps_per_iteration: int = 200):
    """(model, optimizer param groups, controller factory) for one method."""
    if method == "full":
        return model, [{"params": [p for p in model.parameters() if p.requires_grad]}], None
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=list(BLOCK_LINEARS)))
        for name, p in model.named_parameters():  # the paper's LoRA baseline trains embeddings, head, norms
            if "lora_" not in name and ("embed_tokens" in name or "lm_head" in name or "norm" in name):
                p.requires_grad_(True)
        return model, [{"params": [p for p in model.parameters() if p.requires_grad]}], None
    if method == "galore":
        galore, regular = [], []
        for name, p in model.named_parameters():
            (galore if any(f".{n}." in name for n in BLOCK_LINEARS) else regular).append(p)
        groups = [
            {"params": regular},
            {"params": galore, "rank": rank, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"},
        ]
        return model, groups, None
    if method in ("sst", "sst-bf16"):
        warmup = max(1, steps_per_iteration // 10)  # the paper: 20 of 200
        cfg = SSTConfig(
            r=rank,
            steps_per_iteration=steps_per_iteration,
            warmup_steps_per_iteration=warmup,
            frozen_factor_dtype="bfloat16" if method == "sst-bf16" else "float32",
        )
        model = get_peft_model(model, cfg)
        return model, [{"params": [p for p in model.parameters() if p.requires_grad]}], SSTController
    raise ValueError(f"unknown method {method!r}")


def make_optimizer(method: str, groups, lr: float):
    if method == "galore":
        from galore_torch import GaLoreAdamW  # needs `pip install galore-torch` (+ bitsandbytes to import)

        return GaLoreAdamW(groups, lr=lr, weight_decay=0.0)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen and t.numel() > 0:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def optimizer_state_bytes(optimizer) -> int:
    tensors = []
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                tensors.append(value)
            elif hasattr(value, "ortho_matrix") and isinstance(value.ortho_matrix, torch.Tensor):
                tensors.append(value.ortho_matrix)  # GaLore projector
    return tensor_bytes(tensors)


# ------------------------------------------------------------------------------------------ (a) cost
def run_cost(size, method, *, rank, batch, seq, steps, warmup_steps, device, vocab) -> dict:
    row = {"size": size, "method": method, "rank": rank}
    if method == "galore":
        try:
            import galore_torch  # noqa: F401
        except Exception as exc:  # ImportError, or bitsandbytes missing at import
            row["error"] = f"galore-torch not importable ({type(exc).__name__}: {exc})"
            return row
    model = llama(size, vocab, seq).to(device)
    n_dense = sum(p.numel() for p in model.parameters())
    model, groups, controller_cls = wrap(model, method, rank)
    model.train()
    optimizer = make_optimizer(method, groups, 1e-4)
    controller = controller_cls(model, optimizer) if controller_cls else None
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    grads_bytes = 0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = None
    for step in range(warmup_steps + steps):
        if step == warmup_steps:
            sync(device)
            t0 = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == 0:
            grads_bytes = tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if controller is not None:
            controller.step(optimizer)
    sync(device)
    elapsed = time.perf_counter() - t0
    weights = tensor_bytes(list(model.parameters()) + list(model.buffers()))
    opt = optimizer_state_bytes(optimizer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    row.update(_state(n_dense, trainable, weights, grads_bytes, opt))
    row.update({"tokens_per_s": batch * seq * steps / elapsed, "loss": float(loss.detach())})
    if device.type == "cuda":
        row["peak_GB"] = torch.cuda.max_memory_allocated(device) / 1e9
    del model, optimizer, controller
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def count_model_state(size, method, *, rank, vocab) -> dict:
    """Model-state bytes counted on the meta device (no memory, no time): fp32 weights and buffers,
    fp32 grads of trainable parameters and two fp32 AdamW moments per trainable parameter. Exact for
    full-rank, LoRA and SST (whose state is exactly these tensors); GaLore is measured only."""
    row = {"size": size, "method": method, "rank": rank, "counted": "meta"}
    if method == "galore":
        row["error"] = "counted only when measured (projector state)"
        return row
    with torch.device("meta"):
        model = llama(size, vocab, 256)
    n_dense = sum(p.numel() for p in model.parameters())
    model, _, _ = wrap(model, method, rank)
    weights = sum(
        t.numel() * t.element_size()
        for t in list(model.parameters()) + list(model.buffers())
        if t.is_floating_point()
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    row.update(_state(n_dense, trainable, weights, trainable * 4, trainable * 8))
    return row


def _state(n_dense: int, trainable: int, weights: int, grads: int, optimizer: int) -> dict:
    """The model-state columns of a cost row (bytes in, GB out)."""
    return {
        "dense_parameters": n_dense,
        "trainable_parameters": trainable,
        "trainable_share": trainable / n_dense,
        "weights_GB": weights / 1e9,
        "grads_GB": grads / 1e9,
        "optimizer_GB": optimizer / 1e9,
        "model_state_GB": (weights + grads + optimizer) / 1e9,
    }


def _rank_and_vocab(size: str, rank: int | None) -> tuple[int, int]:
    """Default rank per size (the paper's 64 at 130m, 128 at 1.3b) and the vocabulary of the size."""
    rank = rank or {"1.3b": 128, "130m": 64, "small": 32}.get(size, 16)
    return rank, 32000 if size in ("130m", "1.3b") else 4096


def add_ratios(rows: list[dict]) -> None:
    by_size = {}
    for row in rows:
        if row["method"] == "full" and "error" not in row:
            by_size[row["size"]] = row
    for row in rows:
        ref = by_size.get(row["size"])
        if ref is None or "error" in row:
            continue
        row["model_state_vs_full"] = row["model_state_GB"] / ref["model_state_GB"]
        if "tokens_per_s" in row and "tokens_per_s" in ref:
            row["tokens_per_s_vs_full"] = row["tokens_per_s"] / ref["tokens_per_s"]
        if "peak_GB" in row and "peak_GB" in ref:
            row["peak_vs_full"] = row["peak_GB"] / ref["peak_GB"]


def cost_table(rows: list[dict]) -> str:
    head = "| size | method | trainable % | model state GB | vs full | peak GB | tokens/s | vs full |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['method']} | {r['error']} | | | | | |")
            continue
        peak = f"{r['peak_GB']:.2f}" if "peak_GB" in r else "n/a (CPU)"
        if r.get("counted") == "meta":
            peak, speed = "counted on meta", "not timed | -"
        else:
            speed = f"{r['tokens_per_s']:.0f} | {r.get('tokens_per_s_vs_full', float('nan')):.2f}x"
        lines.append(
            f"| {r['size']} | {r['method']} | {100 * r['trainable_share']:.1f} | {r['model_state_GB']:.3f} | "
            f"{r.get('model_state_vs_full', float('nan')):.2f}x | {peak} | {speed} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ (b) quality
# LLaMA hidden 64, FFN 172, 2 layers, 4 heads: the model of the quick and cpu quality presets
TINY_QUALITY_MODEL = {
    "hidden_size": 64,
    "intermediate_size": 172,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
QUALITY_PRESETS = {
    # tokens per run = steps * batch * seq
    "quick": {
        "model": TINY_QUALITY_MODEL,
        "rank": 8,
        "steps": 8,
        "batch": 4,
        "seq": 64,
        "lr": 3e-3,
        "spi": 4,
        "train_chars": 300_000,
        "eval_tokens": 4096,
    },
    # what a shared 2-core CPU finishes in ~15 min for the three methods (a smoke-scale comparison)
    "cpu": {
        "model": TINY_QUALITY_MODEL,
        "rank": 8,
        "steps": 150,
        "batch": 4,
        "seq": 64,
        "lr": 3e-3,
        "spi": 15,
        "train_chars": 1_000_000,
        "eval_tokens": 16384,
    },
    # The same model for bench/gpu_suite.py: 300 steps x 64 x 256 = 4.9M tokens per method, an
    # estimated ~15 s per method on an H200 (not measured yet), in the suite's 9-minute budget.
    "suite": {
        "model": {
            "hidden_size": 512,
            "intermediate_size": 1376,
            "num_hidden_layers": 8,
            "num_attention_heads": 8,
        },
        "rank": 64,
        "steps": 300,
        "batch": 64,
        "seq": 256,
        "lr": 1e-3,
        "spi": 100,
        "train_chars": 8_000_000,
        "eval_tokens": 131_072,
    },
    # LLaMA-60M-like on an H100 (about 40 min for the three runs)
    "gpu": {
        "model": {
            "hidden_size": 512,
            "intermediate_size": 1376,
            "num_hidden_layers": 8,
            "num_attention_heads": 8,
        },
        "rank": 64,
        "steps": 10000,
        "batch": 64,
        "seq": 256,
        "lr": 1e-3,
        "spi": 200,
        "train_chars": None,
        "eval_tokens": 1_000_000,
    },
}


def load_corpus(tokenizer, train_chars: int | None, eval_tokens: int):
    from leanformers.data import tokenize_text
    from leanformers.train import load_source

    train_text = load_source("stdlib:train")
    eval_text = load_source("stdlib:eval")
    if train_chars:
        train_text = train_text[:train_chars]
    eval_text = eval_text[: eval_tokens * 8]
    return tokenize_text(train_text, tokenizer), tokenize_text(eval_text, tokenizer)[:eval_tokens]


def run_quality(method, preset, train_ids, eval_ids, vocab, device, seed=0) -> dict:
    from transformers import get_cosine_schedule_with_warmup

    from leanformers.eval import perplexity

    p = QUALITY_PRESETS[preset]
    seq, batch, steps = p["seq"], p["batch"], p["steps"]
    model = llama(p["model"], vocab, seq, seed=seed).to(device)
    model, groups, controller_cls = wrap(model, method, p["rank"], steps_per_iteration=p["spi"])
    optimizer = make_optimizer(method, groups, p["lr"])
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 10), steps)
    controller = controller_cls(model, optimizer) if controller_cls else None
    blocks = train_ids[: (train_ids.numel() // seq) * seq].view(-1, seq)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )
    model.train()
    t0 = time.perf_counter()
    losses = []
    for step in range(steps):
        idx = order[(torch.arange(batch) + step * batch) % len(blocks)]
        ids = blocks[idx].to(device)
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([q for g in groups for q in g["params"]], 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if controller is not None:
            controller.step(optimizer)
        losses.append(float(loss.detach()))
    train_seconds = time.perf_counter() - t0
    result = perplexity(model, text=eval_ids, seqlen=seq, batch_size=8, progress=False)
    return {
        "method": method,
        "preset": preset,
        "val_ppl": result.ppl,
        "val_tokens": result.n_tokens,
        "final_train_loss": sum(losses[-10:]) / len(losses[-10:]),
        "train_tokens": steps * batch * seq,
        "train_seconds": train_seconds,
        "epochs": steps * batch / len(blocks),
    }


def quality_table(rows: list[dict]) -> str:
    lines = ["| method | val ppl | final train loss | train tokens | seconds |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['val_ppl']:.2f} | {r['final_train_loss']:.3f} | {r['train_tokens']:,} | "
            f"{r['train_seconds']:.0f} |"
        )
    ppl = {r["method"]: r["val_ppl"] for r in rows}
    if {"full", "lora", "sst"} <= ppl.keys() and ppl["lora"] != ppl["full"]:
        closed = (ppl["lora"] - ppl["sst"]) / (ppl["lora"] - ppl["full"])
        lines.append(
            f"\nSST closes {100 * closed:.0f} % of the LoRA -> full-rank perplexity gap (target >= 60 %)."
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__.split("\n\n")[0], "CPU smoke test: tiny shapes, few steps")
    ap.add_argument("--part", choices=["cost", "quality", "both"], default="both")
    ap.add_argument("--sizes", nargs="+", default=["130m", "1.3b"], choices=list(SIZES))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument(
        "--rank", type=int, default=None, help="LoRA / GaLore / SST rank (64 at 130m, 128 at 1.3b)"
    )
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--preset", choices=list(QUALITY_PRESETS), default="gpu")
    ap.add_argument(
        "--count-only",
        nargs="*",
        default=[],
        choices=list(SIZES),
        metavar="SIZE",
        help="sizes whose model-state memory is only counted on the meta device (e.g. 1.3b on a CPU)",
    )
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        args.sizes, args.batch, args.seq, args.steps, args.preset = ["tiny"], 2, 64, 3, "quick"
    report = {"environment": environment(device), "args": vars(args)}
    text = []
    if args.part in ("cost", "both"):
        rows = []
        for size in args.sizes:
            rank, vocab = _rank_and_vocab(size, args.rank)
            for method in args.methods:
                print(f"cost: {size} {method} ...", file=sys.stderr, flush=True)
                rows.append(
                    run_cost(
                        size,
                        method,
                        rank=rank,
                        batch=args.batch,
                        seq=args.seq,
                        steps=args.steps,
                        warmup_steps=2,
                        device=device,
                        vocab=vocab,
                    )
                )
        for size in args.count_only:
            rank, vocab = _rank_and_vocab(size, args.rank)
            for method in args.methods:
                rows.append(count_model_state(size, method, rank=rank, vocab=vocab))
        add_ratios(rows)
        report["cost"] = rows
        dtype = "bf16 autocast" if device.type == "cuda" else "fp32"
        text.append(
            f"## (a) cost: seq {args.seq}, batch {args.batch}, {args.steps} timed steps, AdamW, {dtype}\n"
        )
        text.append(cost_table(rows))
    if args.part in ("quality", "both"):
        from leanformers.train import build_tokenizer

        tokenizer = build_tokenizer("smollm2")
        preset = QUALITY_PRESETS[args.preset]
        train_ids, eval_ids = load_corpus(tokenizer, preset["train_chars"], preset["eval_tokens"])
        rows = []
        for method in [m for m in args.methods if m in ("full", "lora", "sst", "sst-bf16")]:
            print(f"quality: {method} ...", file=sys.stderr, flush=True)
            rows.append(run_quality(method, args.preset, train_ids, eval_ids, len(tokenizer), device))
        report["quality"] = rows
        report["quality_setup"] = {
            "preset": preset,
            "train_corpus_tokens": train_ids.numel(),
            "tokenizer": "SmolLM2-135M",
        }
        text.append(
            f"\n## (b) quality: preset {args.preset} ({preset['model']}, r={preset['rank']}), SmolLM2 tokenizer, "
            f"stdlib source ({train_ids.numel():,} train tokens, {eval_ids.numel():,} held-out tokens, context {preset['seq']})\n"
        )
        text.append(quality_table(rows))
    out = write_json(output_path(args, "sst_pretrain"), report)
    print(f"\n{report['environment']}\n")
    print("\n".join(text))
    print(f"\nJSON: {out}")
    return report


if __name__ == "__main__":
    main()
