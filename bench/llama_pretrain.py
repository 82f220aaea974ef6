"""Issue 11, experiments 3 and 4: pretrain one small LLaMA from scratch per row, at equal tokens.

One model shape, corpus, tokenizer, token budget, learning-rate schedule and evaluation for every row:

- experiment 3 (CHTs/CHTss abstract): ``dense`` vs dynamic sparse training at 30 % density of the
  q/k/v/o/gate/up/down linears: ``set``, ``rigl``, ``chts``, ``chtss`` (``CHTssConfig.for_method``,
  the settings of bench/chtss_train.py's LLaMA part), with zero-shot accuracy (``--zero-shot``);
- experiment 4 (SST abstract): full-rank (= ``dense``) vs ``lora`` vs ``sst`` at one rank
  (bench/sst_pretrain.py's wrappers: LoRA and SST both train embeddings, head and norms).

Corpus: WikiText-2 (v1) validation split for training, its test split for validation perplexity
(in domain) and Tiny Shakespeare for an out-of-domain perplexity; SmolLM2-135M tokenizer (offline).
Rows are stored per (method, seed) under a file lock, so parallel processes can fill one JSON.

    python bench/llama_pretrain.py --quick                                       # CI smoke, seconds
    python bench/llama_pretrain.py --methods dense lora sst --seeds 0 1 2        # experiment 4
    python bench/llama_pretrain.py --methods set rigl chts chtss --seeds 0 1 2   # experiment 3
    python bench/llama_pretrain.py --table                                       # tables of the JSON

Prints a table last and writes bench/results/llama_pretrain.json.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from harness import environment, output_path, parser, write_json
from sst_pretrain import llama, make_optimizer, wrap

DST_METHODS = ("set", "rigl", "chts", "chtss", "static", "cht_l3n")
METHODS = ("dense", "lora", "sst", *DST_METHODS)
ZERO_SHOT_TASKS = ("arc_easy", "piqa", "lambada_openai")

# 28.3M parameters with the 49,152-token vocabulary (25.2M of them embedding and head, as in the
# papers' LLaMA-60M, whose 58M hold 33M of embedding and head).
MODEL = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4}
SETTING = {
    "model": MODEL,
    "steps": 160,
    "batch": 4,
    "seq": 256,  # 160 x 4 x 256 = 163,840 tokens per row, < 1 epoch of the training text
    "lr": 3e-3,  # AdamW, 10 % warm-up then cosine to 0, clip 1.0 (bench/sst_pretrain.py's quality loop)
    "rank": 32,  # LoRA / SST rank: 12.5 % of the hidden size
    "sst_steps_per_iteration": 40,  # 4 SST rounds, re-warm-up 10 % of each (the paper's 20 of 200)
    "density": 0.3,
    "update_interval": 10,  # DST rewiring every 10 steps until 75 % of training (bench/chtss_train.py)
    "zeta": 0.1,
    "eval_tokens": 32768,
    "zero_shot_limit": 500,
}
QUICK = {
    **SETTING,
    "model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
    "steps": 4,
    "batch": 2,
    "seq": 32,
    "rank": 4,
    "sst_steps_per_iteration": 2,
    "update_interval": 1,
    "eval_tokens": 256,
    "zero_shot_limit": 2,
}


def load_texts(tokenizer, eval_tokens: int) -> dict[str, torch.Tensor]:
    from leanformers.data import shared_data_path, tokenize_text

    def ids(name: str, limit: int | None = None) -> torch.Tensor:
        out = tokenize_text(shared_data_path(name).read_text(encoding="utf-8"), tokenizer)
        return out[:limit] if limit else out

    return {
        "train": ids("wikitext-2-v1-valid.txt"),
        "wikitext2_test": ids("wikitext-2-v1-test.txt", eval_tokens),
        "tinyshakespeare": ids("tinyshakespeare.txt", eval_tokens),
    }


def block_density(model: torch.nn.Module) -> float:
    """Share of non-zero weights in the q/k/v/o/gate/up/down linears (read from the weights)."""
    nonzero = total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in (
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
        ):  # fmt: skip
            nonzero += int(torch.count_nonzero(module.weight))
            total += module.weight.numel()
    return nonzero / total


def train_row(method: str, seed: int, s: dict, texts: dict, vocab: int, tokenizer, zero_shot_tasks) -> dict:
    from transformers import get_cosine_schedule_with_warmup

    from leanformers.chts import CHTssConfig, CHTssScheduler
    from leanformers.eval import perplexity
    from leanformers.eval.zeroshot import accuracy_table, zero_shot

    seq, batch, steps = s["seq"], s["batch"], s["steps"]
    model = llama(s["model"], vocab, seq, seed=seed)
    n_params = sum(p.numel() for p in model.parameters())
    wrapped, groups, controller_cls = wrap(
        model,
        "full" if method in ("dense", *DST_METHODS) else method,
        s["rank"],
        s["sst_steps_per_iteration"],
    )
    optimizer = make_optimizer("full", groups, s["lr"])
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 10), steps)
    controller = controller_cls(wrapped, optimizer) if controller_cls else None
    dst = None
    if method in DST_METHODS:
        cfg = CHTssConfig.for_method(
            method,
            final_density=s["density"],
            update_interval=s["update_interval"],
            zeta=s["zeta"],
            seed=seed,
        )
        dst = CHTssScheduler(wrapped, optimizer, cfg, total_steps=steps)
    blocks = texts["train"][: (texts["train"].numel() // seq) * seq].view(-1, seq)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    wrapped.train()
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        ids = blocks[order[(torch.arange(batch) + step * batch) % len(blocks)]]
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([q for g in groups for q in g["params"]], 1.0)
        optimizer.step()
        if dst is not None:
            dst.step()
        if controller is not None:
            controller.step(optimizer)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    row = {
        "method": method,
        "seed": seed,
        "parameters": n_params,
        "train_tokens": steps * batch * seq,
        "epochs": steps * batch / len(blocks),
        "train_seconds": round(time.perf_counter() - t0, 1),
        "final_train_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4),
    }
    if method in ("dense", *DST_METHODS):  # LoRA / SST hold their weights in factors: no sparsity to read
        row["block_density"] = round(block_density(wrapped), 4)
    wrapped.eval()
    for name in ("wikitext2_test", "tinyshakespeare"):
        result = perplexity(wrapped, text=texts[name], seqlen=seq, batch_size=8, progress=False)
        row[f"ppl_{name}"] = round(result.ppl, 3)
    if zero_shot_tasks:
        t1 = time.perf_counter()
        results = zero_shot(
            wrapped,
            tokenizer,
            list(zero_shot_tasks),
            limit=s["zero_shot_limit"],
            batch_size=16,
            max_length=seq,
        )
        row["zero_shot"] = accuracy_table(results)
        row["zero_shot_seconds"] = round(time.perf_counter() - t1, 1)
    return row


def store(path: Path, rows: list[dict], setting: dict) -> dict:
    import fcntl
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = json.loads(path.read_text()) if path.exists() else {}
        if old and old.get("setting") != setting:
            raise SystemExit(
                f"{path} holds rows of another setting; write elsewhere with --output or delete the file"
            )
        keep = {(r["method"], r["seed"]): r for r in old.get("rows", [])}
        keep.update({(r["method"], r["seed"]): r for r in rows})
        order = {m: i for i, m in enumerate(METHODS)}
        payload = {
            "environment": environment(),
            "setting": setting,
            "rows": sorted(keep.values(), key=lambda r: (order.get(r["method"], 99), r["seed"])),
        }
        write_json(path, payload)
    return payload


def _mean_std(values: list[float], digits: int = 2) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (1 seed)"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def tables(payload: dict) -> str:
    by_method: dict[str, list[dict]] = {}
    for r in payload["rows"]:
        by_method.setdefault(r["method"], []).append(r)
    lines = [
        "| method | seeds | block density | val ppl WikiText-2 test | ppl Tiny Shakespeare | final train loss |",
        "|---|---|---|---|---|---|",
    ]
    for m, rs in by_method.items():
        lines.append(
            f"| {m} | {len(rs)} | {_mean_std([r['block_density'] for r in rs if 'block_density' in r], 3)} | "
            f"{_mean_std([r['ppl_wikitext2_test'] for r in rs])} | {_mean_std([r['ppl_tinyshakespeare'] for r in rs])} | "
            f"{_mean_std([r['final_train_loss'] for r in rs], 3)} |"
        )
    ppl = {m: {r["seed"]: r["ppl_wikitext2_test"] for r in rs} for m, rs in by_method.items()}
    if {"dense", "lora", "sst"} <= ppl.keys():
        seeds = sorted(set(ppl["dense"]) & set(ppl["lora"]) & set(ppl["sst"]))
        closed = [
            (ppl["lora"][k] - ppl["sst"][k]) / (ppl["lora"][k] - ppl["dense"][k])
            for k in seeds
            if ppl["lora"][k] != ppl["dense"][k]
        ]
        if closed:
            lines.append(
                f"\nShare of the LoRA -> full-rank gap (WikiText-2 test ppl) that SST closes, per seed: "
                f"{', '.join(f'{100 * c:.0f} %' for c in closed)}; mean {100 * statistics.mean(closed):.0f} %."
            )
    zs = [(m, rs) for m, rs in by_method.items() if all("zero_shot" in r for r in rs)]
    if zs:
        tasks = list(zs[0][1][0]["zero_shot"])
        lines += ["", "| method | seeds | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
        for m, rs in zs:
            cells = []
            for t in tasks:
                acc = _mean_std([r["zero_shot"][t]["acc"] for r in rs], 3)
                extra = ""
                if t == "lambada_openai":
                    extra = f"; ppl {_mean_std([r['zero_shot'][t]['perplexity'] for r in rs], 0)}"
                cells.append(f"acc {acc}{extra} (n={rs[0]['zero_shot'][t].get('n', '?')})")
            lines.append(f"| {m} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = parser(
        __doc__.split("\n\n")[0],
        "tiny model, 4 steps, 256 evaluation tokens, 2 zero-shot documents (CI smoke test)",
    )
    ap.add_argument("--methods", nargs="+", default=["dense", "lora", "sst", "set", "rigl", "chts", "chtss"],
                    choices=list(METHODS))  # fmt: skip
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--zero-shot", nargs="*", default=None, metavar="TASK",
                    help=f"score every row with lm-eval (no task = {' '.join(ZERO_SHOT_TASKS)})")  # fmt: skip
    ap.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {SETTING['lr']:g})")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table", action="store_true", help="only print the tables of the JSON")
    args = ap.parse_args(argv)
    path = output_path(args, "llama_pretrain")
    if args.table:
        import json

        text = tables(json.loads(path.read_text()))
        print(text)
        return {"text": text}
    torch.set_num_threads(args.threads)
    setting = dict(QUICK if args.quick else SETTING)
    if args.lr is not None:  # a sensitivity run: its own JSON (store refuses to mix settings)
        setting["lr"] = args.lr
    tasks = None if args.zero_shot is None else (args.zero_shot or list(ZERO_SHOT_TASKS))
    from leanformers.train import build_tokenizer

    tokenizer = build_tokenizer("smollm2")
    texts = load_texts(tokenizer, setting["eval_tokens"])
    payload = {}
    for seed in args.seeds:
        for method in args.methods:
            print(f"llama_pretrain: {method} seed {seed} ...", file=sys.stderr, flush=True)
            row = train_row(method, seed, setting, texts, len(tokenizer), tokenizer, tasks)
            print(f"llama_pretrain: {row}", file=sys.stderr, flush=True)
            payload = store(path, [row], {**setting, "train_corpus_tokens": texts["train"].numel()})
    text = tables(payload)
    print(f"\n{payload['environment']}\n")
    print(text)
    print(f"\nJSON: {path}")
    return {**payload, "text": text}


if __name__ == "__main__":
    main()
