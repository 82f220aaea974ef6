"""Machine translation on Multi30k en->de: dense vs CHTss / SET / RigL at 5 % vs SST / LoRA at one rank.

Every row is ``leanformers-train recipes/mt_multi30k.yaml --set method.name=<method> training.seed=<s>
model.seed=<s>`` (the same recipe, model, data and steps; only the method changes), evaluated with
greedy decoding on test_2016_flickr: BLEU and chrF through ``evaluate``, with sacrebleu's signatures.
Sparse rows record the density measured on the trained weights (non-zeros of the targeted matrices),
low-rank rows the rank of their adapters.

python bench/mt_multi30k.py --quick                         # seconds: tiny model, 8 steps (CI smoke)
python bench/mt_multi30k.py                                 # the recipe's size, 1 seed, every row
python bench/mt_multi30k.py --methods dense chtss --seeds 0 1 2 --resume   # more seeds, keep done rows
python bench/mt_multi30k.py --set training.use_cpu=false ...                # on a GPU (the recipe says CPU)
"""

from __future__ import annotations

import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import REPO_ROOT, command_line, environment, output_path, parser, print_table, write_json

RECIPE = REPO_ROOT / "recipes" / "mt_multi30k.yaml"
METHODS = ("dense", "chtss", "set", "rigl", "sst", "lora")
DEFAULT_METHODS = ("dense", "chtss", "set", "sst", "lora")
# bench/gpu_suite.py's MT part (about a minute on one H200): the CPU table's size and rows, on the GPU
GPU_SUITE_ARGS = ["--methods", *DEFAULT_METHODS, "--set", "training.max_steps=300", "training.use_cpu=false"]
SPARSE = ("chtss", "set", "rigl")

# --quick: a 1+1-layer d_model 32 Marian, 256 training pairs, 8 steps, 16 test sentences
QUICK = [
    "model.config.d_model=32",
    "model.config.encoder_layers=1",
    "model.config.decoder_layers=1",
    "model.config.encoder_attention_heads=2",
    "model.config.decoder_attention_heads=2",
    "model.config.encoder_ffn_dim=64",
    "model.config.decoder_ffn_dim=64",
    "model.config.max_position_embeddings=64",
    "tokenizer.bpe.vocab_size=400",
    "data.max_train_examples=256",
    "data.max_eval_examples=16",
    "data.max_source_length=32",
    "data.max_target_length=32",
    "training.max_steps=8",
    "training.warmup_steps=1",
    "training.per_device_train_batch_size=16",
    "training.per_device_eval_batch_size=16",
    "training.generation_max_length=16",
    "training.logging_steps=4",
    "method.chtss.update_interval=2",
    "method.set.update_interval=2",
    "method.rigl.update_interval=2",
    "method.sst.r=4",
    "method.sst.steps_per_iteration=2",
    "method.sst.warmup_steps_per_iteration=1",
    "method.lora.r=4",
]


def target_density(model, targets: list[str]) -> float:
    """Non-zero share of the weights of the linear layers whose name matches one of ``targets``."""
    import torch

    nonzero = total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(re.search(t, name) for t in targets):
            nonzero += int((module.weight != 0).sum())
            total += module.weight.numel()
    if total == 0:
        raise ValueError(f"no linear layer matches {targets}")
    return nonzero / total


def adapter_rank(model) -> int:
    """The one rank r of every adapter layer of a PEFT model (SST or LoRA); raises if they differ."""
    ranks = set()
    for config in model.peft_config.values():
        ranks.add(int(config.r))
        if getattr(config, "rank_pattern", None):
            ranks.update(int(r) for r in config.rank_pattern.values())
    if len(ranks) != 1:
        raise ValueError(f"adapter ranks differ: {sorted(ranks)}")
    return ranks.pop()


def run_row(method: str, seed: int, overrides: list[str], output_dir: Path) -> dict:
    from leanformers import train

    recipe = train.load_recipe(RECIPE)
    sets = [
        f"method.name={method}",
        f"training.seed={seed}",
        f"model.seed={seed}",
        f"training.output_dir={output_dir}",
        *overrides,
    ]
    if method in SPARSE:
        sets.append(f"method.{method}.seed={seed}")
    if method == "sst":
        sets.append(f"method.sst.seed={seed}")
    start = time.perf_counter()
    out = train.run(recipe, sets)
    wall = time.perf_counter() - start
    m, model = out["metrics"], out["model"]
    row = {
        "method": method,
        "seed": seed,
        "bleu": round(m["eval_bleu"], 2),
        "chrf": round(m["eval_chrf"], 2),
        "eval_loss": round(m["eval_loss"], 4),
        "bleu_signature": m["bleu_signature"],
        "chrf_signature": m["chrf_signature"],
        "test_sentences": len(out["trainer"].eval_dataset),
        "train_steps": out["trainer"].state.global_step,
        "model_parameters": m["model_parameters"],
        "trainable_parameters": m["trainable_parameters"],
        "train_s": round(m["train_runtime"], 1),
        "eval_s": round(m["eval_runtime"], 1),
        "wall_s": round(wall, 1),
    }
    resolved = train.load_recipe(RECIPE, sets)
    if method in SPARSE:
        # density of the final masks (links), and the non-zero share of the weights (never above it:
        # a link regrown at zero whose gradient stayed zero, e.g. into a dead ReLU unit, counts as zero)
        row["density"] = round(m["chtss/density_sparse_subset"], 5)
        row["nonzero_weights"] = round(target_density(model, resolved["method"][method]["targets"]), 5)
        if row["nonzero_weights"] > row["density"] + 1e-9:
            raise RuntimeError(
                f"{method}: {row['nonzero_weights']} of the weights are non-zero, above the masks' density"
            )
    if method in ("sst", "lora"):
        row["rank"] = adapter_rank(model)
    return row


def summarise(rows: list[dict]) -> list[dict]:
    """One line per method: mean (and std over seeds when there are several) of BLEU / chrF."""
    table = []
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        line = {"method": method, "seeds": len(mine)}
        for key in ("bleu", "chrf"):
            values = [r[key] for r in mine]
            line[key] = round(statistics.mean(values), 2)
            line[f"{key}_std"] = round(statistics.stdev(values), 2) if len(values) > 1 else None
            line[f"{key}_cell"] = (
                f"{line[key]:.2f} ± {line[f'{key}_std']:.2f}" if len(values) > 1 else f"{line[key]:.2f}"
            )
        for key in ("density", "rank", "trainable_parameters", "train_s"):
            if key in mine[0]:
                line[key] = (
                    mine[0][key] if key != "train_s" else round(statistics.mean(r[key] for r in mine), 1)
                )
        table.append(line)
    return table


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__, "tiny model, 8 steps, 16 test sentences (CI smoke test)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument(
        "--set",
        dest="overrides",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="extra recipe overrides for every row (after --quick's)",
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows of an existing --output JSON with the same settings; run the others",
    )
    args = ap.parse_args(argv)
    overrides = (QUICK if args.quick else []) + list(args.overrides)
    path = output_path(args, "mt_multi30k")
    rows: list[dict] = []
    if args.resume and path.is_file():
        import json

        old = json.loads(path.read_text())
        if old.get("overrides") != overrides:
            raise ValueError(
                f"--resume: {path} was written with overrides {old.get('overrides')}, not {overrides}"
            )
        rows = old["rows"]
    result = {
        "command": command_line("mt_multi30k", argv),
        "recipe": str(RECIPE.relative_to(REPO_ROOT)),
        "overrides": overrides,
        "environment": environment("cpu"),
        "rows": rows,
    }
    with tempfile.TemporaryDirectory(prefix="mt_multi30k_") as tmp:
        for seed in args.seeds:
            for method in args.methods:
                if any(r["method"] == method and r["seed"] == seed for r in rows):
                    continue
                row = run_row(method, seed, overrides, Path(tmp) / f"{method}_{seed}")
                rows.append(row)
                result["summary"] = summarise(rows)
                write_json(path, result)  # after every row: a stopped run keeps what it measured
                print(
                    f"[mt_multi30k] {method} seed {seed}: BLEU {row['bleu']} chrF {row['chrf']}",
                    file=sys.stderr,
                )
    result["summary"] = summarise(rows)
    write_json(path, result)
    print(f"JSON: {path}")
    print(f"BLEU signature: {rows[0]['bleu_signature'] if rows else '-'}")
    print_table(
        result["summary"],
        ["method", "seeds", "density", "rank", "trainable_parameters", "bleu_cell", "chrf_cell", "train_s"],
    )
    return result


if __name__ == "__main__":
    main()
