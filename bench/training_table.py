"""Training table: one experiment per row, every method on the same model, data, tokens and schedule.

  python bench/training_table.py --rows llama28m --methods dense lora sst --seeds 0 1 2 --zero-shot --merge
  python bench/training_table.py --rows llama28m --table                       # §15: the tables of its JSON
  python bench/training_table.py --rows sst_stdlib_cpu                          # §4b smoke scale
  python bench/training_table.py --rows chtss_llama_tiny --seeds 0 1 2 --merge  # §5b LLaMA on bytes
  python bench/training_table.py --rows sst_cost_cpu                            # §4a memory and tokens/s
  python bench/training_table.py --rows mt_multi30k --set "overrides=[training.max_steps=300]"  # §12
  python bench/training_table.py --rows sst_finetune --seeds 0 1 2            # §17 SST vs LoRA fine-tuning
  python bench/training_table.py --quick --rows llama28m                        # seconds (CI)

Rows: bench/rows/training_table.yaml (its header explains the kinds). Machine translation runs through the
package's recipe layer (leanformers-train on the HF Trainer). The pretraining rows keep the one small loop
that produced the published numbers (a seeded order of packed blocks or random starts, AdamW, clip 1.0,
the method's controller after every optimizer step): the Trainer samples and schedules differently, so
it could not reproduce them. Results: bench/results/<row's output>[_quick].json, rows keyed by (method,
seed) and merged with --merge (refused when the file holds another setting).
"""

from __future__ import annotations

import gc
import json
import math
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import harness
import torch
from harness import ResultFile, environment, in_fresh_process, interleaved, print_table, timed

from leanformers.chts import CHTssConfig, CHTssController
from leanformers.sst import SSTConfig, SSTController

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# SST paper's LLaMA-130M and 1.3B (vocab 32000); small and tiny: vocab 4096
SIZES = {"130m": (768, 2048, 12, 12), "1.3b": (2048, 5461, 24, 32), "small": (256, 688, 4, 4)}
SIZES["tiny"] = (128, 344, 2, 4)
LOOP = {"sampler": "blocks", "betas": [0.9, 0.999], "schedule": "cosine", "rank": 8, "density": 0.3}
LOOP |= {"sst_steps_per_iteration": 200, "update_interval": 10, "zeta": 0.1, "train_chars": None}
LOOP["eval_tokens"] = 32768  # the lm rows' defaults; each key may also be set by a row
# the columns of the tables, in order
SCORES = ("block_density", "ppl_wikitext2_test", "ppl_tinyshakespeare", "val_ppl", "held_out_ppl", "bleu")
SCORES += ("chrf", "final_train_loss")
KINDS = {
    "lm": " ".join(LOOP) + " data model methods steps batch seq lr zero_shot_limit",
    "cost": "sizes count_only methods batch seq steps",
    "recipe": "recipe methods overrides",
    "finetune": "model methods rank steps batch split lrs repeats",
}
KINDS["overhead"] = KINDS["lm"]
ROWS = harness.load_rows("training_table", lambda name, row: f"{KINDS[row['kind']]} kind output quick")


# --------------------------------------------------------------------------------------- models, methods
def llama(spec: dict | str, vocab: int, seq: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    if isinstance(spec, str):
        keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        spec = dict(zip(keys, SIZES[spec]))
    spec = {"num_key_value_heads": spec["num_attention_heads"], **spec}
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=seq, tie_word_embeddings=False, **spec)
    return LlamaForCausalLM(cfg)


def wrap(model: torch.nn.Module, method: str, rank: int, steps_per_iteration: int = 200):
    """(model, optimizer param groups, controller class or None) of a low-rank method or full rank."""
    from peft import LoraConfig, get_peft_model

    controller = None
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=list(BLOCK_LINEARS)))
        for name, p in model.named_parameters():  # the SST paper's LoRA trains embeddings, head, norms
            p.requires_grad_(p.requires_grad or any(k in name for k in ("embed_tokens", "lm_head", "norm")))
    elif method == "galore":
        galore = [p for n, p in model.named_parameters() if any(f".{b}." in n for b in BLOCK_LINEARS)]
        regular = [p for p in model.parameters() if all(p is not q for q in galore)]
        extra = {"rank": rank, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}
        return model, [{"params": regular}, {"params": galore, **extra}], None
    elif method in ("sst", "sst-bf16"):
        kw = {"frozen_factor_dtype": "bfloat16" if method == "sst-bf16" else "float32"}
        kw |= {"steps_per_iteration": steps_per_iteration}
        kw["warmup_steps_per_iteration"] = max(1, steps_per_iteration // 10)
        model, controller = get_peft_model(model, SSTConfig(r=rank, **kw)), SSTController
    elif method not in ("full", "dense"):
        raise ValueError(f"unknown method {method!r}")
    return model, [{"params": [p for p in model.parameters() if p.requires_grad]}], controller


def optimizer_for(method: str, groups, lr: float, betas=(0.9, 0.999)):
    if method == "galore":
        from galore_torch import GaLoreAdamW  # pip install galore-torch (+ bitsandbytes to import)

        return GaLoreAdamW(groups, lr=lr, weight_decay=0.0)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0, betas=tuple(betas))


# ------------------------------------------------------------------------------------------ lm rows
def load_data(s: dict) -> dict:
    """Token ids: train, and the evaluation texts (name -> ids), plus the tokenizer and its vocabulary."""
    from leanformers.data import shared_data_path, tokenize_text
    from leanformers.recipes.data import build_tokenizer, load_source

    if s["data"] == "shakespeare_bytes":
        data = torch.tensor(list(shared_data_path("tinyshakespeare.txt").read_bytes()))
        cut = int(0.9 * data.numel())
        return {"train": data[:cut], "eval": {"held_out": data[cut:]}, "vocab": 256, "tokenizer": None}
    tok = build_tokenizer("smollm2")
    if s["data"] == "wikitext":
        files = {"train": "wikitext-2-v1-valid", "wikitext2_test": "wikitext-2-v1-test"}
        files["tinyshakespeare"] = "tinyshakespeare"
        ids = {n: tokenize_text(shared_data_path(f"{f}.txt").read_text(), tok) for n, f in files.items()}
        evals = {n: ids[n][: s["eval_tokens"]] for n in ("wikitext2_test", "tinyshakespeare")}
    else:  # stdlib: files whose path hash is 0 mod 20 held out
        ids = {"train": tokenize_text(load_source("stdlib:train")[: s["train_chars"] or None], tok)}
        evals = {"val": tokenize_text(load_source("stdlib:eval")[: s["eval_tokens"] * 8], tok)}
        evals["val"] = evals["val"][: s["eval_tokens"]]
    return {"train": ids["train"], "eval": evals, "vocab": len(tok), "tokenizer": tok}


def batches(s: dict, train: torch.Tensor, seed: int):
    """The batch of every step: a seeded order of packed blocks, or seeded random starts."""
    seq, batch = s["seq"], s["batch"]
    if s["sampler"] == "random_starts":
        gen = torch.Generator().manual_seed(seed)
        for _ in range(s["steps"]):
            starts = torch.randint(0, train.numel() - seq - 1, (batch,), generator=gen)
            yield torch.stack([train[i : i + seq] for i in starts])
        return
    blocks = train[: (train.numel() // seq) * seq].view(-1, seq)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    for step in range(s["steps"]):
        yield blocks[order[(torch.arange(batch) + step * batch) % len(blocks)]]


def lr_schedule(s: dict, optimizer):
    """cosine: 10 % warm-up, cosine to 0; warm_cosine_floor: 5 % warm-up, cosine to 0.1 of the lr."""
    from transformers import get_cosine_schedule_with_warmup

    steps, warm = s["steps"], max(1, s["steps"] // 20)
    if s["schedule"] == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, max(1, steps // 10), steps)

    def floor(k: int) -> float:
        return min(1.0, (k + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, k / steps))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, floor)


def nonzero_share(model: torch.nn.Module, patterns=tuple(rf"\.{b}$" for b in BLOCK_LINEARS)) -> float:
    """Share of non-zero weights in the linears whose name matches one of ``patterns`` (regular expressions;
    default: the q/k/v/o/gate/up/down linears), read from the weights."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    ws = [m.weight for n, m in linears if any(re.search(p, n) for p in patterns)]
    return sum(int(torch.count_nonzero(w)) for w in ws) / sum(w.numel() for w in ws)


def train_lm(
    method: str, seed: int, s: dict, data: dict, device: str, zero_shot: list[str] | None = None
) -> dict:
    """The bench's one pretraining loop; returns the row (losses, time, perplexities, densities)."""
    from leanformers.eval import perplexity

    model = llama(s["model"], data["vocab"], s["seq"], seed=seed).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    dst = method not in ("dense", "full", "lora", "sst", "sst-bf16")
    wrapped = wrap(model, "full" if dst else method, s["rank"], s["sst_steps_per_iteration"])
    model, groups, controller_cls = wrapped
    optimizer = optimizer_for(method, groups, s["lr"], s["betas"])
    schedule = lr_schedule(s, optimizer)
    controller = controller_cls(model, optimizer) if controller_cls else None
    if dst:
        kw = {"final_density": s["density"], "update_interval": s["update_interval"], "zeta": s["zeta"]}
        cfg = CHTssConfig.for_method(method, seed=seed, **kw)
        controller = CHTssController(model, optimizer, cfg, total_steps=s["steps"])
        controller.check_schedule()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    model.train()
    losses, t0 = [], time.perf_counter()
    for ids in batches(s, data["train"], seed):
        ids = ids.to(device)
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([q for g in groups for q in g["params"]], 1.0)
        optimizer.step()
        if controller is not None:
            controller.step(optimizer)
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    harness.sync(device)
    row = {"method": method, "seed": seed, "parameters": n_params}
    row["train_tokens"] = s["steps"] * s["batch"] * s["seq"]
    row["train_seconds"] = round(time.perf_counter() - t0, 1)
    row["final_train_loss"] = round(statistics.mean(losses[-10:]), 4)
    if s["sampler"] == "blocks":
        row["epochs"] = s["steps"] * s["batch"] / (data["train"].numel() // s["seq"])
    if method in ("dense", "full") or dst:  # LoRA / SST hold their weights in factors: no sparsity to read
        row["block_density"] = round(nonzero_share(model), 4)
    if dst:
        row["density_sparse_subset"] = controller.metrics()["chtss/density_sparse_subset"]
        row["updates"] = len(controller.history)
    model.eval()
    for name, ids in data["eval"].items():
        if name == "held_out":  # 64 windows of the held-out bytes, 16 at a time
            windows = ids[: (ids.numel() // s["seq"]) * s["seq"]].view(-1, s["seq"])[:64].to(device)
            with torch.no_grad(), autocast:
                total = sum(model(input_ids=w, labels=w).loss.item() * w.numel() for w in windows.split(16))
            row["held_out_ppl"] = math.exp(total / windows.numel())
        else:
            result = perplexity(model, text=ids, seqlen=s["seq"], batch_size=8, progress=False)
            row["val_ppl" if name == "val" else f"ppl_{name}"] = round(result.ppl, 3)
    if zero_shot:
        from leanformers.eval.zeroshot import accuracy_table
        from leanformers.eval.zeroshot import zero_shot as score

        with timed() as t:
            kw = {"limit": s["zero_shot_limit"], "batch_size": 16, "max_length": s["seq"]}
            results = score(model, data["tokenizer"], zero_shot, **kw)
        row.update(zero_shot=accuracy_table(results), zero_shot_seconds=round(t.seconds, 1))
    return row


def overhead(s: dict, data: dict, device: str) -> dict:
    """The same loop dense vs CHTss (steps / interval updates), alternating, best of 2."""
    runs = {"dense": [], "chtss": []}
    for _ in range(2):
        for method in runs:
            runs[method].append(train_lm(method, 0, s, data, device))
    dense, sparse = (min(r["train_seconds"] for r in runs[m]) for m in runs)
    out = {"model": s["model"], "device": device, "steps": s["steps"]}
    out["update_interval"] = s["update_interval"]
    out |= {"updates": runs["chtss"][-1]["updates"], "dense_s": dense, "chtss_s": sparse}
    return out | {"overhead_pct": 100.0 * (sparse - dense) / dense, "target": "<= 3 %"}


# ------------------------------------------------------------------------------------------ cost rows
def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel() > 0 and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def model_state(n_dense: int, trainable: int, weights: int, grads: int, optimizer: int) -> dict:
    out = {"dense_parameters": n_dense, "trainable_parameters": trainable}
    out["trainable_share"] = trainable / n_dense
    out |= {"weights_GB": weights / 1e9, "grads_GB": grads / 1e9, "optimizer_GB": optimizer / 1e9}
    return out | {"model_state_GB": (weights + grads + optimizer) / 1e9}


def cost(size: str, method: str, s: dict, device: str, count_only: bool) -> dict:
    """One training step loop (2 warm-up + ``steps`` timed), or with ``count_only`` the model state counted on
    the meta device (fp32 weights, grads of trainable parameters, two AdamW moments: exact but for GaLore)."""
    rank = {"1.3b": 128, "130m": 64, "small": 32}.get(size, 16)
    vocab = 32000 if size in ("130m", "1.3b") else 4096
    row = {"size": size, "method": method, "rank": rank}
    if method == "galore":
        try:
            assert not count_only, "counted only when measured (projector state)"
            import galore_torch  # noqa: F401
        except Exception as exc:  # AssertionError, ImportError, or bitsandbytes missing at import
            return {**row, "error": str(exc) if count_only else f"galore-torch not importable ({exc})"}
    if count_only:
        with torch.device("meta"):
            model = llama(size, vocab, 256)
        n_dense = sum(p.numel() for p in model.parameters())
        model = wrap(model, method, rank)[0]
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        tensors = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
        weights = sum(t.numel() * t.element_size() for t in tensors)
        state = model_state(n_dense, trainable, weights, trainable * 4, trainable * 8)
        return row | {"counted": "meta", **state}
    model = llama(size, vocab, s["seq"]).to(device)
    n_dense = sum(p.numel() for p in model.parameters())
    model, groups, controller_cls = wrap(model, method, rank)
    optimizer = optimizer_for(method, groups, 1e-4)
    controller = controller_cls(model, optimizer) if controller_cls else None
    ids = torch.randint(0, vocab, (s["batch"], s["seq"]), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    grads = 0
    for step in range(2 + s["steps"]):
        if step == 2:
            harness.sync(device)
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == 0:
            grads = tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if controller is not None:
            controller.step(optimizer)
    harness.sync(device)
    states = [v for st in optimizer.state.values() for v in st.values()]
    opt_bytes = tensor_bytes([getattr(v, "ortho_matrix", v) for v in states])  # GaLore's projector
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weights = tensor_bytes([*model.parameters(), *model.buffers()])
    row |= model_state(n_dense, trainable, weights, grads, opt_bytes)
    row["tokens_per_s"] = s["batch"] * s["seq"] * s["steps"] / (time.perf_counter() - t0)
    row["loss"] = float(loss.detach())
    if device.startswith("cuda"):
        row["peak_GB"] = torch.cuda.max_memory_allocated(device) / 1e9
    del model, optimizer, controller
    gc.collect()
    return row


def add_ratios(rows: list[dict]) -> None:
    full = {r["size"]: r for r in rows if r["method"] == "full" and "error" not in r}
    for r in rows:
        ref = full.get(r["size"])
        if ref is not None and "error" not in r:
            r["model_state_vs_full"] = r["model_state_GB"] / ref["model_state_GB"]
            for key, out in (("tokens_per_s", "tokens_per_s_vs_full"), ("peak_GB", "peak_vs_full")):
                if key in r and key in ref:
                    r[out] = r[key] / ref[key]


# ------------------------------------------------------------------------------------------ recipe rows
def recipe_row(method: str, seed: int, s: dict, output_dir: Path) -> dict:
    """``leanformers-train RECIPE --set method.name=<method> ...``: BLEU / chrF with signatures, measured
    density of the sparse rows (final masks and non-zero weights), rank of the low-rank rows."""
    from leanformers.recipes import load_training_recipe, run

    sets = [f"method.name={method}", f"training.seed={seed}", f"model.seed={seed}"]
    sets += [f"training.output_dir={output_dir}", *s["overrides"]]
    sets += [f"method.{method}.seed={seed}"] if method in ("chtss", "set", "rigl", "sst") else []
    out = run(harness.REPO_ROOT / s["recipe"], sets)
    m, model, trainer = out["metrics"], out["model"], out["trainer"]
    row = {"method": method, "seed": seed, "bleu": round(m["eval_bleu"], 2), "chrf": round(m["eval_chrf"], 2)}
    row |= {"eval_loss": round(m["eval_loss"], 4), "bleu_signature": m["bleu_signature"]}
    row |= {"chrf_signature": m["chrf_signature"], "test_sentences": len(trainer.eval_dataset)}
    row |= {"train_steps": trainer.state.global_step, "model_parameters": m["model_parameters"]}
    row |= {"trainable_parameters": m["trainable_parameters"], "train_s": round(m["train_runtime"], 1)}
    row["eval_s"] = round(m["eval_runtime"], 1)
    if "chtss/density_sparse_subset" in m:
        targets = load_training_recipe(harness.REPO_ROOT / s["recipe"], sets)["method"][method]["targets"]
        row["density"] = round(m["chtss/density_sparse_subset"], 5)
        row["nonzero_weights"] = round(nonzero_share(model, targets), 5)
        if row["nonzero_weights"] > row["density"] + 1e-9:  # a regrown link may stay 0, never the reverse
            raise RuntimeError(f"{method}: {row['nonzero_weights']} of the weights non-zero, above the masks")
    if hasattr(model, "peft_config"):
        configs = model.peft_config.values()
        ranks = {int(r) for c in configs for r in [c.r, *(getattr(c, "rank_pattern", None) or {}).values()]}
        if len(ranks) != 1:
            raise ValueError(f"adapter ranks differ: {sorted(ranks)}")
        row["rank"] = ranks.pop()
    return row


# ------------------------------------------------------------------------------------------ finetune rows
def sst2_split(s: dict) -> dict[str, list[list[int]]]:
    """The GLUE SST-2 dev sentences (../shared/data), split once (seed 1234) into train, val (the lr is chosen
    on it) and eval (reported, never used for a choice), encoded: SmolLM2's tokenizer + EOS, or with the
    tiny model its bytes folded into 128 ids."""
    from leanformers.data import shared_data_path

    lines = shared_data_path("classification/sst2-dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    texts = [line.split("\t")[0].strip() for line in lines if line.strip()]
    texts = [texts[i] for i in torch.randperm(len(texts), generator=torch.Generator().manual_seed(1234))]
    if s["model"] == "tiny":
        encode = lambda text: [min(b, 127) for b in text.encode("utf-8")][:48]  # noqa: E731
    else:
        from transformers import AutoTokenizer

        from leanformers.hub import smollm2_135m

        tok = AutoTokenizer.from_pretrained(smollm2_135m())
        encode = lambda text: tok(text)["input_ids"] + [tok.eos_token_id]  # noqa: E731
    n_train, n_val, n_eval = s["split"]
    split = {"train": texts[:n_train], "val": texts[n_train : n_train + n_val]}
    split["eval"] = texts[len(texts) - n_eval :]  # from the end: disjoint from train and val
    return {k: [encode(t) for t in v] for k, v in split.items()}


def padded(ids: list[list[int]]) -> dict[str, torch.Tensor]:
    """A right-padded batch whose padding is masked out of attention and labels."""
    input_ids = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100)}


def finetune_batches(data: list[list[int]], s: dict, seed: int) -> list[dict[str, torch.Tensor]]:
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    order = order[: s["steps"] * s["batch"]]
    return [padded([data[i] for i in order[k : k + s["batch"]]]) for k in range(0, len(order), s["batch"])]


def finetune_base(s: dict) -> torch.nn.Module:
    """SmolLM2-135M-Instruct (the dequantised Q4_1 GGUF, float32) or a random tiny LLaMA, in train mode."""
    from transformers import AutoModelForCausalLM

    from leanformers.hub import smollm2_135m

    if s["model"] == "tiny":
        return harness.tiny_llama(seed=0).train()
    return AutoModelForCausalLM.from_pretrained(smollm2_135m(), dtype=torch.float32).train()


class FinetuneRun:
    """One method's PeftModel (SST mode="finetune" or peft LoRA on the seven projections, rank r), AdamW at
    a constant lr without weight decay, and SST's controller; ``step`` times one optimizer step."""

    def __init__(self, method: str, s: dict, lr: float, seed: int):
        from peft import LoraConfig, get_peft_model

        base, kw = finetune_base(s), {"r": s["rank"], "target_modules": list(BLOCK_LINEARS)}
        kw["task_type"] = "CAUSAL_LM"
        torch.manual_seed(seed)
        with timed() as t:
            cfg = SSTConfig(mode="finetune", seed=seed, **kw) if method == "sst" else LoraConfig(**kw)
            self.model = get_peft_model(base, cfg)
        params = [q for q in self.model.parameters() if q.requires_grad]
        self.method, self.lr, self.inject_s, self.step_s = method, lr, t.seconds, []
        self.trainable = sum(q.numel() for q in params)
        self.optimizer = optimizer_for(method, [{"params": params}], lr)
        self.controller = SSTController(self.model, self.optimizer) if method == "sst" else None

    def step(self, batch: dict) -> None:
        t0 = time.perf_counter()
        self.model(**batch).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.controller is not None:
            self.controller.step(self.optimizer)
        self.step_s.append(round(time.perf_counter() - t0, 4))

    @torch.no_grad()
    def loss(self, data: list[list[int]]) -> float:
        """Token-level cross-entropy over ``data`` (the sum of token losses over the tokens)."""
        self.model.eval()
        total = tokens = 0
        for b in (padded(data[i : i + 8]) for i in range(0, len(data), 8)):
            n = int((b["labels"][:, 1:] != -100).sum())  # the predicted tokens
            total, tokens = total + float(self.model(**b).loss) * n, tokens + n
        self.model.train()
        return round(total / tokens, 4)


def paired_runs(s: dict, data: dict, lrs: dict[str, float], seed: int) -> dict[str, FinetuneRun]:
    """SST and LoRA trained side by side, one step each in turn (who goes first alternates), so that the
    machine's load hits both alike."""
    runs = {m: FinetuneRun(m, s, lrs[m], seed) for m in s["methods"]}
    for i, batch in enumerate(finetune_batches(data["train"], s, seed)):
        for run in list(runs.values())[:: 1 if i % 2 == 0 else -1]:
            run.step(batch)
    return runs


def run_record(run: FinetuneRun, seed: int, data: dict, split: str = "val") -> dict:
    row = {"method": run.method, "lr": run.lr, "seed": seed, "trainable": run.trainable}
    row |= {"inject_s": round(run.inject_s, 3), "step_s": run.step_s}
    return row | {f"{split}_loss": run.loss(data[split])}


def step_ratio(runs: dict[str, FinetuneRun]) -> float:
    """The median of the per-step ratios SST / LoRA, the first step (warm-up) left out."""
    pairs = list(zip(runs["sst"].step_s, runs["lora"].step_s))
    return round(statistics.median(a / b for a, b in pairs[1:] or pairs), 3)


def finetune_paths(s: dict, data: dict) -> dict:
    """Forward + backward of LoRA, SST factored and SST materialised on the same batches, interleaved."""
    from leanformers.sst import SSTLinear

    lora, sst = FinetuneRun("lora", s, 1e-4, 0).model, FinetuneRun("sst", s, 1e-4, 0).model
    batches = finetune_batches(data["train"], s, 0)[: max(2, s["repeats"])]
    variants = {"lora": (lora, None), "sst_factored": (sst, "factored")}
    variants["sst_materialized"] = (sst, "materialized")

    def call(model, path):
        def run(rep: int) -> None:
            for layer in (m for m in model.modules() if isinstance(m, SSTLinear)):
                layer.spectral_path = path
            model(**batches[rep]).loss.backward()
            model.zero_grad(set_to_none=True)

        return run

    times = interleaved({k: call(*v) for k, v in variants.items()}, len(batches))
    lora = times["lora"]
    ratio = {k: round(statistics.median(a / b for a, b in zip(t, lora)), 3) for k, t in times.items()}
    tokens = [int(b["input_ids"].numel()) for b in batches]
    return {"tokens_per_batch": tokens, "fwd_bwd_s": times, "ratio_vs_lora": ratio}


def adapter_bytes(runs: dict[str, FinetuneRun], s: dict, data: dict) -> dict:
    """Saved bytes of the SST compact / full and the LoRA adapters; the compact SST adapter reloaded onto a
    fresh base must give identical logits."""
    from peft import PeftModel

    from leanformers.sst import SSTLinear

    sst, probe = runs["sst"].model.eval(), padded(data["eval"][:4])
    probe.pop("labels")
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        want, config = sst(**probe).logits, sst.peft_config["default"]
        sst.save_pretrained(f"{tmp}/sst")
        config.save_format = "full"
        sst.save_pretrained(f"{tmp}/sst_full")
        config.save_format = "auto"
        runs["lora"].model.save_pretrained(f"{tmp}/lora")
        size = {n: (Path(tmp) / n / "adapter_model.safetensors").stat().st_size for n in (*runs, "sst_full")}
        out = {f"{n}_adapter_bytes": size[n] for n in runs} | {"sst_full_adapter_bytes": size["sst_full"]}
        out["sst_saved_format"] = json.loads((Path(tmp) / "sst" / "adapter_config.json").read_text())
        out["sst_saved_format"] = out["sst_saved_format"]["saved_format"]
        with timed() as t:
            reloaded = PeftModel.from_pretrained(finetune_base(s), f"{tmp}/sst").eval()
        out["sst_reload_s"] = round(t.seconds, 3)
        out["sst_reload_identical_logits"] = torch.equal(reloaded(**probe).logits, want)
    layers = [m for m in sst.modules() if isinstance(m, SSTLinear)]
    itemsize = {m: torch.empty((), dtype=m.base_dtype).element_size() for m in layers}
    return out | {"targeted_base_bytes": sum(itemsize[m] * m.out_features * m.in_features for m in layers)}


def finetune_rss(method: str, s: dict) -> dict:
    """Run in a fresh process: load, wrap, 3 training steps; the peak RSS (VmHWM: ru_maxrss carries over
    fork + exec, so a child would report its parent's peak)."""
    from leanformers.compression.checkpoint_io import status_kib

    run = FinetuneRun(method, s, 1e-4, 0)
    ids = [[1 + (i * 7 + j) % 100 for j in range(24)] for i in range(12)]
    for batch in finetune_batches(ids, s | {"steps": 3}, 0):
        run.step(batch)
    return {"peak_rss_gb": round(status_kib("VmHWM") / 2**20, 3)}


def finetune(s: dict, args) -> dict:
    """The lr grid on the first seed (validation loss; each method keeps its best run), the other seeds at
    each method's chosen lr, the eval loss of those runs; then the training paths, adapters, peak RSS."""
    if sorted(s["methods"]) != ["lora", "sst"]:
        raise SystemExit("the finetune rows compare exactly two methods: sst and lora")
    data, grid, ratios, best = sst2_split(s), [], [], {}
    for lr in s["lrs"]:
        runs = paired_runs(s, data, {m: lr for m in s["methods"]}, args.seeds[0])
        ratios.append(step_ratio(runs))
        for m, run in runs.items():
            grid.append(run_record(run, args.seeds[0], data))
            if m not in best or grid[-1]["val_loss"] < best[m][0]["val_loss"]:
                best[m] = (grid[-1], run)
        print(f"lr {lr:g}: " + ", ".join(f"{r['method']} val {r['val_loss']:.4f}" for r in grid[-2:]))
    lrs = {m: row["lr"] for m, (row, _) in best.items()}
    for row, run in best.values():  # the grid's record of the chosen run gets its eval loss too
        row["eval_loss"] = run.loss(data["eval"])
    rows = [row for row, _ in best.values()]
    saved = adapter_bytes({m: run for m, (_, run) in best.items()}, s, data)
    best.clear()
    gc.collect()
    for seed in args.seeds[1:]:
        runs = paired_runs(s, data, lrs, seed)
        ratios.append(step_ratio(runs))
        rows += [run_record(run, seed, data) | {"eval_loss": run.loss(data["eval"])} for run in runs.values()]
    out = {"benchmark": "sst_finetune", "preset": "quick" if args.quick else "default"}
    out |= {"settings": s | {"seeds": args.seeds}, "targets": list(BLOCK_LINEARS), "best_lr": lrs}
    out |= {"grid": grid, "rows": rows, "summary": []}
    out["step_ratio_sst_vs_lora"] = round(statistics.median(ratios), 3)
    out |= {"step_ratio_per_run": ratios, "target_step_ratio": 1.5, "paths": finetune_paths(s, data)}
    threads = torch.get_num_threads()
    rss = {m: in_fresh_process("training_table", "finetune_rss", threads, method=m, s=s) for m in lrs}
    out["peak_rss_gb"] = {m: v["peak_rss_gb"] for m, v in rss.items()}
    for m in s["methods"]:
        mine = [r for r in rows if r["method"] == m]
        evals, steps = [r["eval_loss"] for r in mine], [t for r in mine for t in r["step_s"][1:]]
        entry = {"method": m, "lr": lrs[m], "trainable": mine[0]["trainable"]}
        entry["eval_loss_mean"] = round(statistics.mean(evals), 4)
        entry["eval_loss_std"] = round(statistics.stdev(evals), 4) if len(evals) > 1 else 0.0
        entry["median_step_s"] = round(statistics.median(steps), 3)
        entry["inject_s"] = round(statistics.median(r["inject_s"] for r in mine), 2)
        entry["peak_rss_gb"] = out["peak_rss_gb"][m]
        out["summary"].append(entry | {"adapter_mb": round(saved[f"{m}_adapter_bytes"] / 1e6, 2)})
    return out | {"adapters": saved, "environment": environment("cpu")}


# ------------------------------------------------------------------------------------------ tables
def mean_std(values: list[float], digits: int = 2) -> str:
    if len(values) < 2:
        return f"{values[0]:.{digits}f} (1 seed)" if values else "-"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def tables(payload: dict) -> str:
    """Per method (mean ± std over seeds) of every numeric score, the share of the LoRA -> full-rank gap
    that SST closes per seed, and the zero-shot accuracies."""
    by: dict[str, list[dict]] = {}
    for r in payload["rows"]:
        by.setdefault(r["method"], []).append(r)
    keys = [k for k in SCORES if any(k in r for r in payload["rows"])]
    lines = ["| method | seeds | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for m, rs in by.items():
        digits = {k: 3 if k in ("block_density", "final_train_loss") else 2 for k in keys}
        cells = [mean_std([r[k] for r in rs if k in r], digits[k]) for k in keys]
        lines.append(f"| {m} | {len(rs)} | " + " | ".join(cells) + " |")
    score = next((k for k in ("ppl_wikitext2_test", "val_ppl", "held_out_ppl") if k in keys), None)
    full = "dense" if "dense" in by else "full"
    if score and {full, "lora", "sst"} <= by.keys():
        ppl = {m: {r["seed"]: r[score] for r in by[m]} for m in (full, "lora", "sst")}
        closed = [
            (ppl["lora"][k] - ppl["sst"][k]) / (ppl["lora"][k] - ppl[full][k])
            for k in sorted(set.intersection(*(set(p) for p in ppl.values())))
            if ppl["lora"][k] != ppl[full][k]
        ]
        if closed:
            shares = ", ".join(f"{100 * c:.0f} %" for c in closed)
            lines.append(f"\nShare of the LoRA -> full-rank gap ({score}) SST closes, per seed: {shares}")
            lines[-1] += f"; mean {100 * statistics.mean(closed):.0f} %."
    zs = [(m, rs) for m, rs in by.items() if all("zero_shot" in r for r in rs)]
    if zs:
        tasks = list(zs[0][1][0]["zero_shot"])
        lines += ["", "| method | seeds | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
        for m, rs in zs:
            cells = []
            for t in tasks:
                scores = [r["zero_shot"][t] for r in rs]
                acc = f"acc {mean_std([z['acc'] for z in scores], 3)}"
                if t == "lambada_openai":
                    acc += f"; ppl {mean_std([z['perplexity'] for z in scores], 0)}"
                cells.append(f"{acc} (n={scores[0].get('n', '?')})")
            lines.append(f"| {m} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main
def build_parser():
    ap = harness.parser(__doc__, "each row at its quick size (seconds, CPU)", "result JSON (one row only)")
    harness.rows_arguments(ap, ROWS)
    ap.add_argument("--methods", nargs="+", default=None, help="a subset of the row's methods (or others)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    tasks = "lm rows: lm-eval tasks (no task = arc_easy piqa lambada_openai), first zero_shot_limit documents"
    ap.add_argument("--zero-shot", nargs="*", default=None, metavar="TASK", help=tasks)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared, busy CPU)")
    ap.add_argument("--merge", action="store_true", help="keep the (method, seed) rows already in the JSON")
    ap.add_argument("--table", action="store_true", help="only print the tables of the rows' JSON")
    return ap


def run_row(name: str, s: dict, args, path: Path, store: ResultFile) -> dict:
    setting = {k: v for k, v in s.items() if k not in ("kind", "methods", "output")}
    old = json.loads(path.read_text()) if args.merge and path.is_file() else {}
    if any(old.get("setting", {}).get(k, v) != v for k, v in setting.items()):
        fix = "write elsewhere with --output or drop --merge"
        raise SystemExit(f"{path} holds rows of another setting; {fix}")
    command, methods = harness.command_line("training_table", args.argv), args.methods or s.get("methods")
    fields = {"environment": environment(args.device), "setting": setting, "command": command}
    if s["kind"] == "finetune":
        harness.write_json(path, payload := {**finetune(s, args), "command": command})
        return payload
    if s["kind"] == "cost":
        sizes = [(size, False) for size in s["sizes"]] + [(size, True) for size in s["count_only"]]
        rows = [cost(size, m, s, args.device, count_only) for size, count_only in sizes for m in methods]
        add_ratios(rows)
        return store.update("rows", rows, lambda r: (r["size"], r["method"]), **fields)
    data = load_data(s) if s["kind"] != "recipe" else None
    if s["kind"] == "overhead":
        return store.update("rows", [overhead(s, data, args.device)], lambda r: str(r["model"]), **fields)
    tasks = None if args.zero_shot is None else (args.zero_shot or ["arc_easy", "piqa", "lambada_openai"])
    payload, done = old or {"rows": []}, {(r["method"], r["seed"]) for r in old.get("rows", [])}
    with tempfile.TemporaryDirectory(prefix="training_table_") as tmp:
        for seed, method in ((seed, m) for seed in args.seeds for m in methods):
            if s["kind"] == "recipe" and (method, seed) in done:
                continue  # a recipe row is expensive: --merge resumes instead of re-running it
            print(f"training_table {name}: {method} seed {seed} ...", file=sys.stderr, flush=True)
            if s["kind"] == "recipe":
                row = recipe_row(method, seed, s, Path(tmp) / f"{method}_{seed}")
            else:
                row = train_lm(method, seed, s, data, args.device, tasks)
            payload = store.update("rows", [row], lambda r: (r["method"], r["seed"]), **fields)
    return payload


def main(argv: list[str] | None = None) -> dict:
    """Runs the rows; returns {row: the payload written to its JSON}."""
    ap = build_parser()
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    rows = args.rows or (["llama28m"] if args.quick else [])
    if not rows or (args.output is not None and len(rows) != 1):
        ap.error("give --rows (one row with --output)")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for name in rows:
        s = harness.row_settings(name, ROWS[name], args.quick, args.sets)
        s = (LOOP if s["kind"] in ("lm", "overhead") else {}) | s
        path = harness.output_path(args, s["output"])
        if args.table:
            results[name] = json.loads(path.read_text())
        else:
            results[name] = run_row(name, s, args, path, ResultFile(path, merge=args.merge))
        print(f"\n{name} (JSON: {path})")
        if s["kind"] in ("lm", "recipe"):
            print(tables(results[name]))
        else:
            print_table(results[name]["summary" if s["kind"] == "finetune" else "rows"])
    return results


if __name__ == "__main__":
    main()
