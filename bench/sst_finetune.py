"""SST vs peft LoRA fine-tuning of SmolLM2-135M-Instruct on SST-2 sentences (LM text): step time, peak RSS,
adapter bytes, eval loss at a tuned lr (3 seeds), injection and reload time.

Both methods target the same seven projections (q, k, v, o, gate, up, down) at matched trainable
parameters: SST r = 8 (S and 8 active pairs per layer, 2.54M) and LoRA r = 8 (2.44M), mode="finetune"
for SST. The 872 SST-2 dev sentences are split once (seeded): 400 train, 136 validation (the lr is
chosen on it), 336 eval (reported, never used for a choice). Each run: 30 AdamW steps of 4 sentences
(constant lr, no weight decay), the SST schedule driven by SSTController.

- lr grid, seed 0, then seeds 1 and 2 at each method's best validation lr (seed 0's run is reused);
- the two methods of a run train side by side, one step each in turn, so that machine load hits both
  alike: the step-time ratio is the median of per-step ratios;
- forward + backward of SST's two training paths (factored / materialised) next to LoRA, interleaved;
- adapter bytes: SST compact (save_pretrained's default in fine-tuning mode), SST full, LoRA; the SST
  compact adapter reloaded onto a fresh base in this process must give identical logits;
- peak RSS: one child process per method (load, wrap, 3 steps): ru_maxrss.

    python bench/sst_finetune.py --quick     # tiny LLaMA from a config, seconds (CI smoke test)
    python bench/sst_finetune.py             # SmolLM2-135M-Instruct, about 35 min on one CPU thread
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import REPO_ROOT, environment, output_path, parser, print_table, tiny_llama, write_json
from peft import LoraConfig, PeftModel, get_peft_model

from leanformers.sst import SSTConfig, SSTController, SSTLinear

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("sst", "lora")
PRESETS = {
    "quick": dict(model="tiny", r=4, steps=3, batch=4, split=(16, 8, 8), lrs=(1e-3, 1e-2), seeds=(0, 1), repeats=2),
    "default": dict(
        model="smollm2", r=8, steps=30, batch=4, split=(400, 136, 336), lrs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
        seeds=(0, 1, 2), repeats=8,
    ),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------- data
def sst2_sentences(data: Path) -> list[str]:
    lines = (data / "classification" / "sst2-dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return [line.split("\t")[0].strip() for line in lines if line.strip()]


def split(sentences: list[str], sizes: tuple[int, int, int]) -> dict[str, list[str]]:
    order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(1234)).tolist()
    shuffled = [sentences[i] for i in order]
    n_train, n_val, n_eval = sizes
    return {
        "train": shuffled[:n_train],
        "val": shuffled[n_train : n_train + n_val],
        "eval": shuffled[len(shuffled) - n_eval :],  # from the end: disjoint from train and val
    }


def tokenizer_for(p: dict):
    """Text -> ids: SmolLM2's tokenizer (+ EOS), or bytes folded into the tiny model's 128 ids."""
    if p["model"] == "tiny":
        return lambda text: [min(b, 127) for b in text.encode("utf-8")][:48]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_folder()))
    return lambda text: tok(text)["input_ids"] + [tok.eos_token_id]


def batch_of(ids: list[list[int]]) -> dict[str, torch.Tensor]:
    longest = max(len(x) for x in ids)
    input_ids = torch.zeros(len(ids), longest, dtype=torch.long)
    mask = torch.zeros(len(ids), longest, dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def train_batches(encoded: list[list[int]], p: dict, seed: int) -> list[dict[str, torch.Tensor]]:
    order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = [encoded[i] for i in order[: p["steps"] * p["batch"]]]
    return [batch_of(chosen[i : i + p["batch"]]) for i in range(0, len(chosen), p["batch"])]


# ---------------------------------------------------------------------------------------------- models
def smollm2_folder() -> Path:
    from leanformers.hub import smollm2_135m

    return smollm2_135m()


def base_model(p: dict):
    if p["model"] == "tiny":
        return tiny_llama(seed=0).train()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2_folder()), dtype=torch.float32).train()


def wrap(method: str, p: dict, seed: int = 0):
    """(PeftModel, seconds of the wrapping: SST's SVDs or LoRA's init)."""
    model = base_model(p)
    torch.manual_seed(seed)
    start = time.perf_counter()
    if method == "sst":
        config = SSTConfig(
            r=p["r"], mode="finetune", target_modules=TARGETS, task_type="CAUSAL_LM", seed=seed
        )
    else:
        config = LoraConfig(r=p["r"], target_modules=TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(model, config), time.perf_counter() - start


class Run:
    """One method's model, optimizer and (SST) controller."""

    def __init__(self, method: str, p: dict, lr: float, seed: int):
        self.method, self.lr = method, lr
        self.model, self.inject_s = wrap(method, p, seed)
        params = [q for q in self.model.parameters() if q.requires_grad]
        self.trainable = sum(q.numel() for q in params)
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        self.controller = SSTController(self.model, self.optimizer) if method == "sst" else None
        self.step_s: list[float] = []

    def step(self, batch) -> float:
        start = time.perf_counter()
        loss = self.model(**batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.controller is not None:
            self.controller.step(self.optimizer)
        seconds = time.perf_counter() - start
        self.step_s.append(seconds)
        return float(loss.detach())


@torch.no_grad()
def mean_loss(model, encoded: list[list[int]], batch: int = 8) -> float:
    """Token-level cross-entropy over ``encoded`` (sum of token losses / tokens)."""
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(encoded), batch):
        b = batch_of(encoded[i : i + batch])
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        labels = b["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += float(loss)
        tokens += int((labels != -100).sum())
    model.train()
    return total / tokens


def paired_run(p: dict, data: dict, lrs: dict[str, float], seed: int) -> dict[str, dict]:
    """Train SST and LoRA side by side (one step each in turn, alternating who goes first)."""
    runs = {m: Run(m, p, lrs[m], seed) for m in METHODS}
    for i, batch in enumerate(train_batches(data["train"], p, seed)):
        order = METHODS if i % 2 == 0 else METHODS[::-1]
        for m in order:
            runs[m].step(batch)
    out = {}
    for m, run in runs.items():
        out[m] = {
            "method": m,
            "lr": run.lr,
            "seed": seed,
            "trainable": run.trainable,
            "inject_s": round(run.inject_s, 3),
            "step_s": [round(s, 4) for s in run.step_s],
            "val_loss": round(mean_loss(run.model, data["val"]), 4),
        }
    out["ratio_sst_vs_lora"] = step_ratio(out["sst"]["step_s"], out["lora"]["step_s"])
    out["_runs"] = runs
    return out


def add_eval_loss(pair: dict, data: dict) -> None:
    """The reported loss on the eval split (only for runs at the chosen lr: the grid needs validation only)."""
    for m in METHODS:
        pair[m]["eval_loss"] = round(mean_loss(pair["_runs"][m].model, data["eval"]), 4)


def step_ratio(sst: list[float], lora: list[float]) -> float:
    """Median of per-step ratios, the first step (warm-up) left out."""
    pairs = list(zip(sst, lora, strict=True))[1:] or list(zip(sst, lora, strict=True))
    return round(statistics.median(a / b for a, b in pairs), 3)


# ---------------------------------------------------------------------------------------------- parts
def path_timing(p: dict, data: dict) -> dict:
    """Forward + backward of LoRA, SST factored, SST materialised on the same batches, interleaved."""
    lora, _ = wrap("lora", p)
    sst, _ = wrap("sst", p)
    batches = train_batches(data["train"], p, seed=0)[: max(2, p["repeats"])]
    variants = {
        "lora": (lora, None),
        "sst_factored": (sst, "factored"),
        "sst_materialized": (sst, "materialized"),
    }
    times: dict[str, list[float]] = {v: [] for v in variants}
    for i, batch in enumerate(batches):
        names = list(variants)
        names = names[i % 3 :] + names[: i % 3]
        for name in names:
            model, path = variants[name]
            for layer in model.modules():
                if isinstance(layer, SSTLinear):
                    layer.spectral_path = path
            start = time.perf_counter()
            model(**batch).loss.backward()
            times[name].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    tokens = [int(b["input_ids"].numel()) for b in batches]
    ratio = {
        name: round(statistics.median(a / b for a, b in zip(times[name], times["lora"], strict=True)), 3)
        for name in times
    }
    return {"tokens_per_batch": tokens, "fwd_bwd_s": times, "ratio_vs_lora": ratio}


def adapters(runs: dict, p: dict, data: dict) -> dict:
    """Saved bytes of SST compact / SST full / LoRA, and the SST compact reload (identical logits?)."""
    sst, lora = runs["sst"].model.eval(), runs["lora"].model.eval()
    probe = batch_of(data["eval"][:4])
    with torch.no_grad():
        want = sst(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        sst.save_pretrained(f"{tmp}/sst")
        config = sst.peft_config["default"]
        config.save_format = "full"
        sst.save_pretrained(f"{tmp}/sst_full")
        config.save_format = "auto"
        lora.save_pretrained(f"{tmp}/lora")
        for name in ("sst", "sst_full", "lora"):
            out[f"{name}_adapter_bytes"] = os.path.getsize(f"{tmp}/{name}/adapter_model.safetensors")
        out["sst_saved_format"] = json.loads(Path(f"{tmp}/sst/adapter_config.json").read_text())[
            "saved_format"
        ]
        base = base_model(p)
        start = time.perf_counter()
        reloaded = PeftModel.from_pretrained(base, f"{tmp}/sst").eval()
        out["sst_reload_s"] = round(time.perf_counter() - start, 3)
        with torch.no_grad():
            got = reloaded(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
        out["sst_reload_identical_logits"] = bool(torch.equal(got, want))
    layers = [m for m in sst.modules() if isinstance(m, SSTLinear)]
    out["targeted_base_bytes"] = sum(
        torch.empty((), dtype=m.base_dtype).element_size() * m.out_features * m.in_features for m in layers
    )
    return out


def rss_child(method: str, preset: str) -> dict:
    """In a fresh process: load, wrap, 3 training steps; this process's peak RSS."""
    p = PRESETS[preset]
    data = {"train": [[1 + (i * 7 + j) % 100 for j in range(24)] for i in range(3 * p["batch"])]}
    run = Run(method, dict(p, steps=3), 1e-4, seed=0)
    for batch in train_batches(data["train"], dict(p, steps=3), seed=0):
        run.step(batch)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec, so a child would report its parent's peak
    status = Path("/proc/self/status").read_text().splitlines()
    hwm_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    return {"method": method, "peak_rss_gb": round(hwm_kb / 2**20, 3)}


def peak_rss(preset: str) -> dict[str, float]:
    out = {}
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH")) if p),
    )
    for method in METHODS:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", method, "--preset", preset]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"RSS child for {method} failed:\n{proc.stderr[-3000:]}")
        out[method] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_gb"]
    return out


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__.splitlines()[0], "tiny LLaMA from a config, 3 steps (seconds)")
    ap.add_argument(
        "--data", type=Path, default=REPO_ROOT.parent / "shared" / "data", help="the shared data folder"
    )
    ap.add_argument("--lrs", type=float, nargs="+", default=None, help="lr grid (both methods)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 30)")
    ap.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; the first tunes)"
    )
    ap.add_argument("--rss-child", choices=METHODS, default=None, help=argparse_hidden())
    ap.add_argument("--preset", choices=tuple(PRESETS), default=None, help=argparse_hidden())
    args = ap.parse_args(argv)
    preset = args.preset or ("quick" if args.quick else "default")
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child, preset)))
        return {}
    p = dict(PRESETS[preset])
    p.update({k: tuple(v) if isinstance(v, list) else v for k, v in
              (("lrs", args.lrs), ("steps", args.steps), ("seeds", args.seeds)) if v})  # fmt: skip
    encode = tokenizer_for(p)
    data = {k: [encode(s) for s in v] for k, v in split(sst2_sentences(args.data), p["split"]).items()}

    grid, ratios, best_runs = [], [], {}
    for lr in p["lrs"]:  # lr search on seed 0 (validation loss); only each method's best run is kept
        pair = paired_run(p, data, {"sst": lr, "lora": lr}, seed=0)
        ratios.append(pair["ratio_sst_vs_lora"])
        for m in METHODS:
            grid.append(pair[m])
            if m not in best_runs or pair[m]["val_loss"] < best_runs[m][0]["val_loss"]:
                best_runs[m] = (pair[m], pair["_runs"][m])
        del pair
        gc.collect()
        print(
            f"lr {lr:g}: " + ", ".join(f"{r['method']} val {r['val_loss']:.4f}" for r in grid[-2:]),
            flush=True,
        )
    best = {m: best_runs[m][0]["lr"] for m in METHODS}
    rows = []
    for m in METHODS:
        row, run = best_runs[m]
        row["eval_loss"] = round(mean_loss(run.model, data["eval"]), 4)
        rows.append(row)
    saved = adapters({m: best_runs[m][1] for m in METHODS}, p, data)
    best_runs.clear()
    gc.collect()
    for seed in p["seeds"][1:]:
        pair = paired_run(p, data, best, seed)
        add_eval_loss(pair, data)
        pair.pop("_runs")
        rows += [pair["sst"], pair["lora"]]
        ratios.append(pair["ratio_sst_vs_lora"])
        gc.collect()
    timing = path_timing(p, data)
    rss = peak_rss(preset)
    summary = []
    for m in METHODS:
        mine = [r for r in rows if r["method"] == m]
        evals = [r["eval_loss"] for r in mine]
        steps = [s for r in mine for s in r["step_s"][1:]]
        summary.append({
            "method": m, "lr": best[m], "trainable": mine[0]["trainable"],
            "eval_loss_mean": round(statistics.mean(evals), 4),
            "eval_loss_std": round(statistics.stdev(evals), 4) if len(evals) > 1 else 0.0,
            "median_step_s": round(statistics.median(steps), 3),
            "inject_s": round(statistics.median(r["inject_s"] for r in mine), 2),
            "peak_rss_gb": rss[m],
            "adapter_mb": round(saved["sst_adapter_bytes" if m == "sst" else "lora_adapter_bytes"] / 1e6, 2),
        })  # fmt: skip
    result = {
        "benchmark": "sst_finetune",
        "preset": preset,
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in p.items()},
        "targets": TARGETS,
        "best_lr": best,
        "grid": grid,
        "rows": rows,
        "summary": summary,
        "step_ratio_sst_vs_lora": round(statistics.median(ratios), 3),
        "step_ratio_per_run": ratios,
        "target_step_ratio": 1.5,
        "paths": timing,
        "adapters": saved,
        "peak_rss_gb": rss,
        "environment": environment("cpu"),
    }
    print_table(summary, list(summary[0]))
    print(
        f"SST step = {result['step_ratio_sst_vs_lora']:.3f}x LoRA's (target <= 1.5x); fwd+bwd factored "
        f"{timing['ratio_vs_lora']['sst_factored']:.3f}x, materialised {timing['ratio_vs_lora']['sst_materialized']:.3f}x; "
        f"SST adapter {saved['sst_adapter_bytes'] / 1e6:.2f} MB ({saved['sst_saved_format']}), full "
        f"{saved['sst_full_adapter_bytes'] / 1e6:.1f} MB, LoRA {saved['lora_adapter_bytes'] / 1e6:.2f} MB; "
        f"reload identical: {saved['sst_reload_identical_logits']}"
    )
    path = write_json(output_path(args, "sst_finetune"), result)
    print(f"wrote {path}")
    return result


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
