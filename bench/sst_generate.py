"""SST inference speed: unmerged SST ``generate`` vs the merged (plain nn.Linear) model, side by side.

Target (issue 7): unmerged ``generate`` <= 1.2x the merged model's time, with unchanged outputs. Three
variants of ONE trained-from-init SST model run in turn, repeat after repeat, so that machine load
hits them alike:

- ``merged``: ``merge_and_unload()`` of a copy (plain layers; the reference),
- ``sst``: the SST model as is (inference weight cached while the factors do not change),
- ``sst_uncached``: the same with the cache off (U diag(S) Vh rebuilt in every forward, the old path).

Reports the median wall-clock and process CPU time of each, the ratios to ``merged`` (median of
per-repeat ratios; CPU time is the steadier one on a shared, loaded machine), whether the
generated tokens are identical, and the max logit difference of ``sst`` to ``sst_uncached`` (must be 0)
and to ``merged`` (float32 rounding of the merge).

    python bench/sst_generate.py --quick                 # seconds (CI smoke test)
    python bench/sst_generate.py                         # LLaMA hidden 256, 4 layers, 64 new tokens
    python bench/sst_generate.py --output bench/results/sst_generate.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

import peft  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from bench._common import environment, print_table, write_json  # noqa: E402
from leanformers.sst import SSTConfig, SSTLinear  # noqa: E402

PRESETS = {
    "quick": {
        "hidden": 64,
        "ffn": 172,
        "layers": 2,
        "heads": 4,
        "vocab": 512,
        "r": 8,
        "prompt": 16,
        "new": 16,
    },
    "default": {
        "hidden": 256,
        "ffn": 688,
        "layers": 4,
        "heads": 4,
        "vocab": 4096,
        "r": 32,
        "prompt": 32,
        "new": 64,
    },
}


def build(p: dict, seed: int = 0) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=p["vocab"],
        hidden_size=p["hidden"],
        intermediate_size=p["ffn"],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        num_key_value_heads=p["heads"],
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    sst = get_peft_model(LlamaForCausalLM(cfg), SSTConfig(r=p["r"])).eval()
    merged = copy.deepcopy(sst).merge_and_unload().eval()
    uncached = copy.deepcopy(sst).eval()
    for layer in uncached.modules():
        if isinstance(layer, SSTLinear):
            layer.inference_cache = False
    return {"merged": merged, "sst": sst, "sst_uncached": uncached}


def _generate(model, ids, new: int) -> tuple[torch.Tensor, float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )
    return out, time.perf_counter() - start, time.process_time() - cpu


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few repeats (seconds)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7, quick 3)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument(
        "--output", type=str, default=None, help="JSON path (default bench/results/sst_generate.json)"
    )
    args = parser.parse_args(argv)
    p = dict(PRESETS["quick" if args.quick else "default"])
    if args.new_tokens:
        p["new"] = args.new_tokens
    repeats = args.repeats or (3 if args.quick else 7)

    models = build(p)
    ids = torch.randint(0, p["vocab"], (args.batch, p["prompt"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = {name: m(ids).logits for name, m in models.items()}
    outputs = {}
    for name, model in models.items():  # warm-up (and the reference tokens)
        outputs[name], _, _ = _generate(model, ids, p["new"])
    times: dict[str, list[float]] = {name: [] for name in models}
    cpu_times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for rep in range(repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]  # rotate: no variant always goes first
        for name in order:
            out, seconds, cpu_seconds = _generate(models[name], ids, p["new"])
            times[name].append(seconds)
            cpu_times[name].append(cpu_seconds)
            assert torch.equal(out, outputs[name]), f"{name}: greedy generation is not deterministic"

    def ratio(name: str, series: dict[str, list[float]] | None = None) -> float:
        series = times if series is None else series
        return statistics.median(a / b for a, b in zip(series[name], series["merged"], strict=True))

    rows = [
        {
            "variant": name,
            "median_s": round(statistics.median(times[name]), 4),
            "vs_merged": round(ratio(name), 3),
            "median_cpu_s": round(statistics.median(cpu_times[name]), 4),
            "cpu_vs_merged": round(ratio(name, cpu_times), 3),
            "tokens_equal_merged": bool(torch.equal(outputs[name], outputs["merged"])),
        }
        for name in names
    ]
    result = {
        "benchmark": "sst_generate",
        "preset": "quick" if args.quick else "default",
        "model": {**p, "batch": args.batch},
        "repeats": repeats,
        "times_s": times,
        "cpu_times_s": cpu_times,
        "rows": rows,
        "ratio_sst_vs_merged": ratio("sst"),
        "ratio_uncached_vs_merged": ratio("sst_uncached"),
        "cpu_ratio_sst_vs_merged": ratio("sst", cpu_times),
        "cpu_ratio_uncached_vs_merged": ratio("sst_uncached", cpu_times),
        "target_ratio": 1.2,
        "max_logit_diff_sst_vs_uncached": float((logits["sst"] - logits["sst_uncached"]).abs().max()),
        "max_logit_diff_sst_vs_merged": float((logits["sst"] - logits["merged"]).abs().max()),
        "tokens_identical": all(torch.equal(outputs[n], outputs["merged"]) for n in names),
        "environment": {**environment(), "peft": peft.__version__},
    }
    print_table(
        rows, ["variant", "median_s", "vs_merged", "median_cpu_s", "cpu_vs_merged", "tokens_equal_merged"]
    )
    print(
        f"unmerged SST generate = {result['ratio_sst_vs_merged']:.3f}x merged wall-clock, "
        f"{result['cpu_ratio_sst_vs_merged']:.3f}x CPU time "
        f"(uncached {result['ratio_uncached_vs_merged']:.3f}x / {result['cpu_ratio_uncached_vs_merged']:.3f}x; "
        "target <= 1.2x)"
    )
    if args.output:
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(result, indent=2, default=str))
        tmp.replace(path)  # atomic
    else:
        path = write_json("sst_generate", result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
