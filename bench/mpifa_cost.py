"""BENCHMARKS.md §3: wall time and peak host / GPU memory of a whole MPIFA compression.

python bench/mpifa_cost.py                 # SmolLM2-135M on the CPU, 32 x 512 tokens (target <= 3 min)
python bench/mpifa_cost.py --llama7b       # LLaMA-7B shapes, random weights, 128 x 2048 random tokens,
                                           # on a GPU (target <= 15 min, <= 32 GB host RAM)
python bench/mpifa_cost.py --quick         # a tiny LLaMA, seconds (CI smoke test)
python bench/mpifa_cost.py --stream        # streaming mode (--stream in mpifa-compress): a random 0.5B
                                           # LLaMA written to /tmp in shards, compressed block by block;
                                           # peak host RSS vs the model's size (target: < half)
python bench/mpifa_cost.py --stream --quick  # the same on a 4-block model (seconds)
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from harness import RESULTS, PeakRSS, environment, llama_config, print_table, timed, write_json
from harness import parser as harness_parser

from leanformers import MPIFAConfig, mpifa_compress


def _random_llama(hidden, intermediate, layers, heads, kv_heads, vocab, dtype):
    from transformers import LlamaForCausalLM

    cfg = llama_config(hidden, intermediate, layers, heads, kv_heads, vocab, max_positions=4096)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=gen)
    return model.to(dtype).eval()


def _write_random_llama(folder: Path, cfg, shard_blocks: int = 4) -> int:
    """Save a random float32 LLaMA of ``cfg`` into ``folder`` as safetensors shards, built a few blocks
    at a time on the meta device and materialised only while written (this process never holds the
    model). Returns its size in bytes."""
    import json

    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from leanformers.compression.checkpoint_io import release

    with init_empty_weights():
        model = LlamaForCausalLM(cfg)
    layers = model.model.layers
    groups = [
        [m for n, m in model.named_children() if n != "model"] + [model.model.embed_tokens, model.model.norm]
    ]
    groups += [list(layers[i : i + shard_blocks]) for i in range(0, len(layers), shard_blocks)]
    names = {id(m): n for n, m in model.named_modules()}
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for k, group in enumerate(groups, start=1):
        tensors = {}
        for module in group:
            module.to_empty(device="cpu")
            for n, p in module.named_parameters():
                with torch.no_grad():
                    if p.dim() == 1:
                        p.fill_(1.0)
                    else:
                        p.normal_(0, 0.02, generator=gen)
                tensors[f"{names[id(module)]}.{n}"] = p.detach()
        file = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
        for module in group:
            release(module)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg.save_pretrained(folder)
    return total


def stream_main(args) -> dict:
    """Peak host RSS of ``mpifa_compress_pretrained`` on a random LLaMA saved in shards, vs its size."""
    from leanformers.compression.checkpoint_io import status_kib
    from leanformers.compressors.mpifa import mpifa_compress_pretrained

    if args.quick:
        name, shape = "LLaMA 4 x 256 (random)", dict(hidden=256, intermediate=688, layers=4, heads=4)
    else:  # deep and thin (MobileLLM-like): 0.50B parameters, 2.0 GB in float32
        name, shape = (
            "LLaMA 64 x 768, 0.5B (random)",
            dict(hidden=768, intermediate=2048, layers=64, heads=12),
        )
    if args.layers:
        shape["layers"] = args.layers
    cfg = llama_config(
        shape["hidden"],
        shape["intermediate"],
        shape["layers"],
        shape["heads"],
        shape["heads"],
        32000,
        max_positions=4096,
        tie_word_embeddings=False,
    )
    nsamples, seqlen = args.nsamples or 4, args.seqlen or 128
    config = MPIFAConfig(
        density=args.density,
        nsamples=nsamples,
        seqlen=seqlen,
        batch_size=4,
        steps=1,
        device="cpu",
        offload=args.offload,
        targets=args.targets.split(",") if args.targets else None,
    )
    calibration = torch.randint(0, 32000, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    root = Path(tempfile.mkdtemp(prefix="mpifa-stream-bench-", dir=args.tmp))
    try:
        t0 = time.perf_counter()
        (root / "model").mkdir()
        model_bytes = _write_random_llama(root / "model", cfg)
        write_s = time.perf_counter() - t0
        baseline = (status_kib("VmRSS") or 0) * 1024
        report = mpifa_compress_pretrained(root / "model", root / "out", config, calibration=calibration)
        out_bytes = sum(f.stat().st_size for f in (root / "out").glob("*.safetensors"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    peak = report.peak_host_rss_bytes
    row = {
        "model": name,
        "params": f"{report.model_params_before / 1e9:.3f} B",
        "model size (GB)": f"{model_bytes / 1e9:.2f}",
        "output size (GB)": f"{out_bytes / 1e9:.2f}",
        "calibration": f"{nsamples} x {seqlen}",
        "offload": args.offload,
        "density": f"{report.achieved_density:.4f}",
        "wall time (s)": f"{report.seconds:.0f}",
        "RSS before (GB)": f"{baseline / 1e9:.2f}",
        "peak host RSS (GB)": f"{peak / 1e9:.2f}",
        "peak / model size": f"{peak / model_bytes:.3f}",
        "target": "< 0.5 x model size",
        "met": "yes" if peak < model_bytes / 2 else "NO",
    }
    payload = {
        "env": environment(),
        "row": row,
        "model_bytes": model_bytes,
        "peak_host_rss_bytes": peak,
        "rss_before_bytes": baseline,
        "write_seconds": write_s,
        "config": config.to_dict(),
        "shape": shape,
        "threads": torch.get_num_threads(),
        "nice": os.nice(0),
        "report": report.to_dict(),
    }
    path = write_json(
        args.output or RESULTS / f"mpifa_cost_stream{'_quick' if args.quick else ''}.json", payload
    )
    print(f"(JSON: {path})")
    print_table([row], list(row))
    if not args.quick and peak >= model_bytes / 2:
        raise SystemExit(
            f"peak host RSS {peak / 1e9:.2f} GB is not below half the model ({model_bytes / 2e9:.2f} GB)"
        )
    return payload


def main(argv: list[str] | None = None) -> dict:
    parser = harness_parser(
        __doc__,
        "tiny random LLaMA (CI smoke test)",
        "result JSON (default bench/results/mpifa_cost[_quick|_llama7b].json)",
    )
    parser.add_argument("--llama7b", action="store_true", help="LLaMA-7B shapes on the GPU")
    parser.add_argument("--nsamples", type=int, default=None)
    parser.add_argument("--seqlen", type=int, default=None)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="with --llama7b: only the first N of the 32 blocks (the row then also gives the time per "
        "block and its 32-block extrapolation, marked as such); with --stream: the random model's depth",
    )
    parser.add_argument(
        "--stream", action="store_true", help="streaming mode on a random 0.5B LLaMA in shards"
    )
    parser.add_argument("--offload", default="disk", help="--stream: activation offload (none, cpu, disk)")
    parser.add_argument(
        "--targets", default=None, help="--stream: compress only these module patterns (comma list; CPU time)"
    )
    parser.add_argument("--tmp", default=None, help="--stream: folder for the random model (default: /tmp)")
    args = parser.parse_args(argv)
    if args.stream:
        return stream_main(args)

    if args.llama7b:
        if not torch.cuda.is_available():
            parser.error("--llama7b needs a CUDA device")
        name, target_s, target_gb = "LLaMA-7B shapes (random)", 15 * 60, 32.0
        nsamples, seqlen = args.nsamples or 128, args.seqlen or 2048
        model = _random_llama(4096, 11008, args.layers or 32, 32, 32, 32000, torch.bfloat16)
        calibration = torch.randint(0, 32000, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
        tokenizer = None
    elif args.quick:
        name, target_s, target_gb = "tiny LLaMA (random)", None, None
        nsamples, seqlen = args.nsamples or 8, args.seqlen or 64
        model = _random_llama(64, 96, 2, 4, 2, 128, torch.float32)
        calibration = torch.randint(0, 128, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
        tokenizer = None
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from leanformers.data import shared_data_path
        from leanformers.hub import smollm2_135m

        name, target_s, target_gb = "SmolLM2-135M (GGUF Q4_1 dequantised)", 180, None
        nsamples, seqlen = args.nsamples or 32, args.seqlen or 512
        folder = smollm2_135m()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        calibration = str(shared_data_path("wikitext-2-v1-valid.txt"))

    config = MPIFAConfig(density=args.density, nsamples=nsamples, seqlen=seqlen, batch_size=8)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss, timed() as elapsed:
        report = mpifa_compress(model, tokenizer, config, calibration=calibration)
    seconds = elapsed.seconds
    row = {
        "model": name,
        "device": str(
            config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        ),
        "calibration": f"{nsamples} x {seqlen}",
        "density": f"{report.achieved_density:.4f}",
        "wall time (s)": f"{seconds:.3g}",
        "peak host RSS (GB)": f"{rss.peak_gb:.2f}",
        "peak GPU (GB)": f"{torch.cuda.max_memory_allocated() / 2**30:.2f}"
        if torch.cuda.is_available()
        else "-",
        "target": (f"<= {target_s / 60:.0f} min" if target_s else "-")
        + (f", <= {target_gb:.0f} GB host" if target_gb else ""),
        "met": (
            "yes"
            if (target_s is None or seconds <= target_s) and (target_gb is None or rss.peak_gb <= target_gb)
            else "NO"
        )
        if target_s
        else "-",
    }
    if args.llama7b and args.layers and args.layers != 32:
        row["model"] += f", first {args.layers} of 32 blocks"
        row["s per block"] = f"{seconds / args.layers:.1f}"
        row["32 blocks (extrapolated, not measured)"] = f"{32 * seconds / args.layers:.0f} s"
        row["met"] = "-"  # the targets are for the whole model
    payload = {"env": environment(), "row": row, "report": report.to_dict()}
    name = "mpifa_cost" + ("_quick" if args.quick else "_llama7b" if args.llama7b else "")
    path = write_json(args.output or RESULTS / f"{name}.json", payload)
    print(f"(JSON: {path})")
    print_table([row], list(row))
    return payload


if __name__ == "__main__":
    main()
