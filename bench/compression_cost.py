"""What one compression costs: wall time and peak memory, streaming memory, or a profile by stage.

  python bench/compression_cost.py --rows smollm2        # §3: SmolLM2-135M on the CPU, 32 x 512 (<= 3 min)
  python bench/compression_cost.py --rows llama7b --set layers=1   # §3: LLaMA-7B shapes on a GPU
  python bench/compression_cost.py --rows stream         # §11: peak host RSS of --stream vs the model size
  python bench/compression_cost.py --rows profile --threads 1 --set eval_tokens=16384   # §9
  python bench/compression_cost.py --quick               # every row at tiny sizes (seconds)

Rows: bench/rows/compression_cost.yaml (each names its mode, model, method and sizes). Every compression
goes through the package (``leanformers.compress`` / ``compress_pretrained``) with the row's method.
The profile mode imports whichever leanformers is first on PYTHONPATH, so it profiles another checkout
for a before/after (``PYTHONPATH=/other/src``); compare the ratio compression / dense forward of the
same run, not seconds (the machine is shared). Each row writes bench/results/<name>[_quick].json, where
<name> is the row's ``output`` (mpifa_cost, mpifa_cost_llama7b, mpifa_cost_stream, mpifa_profile).
"""

from __future__ import annotations

import cProfile
import json
import os
import pstats
import shutil
import tempfile
import time
from pathlib import Path

import harness
import torch
from harness import environment, llama_config, load_rows, print_table, timed

import leanformers
from leanformers import compress, compress_pretrained
from leanformers.compression.checkpoint_io import PeakHostMemory
from leanformers.compression.compressor import get_compressor

# (label, function-name substrings [@file], "ct" cumulative or "tt" self time): names of old and new code
PARTS = [
    ("Gram products G, K, S (self time)", ("group_input_stats", "gram@reconstruct.py"), "tt"),
    ("compressed-stream replays up to each group (input_of)", ("input_of",), "ct"),
    ("dense passes, one per block (run_block_capturing; OWL's scan too)", ("run_block_capturing",), "ct"),
    ("  OWL outlier scan (its own dense pass)", ("owl_block_densities",), "ct"),
    ("compressed pass after each block (advance)", ("advance",), "ct"),
    ("fitting the linears (wall; a group's side by side)", ("map_single_threaded",), "ct"),
    ("  reconstruct (whitening SVD + M steps), main thread only", ("reconstruct",), "ct"),
    ("  PIFA conversion (from_factors, pivoted QR), main thread only", ("from_factors",), "ct"),
    ("PIFALinear.forward (compressed stream, gathers included)", ("forward@pifa_linear.py",), "ct"),
    ("replay memo checks", ("memo_forward", "_same", "_module_state", "equal"), "tt"),
]


def split_profile(stats: pstats.Stats) -> dict[str, float]:
    """Seconds per stage of PARTS from cProfile statistics ((file, line, name) -> (cc, nc, tt, ct, ...))."""
    out = {}
    for label, patterns, kind in PARTS:
        seconds = 0.0
        for (path, _, name), (_, _, tt, ct, _) in stats.stats.items():
            for p in patterns:
                fn, _, file = p.partition("@")
                if fn in name and (not file or path.endswith(file)):
                    seconds += ct if kind == "ct" else tt
                    break
        out[label] = round(seconds, 2)
    return out


RANDOM_MODELS = {  # llama_config's arguments, dtype
    "llama7b": (dict(hidden=4096, intermediate=11008, heads=32, vocab=32000), torch.bfloat16),
    "tiny": (dict(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, vocab=128), torch.float32),
}


def random_llama(shape: dict, dtype: torch.dtype):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(**shape, max_positions=4096))
    model.to_empty(device="cpu")  # leaves every tensor unset, RoPE's buffers (LLaMA's only ones) too: rebuild
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    gen = torch.Generator().manual_seed(0)
    for p in model.requires_grad_(False).parameters():
        p.fill_(1.0) if p.dim() == 1 else p.normal_(0, 0.02, generator=gen)
    return model.to(dtype).eval()


def load_model(s: dict):
    """(model, tokenizer or None, label, calibration: ids or a file path)."""
    if s["model"] == "smollm2":
        from leanformers.data import shared_data_path
        from leanformers.hub import load_causal_lm, smollm2_135m

        model, tok = load_causal_lm(smollm2_135m(), dtype=torch.float32)
        calibration = str(shared_data_path("wikitext-2-v1-valid.txt"))
        return model, tok, "SmolLM2-135M (GGUF Q4_1 dequantised)", calibration
    if s["model"] == "llama7b" and not torch.cuda.is_available():
        raise SystemExit("the llama7b row needs a CUDA device")
    shape, dtype = RANDOM_MODELS[s["model"]]
    shape = shape | ({"layers": s["layers"]} if s["model"] == "llama7b" else {})
    label = {"llama7b": "LLaMA-7B shapes (random)", "tiny": "tiny LLaMA (random)"}[s["model"]]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab"], (s["nsamples"], s["seqlen"]), generator=gen)
    return random_llama(shape, dtype), None, label, ids


def config_of(s: dict, **extra):
    cls = get_compressor(s["method"]).config_class
    keys = ("density", "nsamples", "seqlen", "batch_size")
    return cls(**{k: s[k] for k in keys}, **(s.get("config") or {}), **extra)


def time_row(s: dict, args) -> dict:
    model, tok, label, calibration = load_model(s)
    config = config_of(s)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with PeakHostMemory() as rss, timed() as elapsed:  # the kernel's high-water mark over the block
        report = compress(model, tok, config, calibration=calibration)
    seconds, peak_gb = elapsed.seconds, rss.peak / 2**30
    target_s, target_gb = s.get("target_s"), s.get("target_host_gb")
    met = (target_s is None or seconds <= target_s) and (target_gb is None or peak_gb <= target_gb)
    gpu = f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if torch.cuda.is_available() else "-"
    target = f"<= {target_s / 60:.0f} min" if target_s else "-"
    target += f", <= {target_gb} GB host" if target_gb else ""
    row = {"model": label, "device": "cuda" if torch.cuda.is_available() else "cpu"}
    row |= {"calibration": f"{s['nsamples']} x {s['seqlen']}", "density": f"{report.achieved_density:.4f}"}
    row |= {"wall time (s)": f"{seconds:.3g}", "peak host RSS (GB)": f"{peak_gb:.2f}", "peak GPU (GB)": gpu}
    row |= {"target": target, "met": ("yes" if met else "NO") if target_s else "-"}
    if s.get("layers") and s["layers"] != 32:  # a part of LLaMA-7B: the whole is extrapolated, marked
        row |= {"model": f"{label}, first {s['layers']} of 32 blocks"}
        row["s per block"] = f"{seconds / s['layers']:.1f}"
        row |= {"32 blocks (extrapolated, not measured)": f"{32 * seconds / s['layers']:.0f} s", "met": "-"}
    return {"env": environment(), "row": row, "report": report.to_dict()}


def write_random_llama(folder: Path, cfg, shard_blocks: int = 4) -> int:
    """Save a random float32 LLaMA of ``cfg`` as safetensors shards, a few blocks at a time from the meta
    device (this process never holds the model); returns its size in bytes."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from leanformers.compression.checkpoint_io import release

    with init_empty_weights():
        model = LlamaForCausalLM(cfg)
    layers = model.model.layers
    outside = [m for n, m in model.named_children() if n != "model"]  # the head: the first shard
    groups = [outside + [model.model.embed_tokens, model.model.norm]]
    groups += [list(layers[i : i + shard_blocks]) for i in range(0, len(layers), shard_blocks)]
    names, gen = {id(m): n for n, m in model.named_modules()}, torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for k, group in enumerate(groups, start=1):
        tensors = {}
        for module in group:
            module.to_empty(device="cpu")
            for n, p in module.named_parameters():
                with torch.no_grad():
                    p.fill_(1.0) if p.dim() == 1 else p.normal_(0, 0.02, generator=gen)
                tensors[f"{names[id(module)]}.{n}"] = p.detach()
        file = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        for module in group:
            release(module)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg.save_pretrained(folder)
    return total


def stream_row(s: dict, args) -> dict:
    from leanformers.compression.checkpoint_io import status_kib

    m = s["model"]
    cfg = llama_config(**m, vocab=32000, max_positions=4096, tie_word_embeddings=False)
    config, gen = config_of(s, device="cpu"), torch.Generator().manual_seed(0)
    calibration = torch.randint(0, 32000, (s["nsamples"], s["seqlen"]), generator=gen)
    root = Path(tempfile.mkdtemp(prefix="compression-stream-bench-", dir=args.tmp))
    try:
        t0 = time.perf_counter()
        (root / "model").mkdir()
        model_bytes = write_random_llama(root / "model", cfg)
        write_s = time.perf_counter() - t0
        baseline = (status_kib("VmRSS") or 0) * 1024
        report = compress_pretrained(root / "model", root / "out", config, calibration=calibration)
        out_bytes = sum(f.stat().st_size for f in (root / "out").glob("*.safetensors"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    peak = report.peak_host_rss_bytes
    row = {"model": f"LLaMA {m['layers']} x {m['hidden']} (random)"}
    row["params"] = f"{report.model_params_before / 1e9:.3f} B"
    row["model size (GB)"] = f"{model_bytes / 1e9:.2f}"
    row |= {"output size (GB)": f"{out_bytes / 1e9:.2f}", "calibration": f"{s['nsamples']} x {s['seqlen']}"}
    row |= {"offload": config.offload, "density": f"{report.achieved_density:.4f}"}
    row |= {"wall time (s)": f"{report.seconds:.0f}", "RSS before (GB)": f"{baseline / 1e9:.2f}"}
    row |= {"peak host RSS (GB)": f"{peak / 1e9:.2f}", "peak / model size": f"{peak / model_bytes:.3f}"}
    row |= {"target": "< 0.5 x model size", "met": "yes" if peak < model_bytes / 2 else "NO"}
    out = {"env": environment(), "row": row, "model_bytes": model_bytes, "peak_host_rss_bytes": peak}
    out |= {"rss_before_bytes": baseline, "write_seconds": write_s, "config": config.to_dict(), "shape": m}
    return out | {"threads": torch.get_num_threads(), "nice": os.nice(0), "report": report.to_dict()}


def profile_row(s: dict, args) -> dict:
    from leanformers.data import calibration_windows, load_text, shared_data_path, tokenize_text

    model, tok, label, _ = load_model(s)
    if s["blocks"]:
        model.model.layers = model.model.layers[: s["blocks"]]
        model.config.num_hidden_layers = s["blocks"]
    valid = tokenize_text(load_text(shared_data_path("wikitext-2-v1-valid.txt")), tok)
    windows = calibration_windows(valid, s["nsamples"], s["seqlen"], 0)
    with torch.no_grad():
        model(input_ids=windows[:1, :16], use_cache=False)  # warm-up (allocator, kernels)
        with timed() as dense:
            for batch in windows.split(s["batch_size"]):
                model(input_ids=batch, use_cache=False)
    with timed() as compressing, cProfile.Profile() as profiler:
        report = compress(model, tok, config_of(s, device="cpu"), calibration=windows, progress=False)
    dense_s, compress_s = dense.seconds, compressing.seconds
    payload = {"what": f"cProfile of compress ({s['method']}) on {label}, WikiText-2 v1 valid calibration"}
    payload |= {"label": args.label, "leanformers_file": leanformers.__file__, "env": environment()}
    payload |= {"threads": torch.get_num_threads(), "blocks": s["blocks"] or len(model.model.layers)}
    payload["calibration"] = f"{s['nsamples']} x {s['seqlen']}, batch {s['batch_size']}, seed 0"
    payload |= {"density": s["density"], "achieved_density": report.achieved_density}
    payload |= {"dense_forward_seconds": round(dense_s, 3), "compress_seconds": round(compress_s, 3)}
    payload["ratio_compress_to_dense_forward"] = round(compress_s / dense_s, 3)
    payload["seconds_by_part"] = split_profile(pstats.Stats(profiler))
    if args.save_state:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, args.save_state)
    if s["eval_tokens"]:
        from leanformers.eval import perplexity

        test = tokenize_text(load_text(shared_data_path("wikitext-2-raw-test.txt")), tok)
        result = perplexity(model, text=test, seqlen=2048, max_tokens=s["eval_tokens"])
        payload["wikitext2_test_ppl"] = {"ppl": result.ppl, "tokens": result.n_tokens, "seqlen": 2048}
    parts = payload["seconds_by_part"].items()
    table = [{"stage": k, "seconds": v, "share": f"{100 * v / compress_s:.1f} %"} for k, v in parts]
    payload["row"] = {"compress_s": round(compress_s, 3), "dense_forward_s": round(dense_s, 3)}
    payload["row"]["ratio"] = payload["ratio_compress_to_dense_forward"]
    print_table(table, ["stage", "seconds", "share"])
    return payload


MODES = {
    "time": (time_row, "layers target_s target_host_gb"),
    "stream": (stream_row, "config"),
    "profile": (profile_row, "blocks eval_tokens"),
}
COMMON = "mode output model method density nsamples seqlen batch_size config quick"
ROWS = load_rows("compression_cost", lambda name, row: f"{COMMON} {MODES[row['mode']][1]}")


def build_parser():
    ap = harness.parser(__doc__, "every row at tiny sizes (seconds, CPU)", "result JSON (one row only)")
    harness.rows_arguments(ap, ROWS)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the whole run")
    ap.add_argument("--tmp", default=None, help="stream: folder for the random model (default /tmp)")
    ap.add_argument("--save-state", default=None, help="profile: write the compressed state dict here")
    ap.add_argument("--label", default="", help="profile: free text stored in the JSON (the code version)")
    return ap


def main(argv: list[str] | None = None) -> dict:
    """Runs the rows (default: all with --quick, else smollm2); returns {row: the payload it wrote}."""
    ap = build_parser()
    args = ap.parse_args(argv)
    rows = args.rows or (list(ROWS) if args.quick else ["smollm2"])
    if args.output is not None and len(rows) != 1:
        ap.error("--output takes one row (each row writes its own JSON)")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for name in rows:
        s = harness.row_settings(name, ROWS[name], args.quick, args.sets)
        payload = MODES[s["mode"]][0](s, args)
        path = harness.write_json(harness.output_path(args, s["output"]), payload)
        results[name] = payload
        print(f"\n{name} (JSON: {path})")
        print_table([payload["row"]], list(payload["row"]))
    return results


if __name__ == "__main__":
    main()
